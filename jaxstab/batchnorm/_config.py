"""The options of a batch-norm layer, held and checked in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxstab import _checks
from jaxstab._norms import AxisName
from jaxstab.batchnorm._moments import VARIANCES, Variance, canonical_axes
from jaxstab.batchnorm._renorm import Limit


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
    """The options of a batch-norm layer, checked once when the config is built.

    One frozen, hashable object that :func:`jaxstab.batchnorm.batch_norm`,
    :class:`jaxstab.linen.BatchNorm` and :class:`jaxstab.nnx.BatchNorm` share: the modules
    build it from their arguments and pass it to the core, so a bad value raises ``ValueError``
    at construction, naming it. Sequences are stored as tuples (``axis``,
    ``axis_index_groups``), so equal options give equal, equally hashed configs.

    Attributes:
      axis: the feature axis or axes; all others are reduced.
      momentum: weight of the old running value, in ``[0, 1]`` (flax's convention):
        ``running = momentum * running + (1 - momentum) * batch``.
      epsilon: ``> 0``, added to the variance.
      axis_name: inside ``shard_map``/``pmap``/``vmap``, the mapped axis name(s) to pool the
        statistics over, with one ``psum`` of counts, sums and sums of squares: exact for any
        split of the valid elements. Not needed under ``jit`` with sharded arrays.
      axis_index_groups: groups of device indices within ``axis_name`` to pool separately
        (``pmap`` only).
      variance: ``"shifted"`` (one pass about a sample of the batch, no cancellation),
        ``"two_pass"`` or ``"fast"`` (flax's ``E[x^2] - E[x]^2``); see
        :func:`jaxstab.batchnorm.moments`.
      renorm: Batch Renormalization (Ioffe 2017): in training, correct the batch statistics
        towards the running ones with ``r``, ``d`` from
        :func:`jaxstab.batchnorm.renorm_correction`.
      r_max: renorm's clipping limit on ``r``, ``>= 1``: a float or a schedule of the training
        step (see :func:`jaxstab.batchnorm.renorm_schedules`), checked at step 0.
      d_max: renorm's clipping limit on ``d``, ``>= 0``: a float or a schedule, as ``r_max``.
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017): None, or a positive int that
        splits the leading axis in training into consecutive groups of that size, each
        normalized with its own statistics (with ``axis_name``, group ``g`` pooled across
        devices); the running averages move towards the mean of the groups' statistics. It must
        divide the leading axis.
      unbiased_running_var: keep the running variance unbiased, ``var * n / (n - 1)``, as
        PyTorch does (normalization still uses the biased batch variance).

    Example:
      >>> from jaxstab.batchnorm import BatchNormConfig
      >>> config = BatchNormConfig(axis=[1, 2], momentum=0.9)
      >>> config.axis, config.feature_shape((8, 3, 4, 5))
      ((1, 2), (3, 4))
      >>> config == BatchNormConfig(axis=(1, 2), momentum=0.9)
      True
      >>> BatchNormConfig(epsilon=0.0)
      Traceback (most recent call last):
        ...
      ValueError: epsilon must be in (0.0, inf), got 0.0
    """

    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    axis_name: AxisName = None
    axis_index_groups: Any = None
    variance: Variance = "shifted"
    renorm: bool = False
    r_max: Limit = 3.0
    d_max: Limit = 5.0
    virtual_batch_size: int | None = None
    unbiased_running_var: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.axis, Sequence):
            object.__setattr__(self, "axis", tuple(self.axis))
        if isinstance(self.axis_index_groups, Sequence):
            groups = tuple(tuple(group) for group in self.axis_index_groups)
            object.__setattr__(self, "axis_index_groups", groups)
        axes = (self.axis,) if isinstance(self.axis, int) else self.axis
        if not isinstance(self.axis, int | tuple) or not all(_is_int(a) for a in axes):
            raise ValueError(f"axis must be an int or a sequence of ints, got {self.axis!r}")
        _checks.check_range("momentum", self.momentum, low=0.0, high=1.0)
        _checks.check_range("epsilon", self.epsilon, low=0.0, low_open=True)
        if self.variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {self.variance!r}")
        if self.renorm:
            for name, limit, low in (("r_max", self.r_max, 1.0), ("d_max", self.d_max, 0.0)):
                at_0 = limit(0) if callable(limit) else limit
                _checks.check_range(f"{name}(0)" if callable(limit) else name, at_0, low=low)
        size = self.virtual_batch_size
        if size is not None and not (_is_int(size) and size > 0):
            raise ValueError(f"virtual_batch_size must be None or a positive int, got {size!r}")

    @property
    def counts_steps(self) -> bool:
        """Whether the running statistics carry a ``step`` counter (renorm with a schedule)."""
        return self.renorm and (callable(self.r_max) or callable(self.d_max))

    def feature_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the statistics for an input of ``shape``: its sizes at ``axis``."""
        return tuple(shape[a] for a in canonical_axes(len(shape), self.axis))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def module_config(arguments: Mapping[str, Any]) -> BatchNormConfig:
    """The config of a flax-style ``BatchNorm`` module, from its arguments by name.

    Each field comes from the argument of the same name, and ``variance`` from flax's
    ``use_fast_variance`` (one pass instead of two) and ``use_variance_shift`` (that one pass
    about a sample of the batch, so it does not cancel): a new field needs no code here.
    """
    fields = (f.name for f in dataclasses.fields(BatchNormConfig) if f.name != "variance")
    variance = variance_algorithm(arguments["use_fast_variance"], arguments["use_variance_shift"])
    return BatchNormConfig(variance=variance, **{name: arguments[name] for name in fields})


def variance_algorithm(use_fast_variance: bool, use_variance_shift: bool) -> Variance:
    """The ``variance`` for the modules' flags: two passes unless fast, shifted unless asked not."""
    if not use_fast_variance:
        return "two_pass"
    return "shifted" if use_variance_shift else "fast"
