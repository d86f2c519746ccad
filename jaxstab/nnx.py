"""Flax nnx layers: a drop-in ``BatchNorm`` over the pure core in :mod:`jaxstab.batchnorm`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from jaxstab.batchnorm import BatchNormConfig, BatchStats, batch_norm
from jaxstab.batchnorm._config import module_config, variance_algorithm
from jaxstab.batchnorm._renorm import Limit

_OPTIONS = frozenset(f.name for f in dataclasses.fields(BatchNormConfig))
_VARIANCE_FLAGS = ("use_fast_variance", "use_variance_shift")  # flax's flags for config.variance
_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()


class BatchNormReport(nnx.Variable):
    """How many features of the last training call kept their running statistics because the
    batch statistics were not finite (``BatchNorm(..., report=True)``; not an ``nnx.BatchStat``,
    so ``nnx.state(model, nnx.BatchStat)`` is flax's)."""


class BatchNorm(nnx.Module):
    """Batch normalization for nnx, a drop-in for ``flax.nnx.BatchNorm`` that is right.

    Same constructor and call arguments and variables as flax (``nnx.Param`` ``scale``,
    ``bias``; ``nnx.BatchStat`` ``mean``, ``var``), and the same arithmetic as
    :class:`jaxstab.linen.BatchNorm` (both call :func:`jaxstab.batchnorm.batch_norm`), so the two
    give bit-identical results. Beyond flax: no variance cancellation, statistics, running
    averages and normalization in float32 even with ``dtype=bfloat16`` (flax casts the running
    statistics, and the input, to ``dtype`` first), exact pooling across devices and masks,
    tuple feature axes, Batch Renormalization, ghost batches and PyTorch's unbiased running
    variance. See :class:`jaxstab.linen.BatchNorm` for the details.

    The options the core uses are checked at construction into ``self.config``, a static
    :class:`jaxstab.batchnorm.BatchNormConfig`; they read and write as attributes, as on flax's
    module (``bn.epsilon``; setting ``bn.momentum`` checks it into a new config).

    Args:
      num_features: the size of the feature axis, or a tuple of sizes for a tuple ``axis``.
      use_running_average: if True, normalize with the running statistics (see ``train()``,
        ``eval()``).
      axis: the feature axis or axes.
      momentum: decay of the running averages, in ``[0, 1]``.
      epsilon: ``> 0``, added to the variance.
      dtype: the output dtype (default: inferred by ``promote_dtype``).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initializers.
      axis_name, axis_index_groups: pool the statistics across devices of a mapped axis.
      use_fast_variance: one pass over the input (default) instead of two.
      promote_dtype: flax's dtype promotion of ``(x, mean, var, scale, bias)``; here it only
        decides the output dtype, the arithmetic stays in float32.
      rngs: the ``nnx.Rngs`` for the initializers.
      bias_metadata, scale_metadata: metadata for the ``nnx.Param`` variables.
      use_variance_shift: the one-pass variance subtracts a sample of the batch first (default
        True: no cancellation); False gives flax's ``E[x^2] - E[x]^2``.
      renorm, r_max, d_max: Batch Renormalization (Ioffe 2017); schedules of ``r_max``/``d_max``
        count training steps in an ``nnx.BatchStat`` ``step``.
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017).
      unbiased_running_var: keep the running variance unbiased (``n / (n - 1)``), as PyTorch.
      report: keep a :class:`BatchNormReport` ``nonfinite``: how many features the last training
        call left untouched because their batch statistics were not finite (they always are
        left untouched; this only counts them). Off by default: it adds a leaf to the state.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxstab.nnx import BatchNorm
      >>> bn = BatchNorm(6, momentum=0.9, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
      >>> x = 256.7 + 0.5 * jax.random.normal(jax.random.key(0), (32, 6))
      >>> y = bn(x)  # training: batch statistics, running averages updated
      >>> y.dtype, bool(jnp.all(bn.mean[...] > 25.0))
      (dtype(bfloat16), True)
      >>> bn.eval()
      >>> y = bn(x)  # inference: running statistics

    References:
      Ioffe & Szegedy, `Batch Normalization <https://arxiv.org/abs/1502.03167>`_, ICML 2015.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        use_variance_shift: bool = True,
        renorm: bool = False,
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
        virtual_batch_size: int | None = None,
        unbiased_running_var: bool = False,
        report: bool = False,
    ):
        self.use_fast_variance = use_fast_variance
        self.use_variance_shift = use_variance_shift
        # The core's options, taken from the arguments by name and checked: a static attribute.
        self.config = module_config(locals())
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        n_axes = 1 if isinstance(axis, int) else len(axis)
        if len(shape) != n_axes:
            raise ValueError(
                f"num_features must give one size per feature axis (axis={axis!r}), "
                f"got {num_features!r}"
            )
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.nonfinite: BatchNormReport | None = nnx.data(None)  # opt-in: a new state leaf
        if report:
            self.nonfinite = BatchNormReport(jnp.zeros((), jnp.int32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.step: nnx.BatchStat[jax.Array] | None = nnx.data(None)
        if self.config.counts_steps:
            self.step = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.scale: nnx.Param[jax.Array] | None = nnx.data(None)
        if use_scale:
            key = rngs.params()
            self.scale = nnx.Param(scale_init(key, shape, param_dtype), **scale_metadata)
        self.bias: nnx.Param[jax.Array] | None = nnx.data(None)
        if use_bias:
            key = rngs.params()
            self.bias = nnx.Param(bias_init(key, shape, param_dtype), **bias_metadata)

        self.num_features = num_features
        self.use_running_average = use_running_average
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.promote_dtype = promote_dtype

    def __getattr__(self, name: str) -> Any:
        """An option of the core reads as an attribute, as on flax's module: ``bn.epsilon``."""
        config = vars(self).get("config")
        if config is None or name not in _OPTIONS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OPTIONS:  # an option: a new config, checked like the first
            name, value = "config", dataclasses.replace(self.config, **{name: value})
        elif name in _VARIANCE_FLAGS and "config" in vars(self):  # flax's flags: a new variance
            flags = {flag: vars(self)[flag] for flag in _VARIANCE_FLAGS} | {name: value}
            variance = variance_algorithm(**flags)
            super().__setattr__("config", dataclasses.replace(self.config, variance=variance))
        super().__setattr__(name, value)

    def __call__(
        self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ):
        """Normalizes ``x`` and, in training, updates the running statistics.

        Args:
          x: the input.
          use_running_average: overrides the constructor's flag for this call.
          mask: boolean array broadcastable to ``x``: the positions that enter the statistics.

        Returns:
          The normalized input, of the same shape.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                "BatchNorm needs use_running_average: pass it to the constructor or the call, "
                "or use model.train() / model.eval()"
            )
        x = jnp.asarray(x)
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        stats = BatchStats(
            self.mean[...], self.var[...], None if self.step is None else self.step[...]
        )
        operands = (x, stats.mean, stats.var, scale, bias)
        promoted = jax.eval_shape(lambda ops: self.promote_dtype(ops, dtype=self.dtype), operands)
        y, new, nonfinite = batch_norm(
            x,
            stats,
            scale,
            bias,
            config=self.config,
            use_running_average=use_running_average,
            mask=mask,
            dtype=promoted[0].dtype,
            report=True,
        )
        if not use_running_average:
            self.mean[...], self.var[...] = new.mean, new.var
            if self.nonfinite is not None:
                self.nonfinite[...] = nonfinite
            if self.step is not None:
                self.step[...] = new.step
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view`` (and described by ``nnx.view_info``).

        Args:
          use_running_average: if given, whether to normalize with the running statistics
            (offline) instead of this batch's (online).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


__all__ = ["BatchNorm", "BatchNormReport"]
