"""Batch normalization as one pure function; the linen and nnx modules are thin wrappers."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxstab import _checks
from jaxstab.batchnorm._config import BatchNormConfig
from jaxstab.batchnorm._moments import Moments, canonical_axes, moments
from jaxstab.batchnorm._renorm import renorm_correction


class BatchStats(NamedTuple):
    """Running statistics of a batch-norm layer (the ``batch_stats`` collection)."""

    mean: jax.Array  # running mean, feature-shaped
    var: jax.Array  # running (biased, or unbiased if asked) variance, feature-shaped
    step: jax.Array | None = None  # int32 training steps, kept only for renorm schedules


def _output_dtype(*args: jax.Array | None, dtype: Any = None) -> Any:
    """``dtype``, or the inexact result type of the non-None ``args`` (flax's rule)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    result = jnp.result_type(*(a for a in args if a is not None))
    return result if jnp.issubdtype(result, jnp.inexact) else jnp.promote_types(jnp.float32, result)


def _normalize(x, mean, var, scale, bias, epsilon, r=None, d=None):
    """``(x - mean) / sqrt(var + epsilon) [* r + d] * scale + bias`` with per-feature factors."""
    y = x - mean
    mul = lax.rsqrt(var + epsilon)
    if r is not None:
        mul = mul * r
    if scale is not None:
        mul = mul * scale
    y = y * mul
    add = d if scale is None or d is None else d * scale
    if bias is not None:
        add = bias if add is None else add + bias
    return y if add is None else y + add


def _num_devices(config: BatchNormConfig) -> int:
    """Number of devices the statistics are pooled over."""
    if config.axis_name is None:
        return 1
    if config.axis_index_groups is not None:
        return len(config.axis_index_groups[0])
    with _checks.mapped_axis(config.axis_name):
        return lax.axis_size(config.axis_name)


def batch_norm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    config: BatchNormConfig | None = None,
    use_running_average: bool = False,
    update_stats: bool = True,
    mask: jax.Array | None = None,
    dtype: Any = None,
    stats_dtype: Any = None,
    report: bool = False,
    **options: Any,
) -> tuple[jax.Array, BatchStats] | tuple[jax.Array, BatchStats, jax.Array]:
    """Batch normalization of ``x``: the output and the updated running statistics.

    Training (``use_running_average=False``) normalizes with this batch's statistics,
    ``y = (x - mean_B) / sqrt(var_B + epsilon) * scale + bias``, and moves the running averages
    ``running = momentum * running + (1 - momentum) * batch``. Inference normalizes with the
    running statistics and returns ``stats`` unchanged. A feature whose batch statistics are not
    finite (a NaN or Inf in the batch, or finite values whose variance float32 cannot hold, such
    as 1e30) keeps its running mean and variance bit for bit: one bad batch cannot poison them
    (flax's turn NaN for good); ``report=True`` also returns how many features that was.
    Statistics and normalization run in float32 at least (``stats_dtype``); only the output is
    cast to ``dtype``.

    The layer's options (``axis``, ``momentum``, ``epsilon``, ``axis_name``, ``variance``,
    ``renorm``, ``virtual_batch_size``, ...) are the fields of :class:`BatchNormConfig`, which
    says what each does: pass a config, or the options themselves as keywords.

    Args:
      x: the input.
      stats: the running statistics (feature-shaped ``mean``, ``var``; ``step`` when ``r_max``
        or ``d_max`` is a schedule).
      scale, bias: optional feature-shaped affine parameters.
      config: the options, checked when it was built; default ``BatchNormConfig(**options)``.
      use_running_average: inference mode.
      update_stats: in training, whether to update ``stats`` (False during a linen ``init``).
      mask: boolean array broadcastable to ``x``; only ``True`` positions enter the statistics.
        Features without a valid element keep their running statistics.
      dtype: output dtype; default: the result type of ``x``, ``scale``, ``bias``.
      stats_dtype: dtype of statistics and normalization; default: ``dtype`` (or ``x.dtype``)
        promoted to at least float32.
      report: also return the number of features (int32) whose running statistics this batch
        left untouched because its statistics were not finite (0 outside training).
      **options: the fields of :class:`BatchNormConfig`, when ``config`` is not given.

    Returns:
      ``(y, new_stats)``, or ``(y, new_stats, nonfinite)`` with ``report``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.batchnorm import BatchNormConfig, BatchStats, batch_norm
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> stats = BatchStats(mean=jnp.zeros(2), var=jnp.ones(2))
      >>> y, stats = batch_norm(x, stats, momentum=0.9, epsilon=1e-6)
      >>> y.round(3)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> stats.mean, stats.var
      (Array([0.2, 2. ], dtype=float32), Array([ 1. , 10.9], dtype=float32))
      >>> config = BatchNormConfig(momentum=0.9, epsilon=1e-6)  # the same, built once
      >>> batch_norm(x, stats, config=config)[1].mean
      Array([0.38, 3.8 ], dtype=float32)
      >>> bad = jnp.array([[1.0, jnp.nan], [1e30, 30.0]])  # a NaN; a variance past float32
      >>> _, kept, nonfinite = batch_norm(bad, stats, config=config, report=True)
      >>> kept.mean, kept.var, int(nonfinite)  # both features keep their running statistics
      (Array([0.2, 2. ], dtype=float32), Array([ 1. , 10.9], dtype=float32), 2)

    References:
      Ioffe & Szegedy, `Batch Normalization <https://arxiv.org/abs/1502.03167>`_, ICML 2015;
      Ioffe, `Batch Renormalization <https://arxiv.org/abs/1702.03275>`_, NeurIPS 2017;
      Hoffer et al., `Train longer, generalize better <https://arxiv.org/abs/1705.08741>`_,
      NeurIPS 2017.
    """
    if config is None:
        config = BatchNormConfig(**options)
    elif options:
        raise TypeError(f"give the options in config or as keywords, not both: got {options}")
    x = jnp.asarray(x)
    feature_axes = canonical_axes(x.ndim, config.axis)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    if stats.mean.shape != feature_shape or stats.var.shape != feature_shape:
        raise ValueError(
            f"the running mean and var (num_features) have shapes {stats.mean.shape} and "
            f"{stats.var.shape}, but x.shape = {x.shape} with axis = {config.axis!r} has "
            f"features {feature_shape}"
        )
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    scale = None if scale is None else jnp.reshape(scale, bshape)
    bias = None if bias is None else jnp.reshape(bias, bshape)
    running_mean, running_var = stats.mean.reshape(bshape), stats.var.reshape(bshape)
    out_dtype = _output_dtype(x, scale, bias, dtype=dtype)
    if stats_dtype is None:
        stats_dtype = jnp.promote_types(x.dtype if dtype is None else dtype, jnp.float32)
    epsilon, momentum = config.epsilon, config.momentum

    def done(y, new, nonfinite=None):
        nonfinite = jnp.zeros((), jnp.int32) if nonfinite is None else nonfinite
        return (y, new, nonfinite) if report else (y, new)

    if use_running_average:
        y = _normalize(x, running_mean, running_var, scale, bias, epsilon)
        return done(y.astype(out_dtype), stats)

    groups = _groups(x, feature_axes, config.virtual_batch_size)
    xg = x.reshape((groups, x.shape[0] // groups, *x.shape[1:]))
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape).reshape(xg.shape)
    reduce_axes = tuple(a + 1 for a in range(x.ndim) if a not in feature_axes)
    per_feature = math.prod(xg.shape[a] for a in reduce_axes)
    if update_stats and per_feature * _num_devices(config) == 1:
        _one_element_per_feature(x.shape, config)
    batch = moments(
        xg,
        reduce_axes,
        mask=mask,
        axis_name=config.axis_name,
        axis_index_groups=config.axis_index_groups,
        variance=config.variance,
        dtype=stats_dtype,
    )
    step = stats.step
    r = d = None
    if config.renorm:
        if config.counts_steps and step is None:
            raise ValueError("r_max/d_max schedules need stats.step, the training step counter")
        limit = lambda v: v(step) if callable(v) else v
        r, d = renorm_correction(
            batch.mean,
            batch.var,
            running_mean,
            running_var,
            epsilon=epsilon,
            r_max=limit(config.r_max),
            d_max=limit(config.d_max),
        )
    y = _normalize(xg, batch.mean, batch.var, scale, bias, epsilon, r, d)
    y = y.reshape(x.shape).astype(out_dtype)
    if not update_stats:
        return done(y, stats)
    if step is not None:
        step = step + 1
    mean, var, has_data = (
        v.reshape(feature_shape) for v in _group_average(batch, config.unbiased_running_var)
    )
    finite = jnp.isfinite(mean) & jnp.isfinite(var)
    new_mean = momentum * stats.mean + (1 - momentum) * mean
    new_var = momentum * stats.var + (1 - momentum) * var
    new_stats = BatchStats(
        lax.stop_gradient(jnp.where(has_data & finite, new_mean, stats.mean)),
        lax.stop_gradient(jnp.where(has_data & finite, new_var, stats.var)),
        step,
    )
    return done(y, new_stats, jnp.sum(has_data & ~finite, dtype=jnp.int32))


def _one_element_per_feature(shape: tuple[int, ...], config: BatchNormConfig) -> None:
    """A training batch of one element per feature: its variance is 0 and the output the bias.

    Flax allows it (``nnx.tabulate`` and one-example shape checks in training mode do it), so it
    warns and computes what flax computes; ghost batches of one are a misconfiguration and raise.
    """
    where = f"x.shape = {shape} with feature axis {config.axis!r}"
    if config.virtual_batch_size:
        raise ValueError(
            f"virtual_batch_size={config.virtual_batch_size} leaves one element per feature in "
            f"each ghost batch ({where}); the batch variance would be 0: use a larger one"
        )
    warnings.warn(
        f"batch statistics from one element per feature in training ({where}): the batch "
        "variance is 0 and the output is the bias alone (as in flax); use a larger batch or "
        "use_running_average=True",
        stacklevel=2,
    )


def _groups(x: jax.Array, feature_axes: tuple[int, ...], virtual_batch_size: int | None) -> int:
    """Number of ghost batches along the leading axis (1 without ``virtual_batch_size``)."""
    if virtual_batch_size is None:
        return 1
    if 0 in feature_axes:
        raise ValueError(
            f"virtual_batch_size splits the leading (batch) axis, which is a feature axis here "
            f"(axis={feature_axes!r})"
        )
    if x.shape[0] % virtual_batch_size:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} must divide the batch (leading) axis of "
            f"x, of size {x.shape[0]}"
        )
    return x.shape[0] // virtual_batch_size


def _group_average(batch: Moments, unbiased: bool):
    """Mean over ghost batches (axis 0) of the groups that hold data, and whether any does."""
    has = batch.count > 0
    var = batch.var
    if unbiased:
        var = var * (batch.count / jnp.maximum(batch.count - 1, 1))
    if batch.count.shape[0] == 1:
        return batch.mean[0], var[0], has[0]
    k = jnp.maximum(jnp.sum(has, 0), 1)
    average = lambda v: jnp.sum(jnp.where(has, v, 0), 0) / k
    return average(batch.mean), average(var), jnp.any(has, 0)
