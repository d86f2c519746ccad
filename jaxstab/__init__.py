"""jaxstab: keep JAX training from exploding.

Gradient transformations that clip or rescale (optax-chainable), guards that skip bad steps, and
a Flax batch norm (``jaxstab.linen.BatchNorm``, ``jaxstab.nnx.BatchNorm``). See the README for
the feature table.
"""

from jaxstab import linen, nn, nnx
from jaxstab._norms import flax_unit_axes, global_norm
from jaxstab.adaptive import (
    AdagcState,
    QuantileClipState,
    ZScoreClipState,
    adagc,
    quantile_clip,
    zscore_clip,
)
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
from jaxstab.recovery import (
    SpikeRecovery,
    SpikeRecoveryError,
    SpikeRecoveryState,
    spike_recovery,
)
from jaxstab.scaling import NormalizeByGlobalNormState, normalize_by_global_norm
from jaxstab.telemetry import telemetry

__version__ = "0.1.0"

__all__ = [
    "AdagcState",
    "AdaptiveGradClipState",
    "ClipByGlobalNormState",
    "DynamicLossScale",
    "NormalizeByGlobalNormState",
    "QuantileClipState",
    "SkipAnomaliesState",
    "SpikeRecovery",
    "SpikeRecoveryError",
    "SpikeRecoveryState",
    "ZScoreClipState",
    "adagc",
    "adaptive_grad_clip",
    "all_finite",
    "batchnorm",
    "clip_by_global_norm",
    "dynamic_loss_scale",
    "flax_unit_axes",
    "global_norm",
    "layer_norms",
    "linen",
    "momentum_from_torch",
    "nn",
    "nnx",
    "normalize_by_global_norm",
    "quantile_clip",
    "renorm_schedules",
    "skip_anomalies",
    "spike_recovery",
    "telemetry",
    "zscore_clip",
]
