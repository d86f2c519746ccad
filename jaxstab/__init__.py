"""jaxstab: keep JAX training from exploding.

Gradient transformations that clip or rescale (optax-chainable), guards that skip bad steps, and
a Flax batch norm (linen and nnx). See the README for the feature table.
"""

from jaxstab._norms import flax_unit_axes, global_norm
from jaxstab.clipping import (
    AdaptiveGradClipState,
    ClipByGlobalNormState,
    adaptive_grad_clip,
    clip_by_global_norm,
)
from jaxstab.telemetry import telemetry

__version__ = "0.1.0"

__all__ = [
    "AdaptiveGradClipState",
    "ClipByGlobalNormState",
    "adaptive_grad_clip",
    "clip_by_global_norm",
    "flax_unit_axes",
    "global_norm",
    "telemetry",
]
