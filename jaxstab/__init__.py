"""jaxstab: keep JAX training from exploding.

Gradient transformations that clip or rescale (optax-chainable), guards that skip bad steps, and
a Flax batch norm (``jaxstab.linen.BatchNorm``, ``jaxstab.nnx.BatchNorm``). See the README for
the feature table.

``import jaxstab`` does not import flax: ``jaxstab.linen`` and ``jaxstab.nnx`` load it on first
access, so optax-only users do not pay for flax.
"""

import importlib
from typing import TYPE_CHECKING

from jaxstab import nn
from jaxstab._norms import flax_unit_axes, global_norm
from jaxstab.adaptive import (
    AdagcState,
    QuantileClipState,
    ZScoreClipState,
    adagc,
    quantile_clip,
    zscore_clip,
)
from jaxstab.attention import QKClipState, gather_max_logits, qk_clip
from jaxstab.batchnorm import momentum_from_torch, renorm_schedules
from jaxstab.clipping import (
    AdaptiveGradClipState,
    ClipByGlobalNormState,
    adaptive_grad_clip,
    clip_by_global_norm,
)
from jaxstab.diagnostics import layer_norms
from jaxstab.guards import (
    DynamicLossScale,
    SkipAnomaliesState,
    all_finite,
    dynamic_loss_scale,
    skip_anomalies,
)
from jaxstab.logits import softcap, z_loss
from jaxstab.optimizers import (
    ScaleByAdamAtan2State,
    ScaleBySpamState,
    ScaleByStableAdamState,
    adam_atan2,
    scale_by_adam_atan2,
    scale_by_spam,
    scale_by_stable_adam,
    spam,
    stable_adamw,
)
from jaxstab.recovery import (
    SpikeRecovery,
    SpikeRecoveryError,
    SpikeRecoveryState,
    spike_recovery,
)
from jaxstab.recovery_orbax import OrbaxSnapshots
from jaxstab.scaling import NormalizeByGlobalNormState, normalize_by_global_norm
from jaxstab.telemetry import telemetry

if TYPE_CHECKING:  # type checkers and IDEs see the modules that load lazily below
    from jaxstab import attention_flax, linen, nnx

__version__ = "0.1.0"

__all__ = [
    "AdagcState",
    "AdaptiveGradClipState",
    "ClipByGlobalNormState",
    "DynamicLossScale",
    "NormalizeByGlobalNormState",
    "OrbaxSnapshots",
    "QKClipState",
    "QuantileClipState",
    "ScaleByAdamAtan2State",
    "ScaleBySpamState",
    "ScaleByStableAdamState",
    "SkipAnomaliesState",
    "SpikeRecovery",
    "SpikeRecoveryError",
    "SpikeRecoveryState",
    "ZScoreClipState",
    "adagc",
    "adam_atan2",
    "adaptive_grad_clip",
    "all_finite",
    "attention_flax",
    "batchnorm",
    "clip_by_global_norm",
    "dynamic_loss_scale",
    "flax_unit_axes",
    "gather_max_logits",
    "global_norm",
    "layer_norms",
    "linen",
    "momentum_from_torch",
    "nn",
    "nnx",
    "normalize_by_global_norm",
    "qk_clip",
    "quantile_clip",
    "renorm_schedules",
    "scale_by_adam_atan2",
    "scale_by_spam",
    "scale_by_stable_adam",
    "skip_anomalies",
    "softcap",
    "spam",
    "spike_recovery",
    "stable_adamw",
    "telemetry",
    "z_loss",
    "zscore_clip",
]

# The flax modules load on first access (PEP 562), so `import jaxstab` stays flax-free.
_FLAX_MODULES = ("attention_flax", "linen", "nnx")


def __getattr__(name):
    if name in _FLAX_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FLAX_MODULES))
