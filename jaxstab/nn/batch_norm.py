"""Batch normalization as one pure function; the linen and nnx modules are thin wrappers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxstab import _checks
from jaxstab._norms import AxisName
from jaxstab.nn.moments import VARIANCES, Moments, Variance, canonical_axes, moments
from jaxstab.nn.renorm import Limit, renorm_correction


class BatchStats(NamedTuple):
    """Running statistics of a batch-norm layer (the ``batch_stats`` collection)."""

    mean: jax.Array  # running mean, feature-shaped
    var: jax.Array  # running (biased, or unbiased if asked) variance, feature-shaped
    step: jax.Array | None = None  # int32 training steps, kept only for renorm schedules


def uses_step(renorm: bool, r_max: Limit, d_max: Limit) -> bool:
    """Whether the layer keeps a ``step`` counter: renorm with a scheduled ``r_max``/``d_max``."""
    return renorm and (callable(r_max) or callable(d_max))


def variance_algorithm(use_fast_variance: bool, use_variance_shift: bool) -> Variance:
    """The :func:`jaxstab.nn.moments` algorithm for the modules' flags.

    ``use_fast_variance`` (flax's flag, default True) asks for one pass over the input;
    ``use_variance_shift`` (default True) makes that pass shifted, so it does not cancel.
    ``use_fast_variance=False`` gives two passes, whatever the shift flag.

    Example:
      >>> from jaxstab.nn import variance_algorithm
      >>> variance_algorithm(True, True), variance_algorithm(True, False)
      ('shifted', 'fast')
    """
    if not use_fast_variance:
        return "two_pass"
    return "shifted" if use_variance_shift else "fast"


def check_hyperparameters(
    *,
    momentum: float,
    epsilon: float,
    variance: Variance = "shifted",
    renorm: bool = False,
    r_max: Limit = 3.0,
    d_max: Limit = 5.0,
    virtual_batch_size: int | None = None,
) -> None:
    """Raises ``ValueError`` naming the first bad hyperparameter and what is allowed.

    Schedules for ``r_max``/``d_max`` are checked at step 0.

    Example:
      >>> from jaxstab.nn import check_hyperparameters
      >>> check_hyperparameters(momentum=1.5, epsilon=1e-5)
      Traceback (most recent call last):
        ...
      ValueError: momentum must be in [0.0, 1.0], got 1.5
    """
    _checks.check_range("momentum", momentum, low=0.0, high=1.0)
    _checks.check_range("epsilon", epsilon, low=0.0, low_open=True)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if renorm:
        for name, limit, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
            at_0 = limit(0) if callable(limit) else limit
            _checks.check_range(f"{name}(0)" if callable(limit) else name, at_0, low=low)
    if virtual_batch_size is not None and (
        isinstance(virtual_batch_size, bool)
        or not isinstance(virtual_batch_size, int)
        or virtual_batch_size <= 0
    ):
        raise ValueError(
            f"virtual_batch_size must be None or a positive int, got {virtual_batch_size!r}"
        )


def output_dtype(*args: jax.Array | None, dtype: Any = None) -> Any:
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


def _num_devices(axis_name, axis_index_groups) -> int:
    if axis_name is None:
        return 1
    if axis_index_groups is not None:
        return len(axis_index_groups[0])
    return lax.axis_size(axis_name)


def batch_norm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: int | Sequence[int] = -1,
    use_running_average: bool = False,
    update_stats: bool = True,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
    axis_name: AxisName = None,
    axis_index_groups: Any = None,
    variance: Variance = "shifted",
    renorm: bool = False,
    r_max: Limit = 3.0,
    d_max: Limit = 5.0,
    virtual_batch_size: int | None = None,
    unbiased_running_var: bool = False,
    dtype: Any = None,
    stats_dtype: Any = None,
) -> tuple[jax.Array, BatchStats]:
    """Batch normalization of ``x``: the output and the updated running statistics.

    Training (``use_running_average=False``) normalizes with this batch's statistics,
    ``y = (x - mean_B) / sqrt(var_B + epsilon) * scale + bias``, and moves the running averages
    ``running = momentum * running + (1 - momentum) * batch``. Inference normalizes with the
    running statistics and returns ``stats`` unchanged. Statistics and normalization run in
    float32 at least (``stats_dtype``); only the output is cast to ``dtype``.

    Args:
      x: the input.
      stats: the running statistics (feature-shaped ``mean``, ``var``; ``step`` when ``r_max``
        or ``d_max`` is a schedule).
      scale, bias: optional feature-shaped affine parameters.
      axis: the feature axis or axes; all others are reduced.
      use_running_average: inference mode.
      update_stats: in training, whether to update ``stats`` (False during a linen ``init``).
      momentum: weight of the old running value, in ``[0, 1]``.
      epsilon: ``> 0``, added to the variance.
      mask: boolean array broadcastable to ``x``; only ``True`` positions enter the statistics.
        Features without a valid element keep their running statistics.
      axis_name, axis_index_groups: pool the statistics across the devices of a mapped axis
        (``shard_map``/``pmap``/``vmap``) with one ``psum`` of counts, sums and sums of squares:
        exact for any split of the valid elements.
      variance: ``"shifted"`` (one pass about a sample, no cancellation), ``"two_pass"`` or
        ``"fast"`` (flax's ``E[x^2] - E[x]^2``); see :func:`jaxstab.nn.moments`.
      renorm: Batch Renormalization (Ioffe 2017): in training, correct the batch statistics
        towards the running ones with ``r``, ``d`` from :func:`jaxstab.nn.renorm_correction`.
      r_max, d_max: renorm's clipping limits (``>= 1``, ``>= 0``), floats or schedules of
        ``stats.step`` (see :func:`jaxstab.nn.renorm_schedules`).
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017): in training, split the leading
        axis into consecutive groups of this size, each normalized with its own statistics; the
        running averages move towards the mean of the groups' statistics. With ``axis_name``,
        group ``g`` is pooled across devices. The leading axis must be divisible by it.
      unbiased_running_var: keep the running variance unbiased, ``var * n / (n - 1)``, as
        PyTorch does (normalization still uses the biased batch variance).
      dtype: output dtype; default: the result type of ``x``, ``scale``, ``bias``.
      stats_dtype: dtype of statistics and normalization; default: ``dtype`` (or ``x.dtype``)
        promoted to at least float32.

    Returns:
      ``(y, new_stats)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.nn import BatchStats, batch_norm
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> stats = BatchStats(mean=jnp.zeros(2), var=jnp.ones(2))
      >>> y, stats = batch_norm(x, stats, momentum=0.9, epsilon=1e-6)
      >>> y.round(3)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> stats.mean, stats.var
      (Array([0.2, 2. ], dtype=float32), Array([ 1. , 10.9], dtype=float32))

    References:
      Ioffe & Szegedy, `Batch Normalization <https://arxiv.org/abs/1502.03167>`_, ICML 2015.
    """
    check_hyperparameters(
        momentum=momentum,
        epsilon=epsilon,
        variance=variance,
        renorm=renorm,
        r_max=r_max,
        d_max=d_max,
        virtual_batch_size=virtual_batch_size,
    )
    x = jnp.asarray(x)
    feature_axes = canonical_axes(x.ndim, axis)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    if stats.mean.shape != feature_shape or stats.var.shape != feature_shape:
        raise ValueError(
            f"the running mean and var (num_features) have shapes {stats.mean.shape} and "
            f"{stats.var.shape}, but x.shape = {x.shape} with axis = {axis!r} has features "
            f"{feature_shape}"
        )
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    scale = None if scale is None else jnp.reshape(scale, bshape)
    bias = None if bias is None else jnp.reshape(bias, bshape)
    running_mean, running_var = stats.mean.reshape(bshape), stats.var.reshape(bshape)
    out_dtype = output_dtype(x, scale, bias, dtype=dtype)
    if stats_dtype is None:
        stats_dtype = jnp.promote_types(x.dtype if dtype is None else dtype, jnp.float32)

    if use_running_average:
        y = _normalize(x, running_mean, running_var, scale, bias, epsilon)
        return y.astype(out_dtype), stats

    groups = _groups(x, feature_axes, virtual_batch_size)
    xg = x.reshape((groups, x.shape[0] // groups, *x.shape[1:]))
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape).reshape(xg.shape)
    reduce_axes = tuple(a + 1 for a in range(x.ndim) if a not in feature_axes)
    per_feature = math.prod(xg.shape[a] for a in reduce_axes)
    if update_stats and per_feature * _num_devices(axis_name, axis_index_groups) == 1:
        raise ValueError(
            "batch statistics need more than one element per feature in training: x.shape = "
            f"{x.shape} with feature axis {axis!r}"
            + (f" and virtual_batch_size={virtual_batch_size}" if virtual_batch_size else "")
            + " leaves one (variance 0); use a larger batch or use_running_average=True"
        )
    batch = moments(
        xg,
        reduce_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        variance=variance,
        dtype=stats_dtype,
    )
    step = stats.step
    r = d = None
    if renorm:
        if uses_step(renorm, r_max, d_max) and step is None:
            raise ValueError("r_max/d_max schedules need stats.step, the training step counter")
        limit = lambda v: v(step) if callable(v) else v
        r, d = renorm_correction(
            batch.mean,
            batch.var,
            running_mean,
            running_var,
            epsilon=epsilon,
            r_max=limit(r_max),
            d_max=limit(d_max),
        )
    y = _normalize(xg, batch.mean, batch.var, scale, bias, epsilon, r, d)
    y = y.reshape(x.shape).astype(out_dtype)
    if not update_stats:
        return y, stats
    if step is not None:
        step = step + 1
    mean, var, has_data = (
        v.reshape(feature_shape) for v in _group_average(batch, unbiased_running_var)
    )
    new_mean = momentum * stats.mean + (1 - momentum) * mean
    new_var = momentum * stats.var + (1 - momentum) * var
    new_stats = BatchStats(
        lax.stop_gradient(jnp.where(has_data, new_mean, stats.mean)),
        lax.stop_gradient(jnp.where(has_data, new_var, stats.var)),
        step,
    )
    return y, new_stats


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
