"""Deprecated: the batch-norm core is now :mod:`jaxstab.batchnorm`.

``jaxstab.nn`` read like flax's ``import flax.linen as nn``. Its names still work for one release
and warn ``DeprecationWarning`` on use; it will then be removed.
"""

from __future__ import annotations

import warnings
from typing import Any

from jaxstab import batchnorm
from jaxstab.batchnorm import _batch_norm, _config, _moments


def _check_hyperparameters(**options: Any) -> None:
    batchnorm.BatchNormConfig(**options)


def _uses_step(renorm: bool, r_max: Any, d_max: Any) -> bool:
    return batchnorm.BatchNormConfig(renorm=renorm, r_max=r_max, d_max=d_max).counts_steps


# Internals this module exported: each name -> (what it was, what to use instead).
_PRIVATE = {
    "VARIANCES": (_moments.VARIANCES, "BatchNormConfig's variance names"),
    "canonical_axes": (_moments.canonical_axes, "BatchNormConfig.feature_shape"),
    "check_hyperparameters": (_check_hyperparameters, "BatchNormConfig, which checks its options,"),
    "output_dtype": (_batch_norm._output_dtype, "batch_norm's dtype argument"),
    "uses_step": (_uses_step, "BatchNormConfig.counts_steps"),
    "variance_algorithm": (_config.variance_algorithm, "BatchNormConfig's variance field"),
}

__all__ = sorted({*batchnorm.__all__, *_PRIVATE})


def __getattr__(name: str) -> Any:
    if name in batchnorm.__all__:
        value, instead = getattr(batchnorm, name), name
    elif name in _PRIVATE:
        value, instead = _PRIVATE[name]
    else:
        raise AttributeError(f"module 'jaxstab.nn' has no attribute {name!r}")
    warnings.warn(
        f"jaxstab.nn is deprecated and will be removed in the next release; it is now "
        f"jaxstab.batchnorm: use jaxstab.batchnorm.{instead} instead of jaxstab.nn.{name}",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
