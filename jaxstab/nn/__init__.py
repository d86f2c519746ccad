"""Pure batch-norm core shared by :mod:`jaxstab.linen` and :mod:`jaxstab.nnx`.

No framework code: statistics (:func:`moments`), the full layer as a function
(:func:`batch_norm`), Batch Renormalization (:func:`renorm_correction`,
:func:`renorm_schedules`) and PyTorch conventions (:func:`momentum_from_torch`).
"""

from jaxstab.nn.batch_norm import (
    BatchStats,
    batch_norm,
    check_hyperparameters,
    output_dtype,
    uses_step,
    variance_algorithm,
)
from jaxstab.nn.moments import VARIANCES, Moments, canonical_axes, moments
from jaxstab.nn.renorm import renorm_correction, renorm_schedules
from jaxstab.nn.torch_compat import momentum_from_torch

__all__ = [
    "VARIANCES",
    "BatchStats",
    "Moments",
    "batch_norm",
    "canonical_axes",
    "check_hyperparameters",
    "momentum_from_torch",
    "moments",
    "output_dtype",
    "renorm_correction",
    "renorm_schedules",
    "uses_step",
    "variance_algorithm",
]
