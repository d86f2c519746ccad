"""Batch normalization as pure functions: the core of :mod:`jaxstab.linen` and :mod:`jaxstab.nnx`.

No framework code, no flax: statistics without cancellation, pooled exactly across masks and
devices (:func:`moments`), the whole layer as one function (:func:`batch_norm`) with its options
in a :class:`BatchNormConfig`, Batch Renormalization (:func:`renorm_correction`,
:func:`renorm_schedules`) and PyTorch's conventions (:func:`momentum_from_torch`).
"""

from jaxstab.batchnorm._batch_norm import BatchStats, batch_norm
from jaxstab.batchnorm._config import BatchNormConfig
from jaxstab.batchnorm._moments import Moments, moments
from jaxstab.batchnorm._renorm import renorm_correction, renorm_schedules
from jaxstab.batchnorm._torch import momentum_from_torch

__all__ = [
    "BatchNormConfig",
    "BatchStats",
    "Moments",
    "batch_norm",
    "momentum_from_torch",
    "moments",
    "renorm_correction",
    "renorm_schedules",
]
