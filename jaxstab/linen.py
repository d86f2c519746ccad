"""Flax linen layers: a drop-in ``BatchNorm`` over the pure core in :mod:`jaxstab.batchnorm`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, Initializer

from jaxstab.batchnorm import BatchNormConfig, BatchStats, batch_norm
from jaxstab.batchnorm._config import module_config
from jaxstab.batchnorm._renorm import Limit

REPORT = "batch_norm_report"  # the collection where a training call reports refused updates


class BatchNorm(nn.Module):
    """Batch normalization, a drop-in for ``flax.linen.BatchNorm`` that is right where it is not.

    Same constructor and call arguments, defaults and variables as flax (``params``: ``scale``,
    ``bias``; ``batch_stats``: ``mean``, ``var``), so it replaces flax's in existing models,
    train states and checkpoints, with outputs equal to flax's within float32 rounding on
    ordinary data. Where flax goes wrong:

    - **No catastrophic cancellation**: the default one-pass variance is taken about a sample of
      the batch (:func:`jaxstab.batchnorm.moments`), right at any mean/std (flax's
      ``E[x^2] - E[x]^2`` is off by 1000x at mean/std = 1e5), at the same speed.
    - **Exact pooling** across devices (``axis_name``) and masks: one ``psum`` of counts, sums and
      sums of squares -- not a mean of per-device means.
    - Statistics, running averages and normalization in float32 whatever ``dtype``; only the
      output is cast.
    - **Running statistics one bad batch cannot poison**: a feature whose batch statistics are
      not finite (NaN or Inf input, or a variance past float32 such as from 1e30) keeps its
      running mean and variance (flax's turn NaN for good). A training call reports how many
      features that was as ``nonfinite`` in the collection ``jaxstab.linen.REPORT``
      (``"batch_norm_report"``), when the caller makes it mutable::

        y, updates = model.apply(variables, x, mutable=["batch_stats", REPORT])
        updates[REPORT]  # {"BatchNorm_0": {"nonfinite": Array(0, dtype=int32)}, ...}

    And more: Batch Renormalization (``renorm``), ghost batches (``virtual_batch_size``),
    PyTorch's unbiased running variance, tuple ``axis``, errors that name the bad argument.
    The options the core uses are checked at construction into ``self.config``, a
    :class:`jaxstab.batchnorm.BatchNormConfig` passed to :func:`jaxstab.batchnorm.batch_norm`.

    Attributes:
      use_running_average: if True, normalize with the running statistics (inference).
      axis: the feature axis or axes.
      momentum: decay of the running averages, in ``[0, 1]`` (flax's convention; for a PyTorch
        momentum use :func:`jaxstab.batchnorm.momentum_from_torch`).
      epsilon: ``> 0``, added to the variance.
      dtype: the output dtype (default: inferred from the input and params).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn ``bias`` (beta).
      use_scale: learn ``scale`` (gamma).
      bias_init: the initializer of ``bias``.
      scale_init: the initializer of ``scale``.
      axis_name: mapped axis name(s) to pool the statistics over (``shard_map``/``pmap``/
        ``vmap``). Not needed under ``jit`` with sharded inputs. Ignored during ``init``.
      axis_index_groups: groups of device indices to pool separately (``pmap`` only).
      use_fast_variance: one pass over the input (default, as flax) instead of two.
      force_float32_reductions: flax's flag: False computes the statistics in the input dtype
        and stores the running statistics in ``param_dtype``.
      use_variance_shift: the one pass subtracts a per-feature sample of the batch first (default
        True: no cancellation). False takes flax's ``E[x^2] - E[x]^2`` (to rounding, ~1e-7).
      renorm: Batch Renormalization (Ioffe 2017) in training.
      r_max: renorm's limit on ``r``, ``>= 1``: a float or an optax schedule of the training
        step, then counted in ``batch_stats['step']`` (:func:`jaxstab.batchnorm.renorm_schedules`
        gives the paper's ramp).
      d_max: renorm's limit on ``d``, ``>= 0``: a float or a schedule, as ``r_max``.
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017): in training, each group of this
        many consecutive examples along the leading axis is normalized with its own statistics.
        It must divide the batch. Not applied during ``init``.
      unbiased_running_var: keep the running variance unbiased (``n / (n - 1)``), as PyTorch.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxstab.linen import BatchNorm
      >>> bn = BatchNorm(momentum=0.9)
      >>> x = 1e5 + jax.random.normal(jax.random.key(0), (64, 3))
      >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
      >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
      >>> bool(jnp.allclose(y.std(0), 1.0, atol=1e-3))  # flax.linen.BatchNorm: 0.02 to 283
      True
      >>> jax.tree.map(jnp.shape, updates)
      {'batch_stats': {'mean': (3,), 'var': (3,)}}

    References:
      Ioffe & Szegedy, `Batch Normalization <https://arxiv.org/abs/1502.03167>`_, ICML 2015;
      Ioffe, `Batch Renormalization <https://arxiv.org/abs/1702.03275>`_, NeurIPS 2017;
      Hoffer et al., `Train longer, generalize better <https://arxiv.org/abs/1705.08741>`_,
      NeurIPS 2017.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    use_variance_shift: bool = True
    renorm: bool = False
    r_max: Limit = 3.0
    d_max: Limit = 5.0
    virtual_batch_size: int | None = None
    unbiased_running_var: bool = False

    def __post_init__(self) -> None:
        # The core's options, checked here: a bad one raises at construction. Not a field, so
        # it stays out of the module's hash, equality and clone arguments.
        object.__setattr__(self, "config", module_config(vars(self)))
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ):
        """Normalizes ``x`` and, in training outside ``init``, updates ``batch_stats``.

        Args:
          x: the input.
          use_running_average: overrides the attribute (one of them must be set).
          mask: boolean array broadcastable to ``x``: the positions that enter the statistics.

        Returns:
          The normalized input, of the same shape.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x)
        config: BatchNormConfig = self.config
        features = config.feature_shape(x.shape)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        mean = self.variable("batch_stats", "mean", jnp.zeros, features, stats_dtype)
        var = self.variable("batch_stats", "var", jnp.ones, features, stats_dtype)
        step = None
        if config.counts_steps:
            step = self.variable("batch_stats", "step", jnp.zeros, (), jnp.int32)
        scale = bias = None
        if self.use_scale:
            scale = self.param("scale", self.scale_init, features, self.param_dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, self.param_dtype)

        initializing = self.is_initializing()
        if initializing:  # as flax: init runs outside any mapped axis, on any batch
            config = dataclasses.replace(config, axis_name=None, virtual_batch_size=None)
        y, new, nonfinite = batch_norm(
            x,
            BatchStats(mean.value, var.value, None if step is None else step.value),
            scale,
            bias,
            config=config,
            use_running_average=use_running_average,
            update_stats=not initializing,
            mask=mask,
            dtype=self.dtype,
            stats_dtype=None
            if self.force_float32_reductions
            else (x.dtype if self.dtype is None else self.dtype),
            report=True,
        )
        if not (use_running_average or initializing):
            mean.value, var.value = new.mean, new.var
            if step is not None:
                step.value = new.step
            self.sow(REPORT, "nonfinite", nonfinite, init_fn=lambda: 0, reduce_fn=lambda _, n: n)
        return y


__all__ = ["REPORT", "BatchNorm"]
