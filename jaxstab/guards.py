"""Guards: skip a bad step without damaging the optimizer, and dynamic loss scaling for float16.

- :func:`skip_anomalies` wraps any optax transformation and skips steps whose gradients are
  non-finite, too large, or a statistical outlier; a skipped step leaves the inner state exactly
  as it was.
- :class:`DynamicLossScale` (made by :func:`dynamic_loss_scale`) scales the loss so float16
  gradients do not underflow, and lowers the scale after an overflow; :func:`all_finite` tells
  whether a step overflowed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import _checks, _inplace, _norms, _stats
from jaxstab._norms import AxisName
from jaxstab.telemetry import telemetry_state


def _zero_if(skip: jax.Array, tree):
    """``tree`` with every numeric or bool leaf replaced by zeros of its dtype where ``skip``."""

    def zero(x):
        x = jnp.asarray(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
            return x  # PRNG keys and other extended dtypes have no zero
        return jax.lax.select(skip, jnp.zeros_like(x), x)

    return jax.tree.map(zero, tree)


def _update_or_keep(inner, skip, updates, state, params, extra_args):
    """``inner.update(...)``, with the new state ``select(skip, state, new_state)`` leaf by leaf,
    selected where the inner update computes it (see :mod:`jaxstab._inplace`), so that the
    updates are computed from the selected state; the updates still need zeroing."""
    olds = jax.tree.leaves(state)

    def keep(shapes):
        new_updates, new_state = shapes
        if len(jax.tree.leaves(new_state)) != len(olds):
            raise ValueError(
                "skip_anomalies: the inner update returned a state of structure "
                f"{jax.tree.structure(new_state)} for one of structure {jax.tree.structure(state)}"
            )
        return [None] * len(jax.tree.leaves(new_updates)) + olds

    update = lambda u, s: inner.update(u, s, params, **extra_args)
    return _inplace.call_keeping(update, (updates, state), keep, _inplace.Verdict(skip))


@telemetry_state("skip_anomalies", ("skipped", "skipped_total", "grad_norm", "threshold"))
class SkipAnomaliesState(NamedTuple):
    """State of :func:`skip_anomalies`: the inner state, norm statistics and telemetry."""

    inner_state: Any  # the wrapped transformation's state, untouched by skipped steps
    stats: _stats.MeanVar  # samples, mean and variance of accepted norms
    skipped: jax.Array  # bool, whether this step was skipped
    skipped_total: jax.Array  # int32, steps skipped so far
    grad_norm: jax.Array  # float32 global norm of this step's gradients
    threshold: jax.Array  # float32 largest norm accepted this step (+inf in warm-up)
    skip_run: jax.Array  # int32, z-score skips in a row up to this step
    peak: jax.Array  # float32 largest accepted norm, halving every ``peak_half_life`` samples


def skip_anomalies(
    inner: optax.GradientTransformation,
    *,
    z_threshold: float | jax.Array = 6.0,
    decay: float | jax.Array = 0.99,
    warmup_steps: int | jax.Array = 25,
    max_norm: float | jax.Array | None = None,
    eps: float | jax.Array = 1e-6,
    max_skip_run: int | None = None,
    peak_ratio: float | jax.Array | None = 3.0,
    peak_half_life: float | jax.Array = 3000.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that anomalous steps are skipped: zero update, inner state unchanged.

    A step is skipped when its gradients are not all finite, when their global norm exceeds
    ``max_norm`` (if given), or -- after ``warmup_steps`` accepted steps -- when the norm is an
    outlier twice over: its z-score ``(g - mean) / (std + eps)`` against running statistics
    exceeds ``z_threshold``, and it exceeds ``peak_ratio`` times the peak, the largest accepted
    norm with each older one counting half every ``peak_half_life`` accepted steps. A
    skipped step returns all-zero updates (every numeric leaf, in its dtype, integers too) and
    the inner optimizer's state exactly as it was (bit for bit: Adam's moments and step count do
    not move), so the step never happened. An accepted step returns what ``inner`` returns, and
    each state leaf keeps the sharding ``inner`` gives it. This holds for any inner
    transformation, with or without extra arguments (``value=``, ``grad=``, ``value_fn=``...,
    passed through).

    The statistics are those of :func:`jaxstab.zscore_clip` (exact mean and variance over the
    warm-up, EMAs with ``decay`` after, a standard deviation of at least 1% of the mean) and learn
    from accepted norms. A non-finite or over ``max_norm`` step never touches them, so unlike the
    skip wrappers that keep a window of raw norms, one NaN does not make the following healthy
    steps look anomalous; nor does a step with exactly zero gradient (it counts neither for the
    statistics nor for the warm-up). A step skipped for its z-score enters them clipped to the
    threshold: a few spikes only widen the band, and a lasting change of the norm's level (a new
    data mix, unfrozen layers) is learned instead of skipping every later step -- with the
    defaults, after a warm-up of equal norms, a jump by 1000x within 70 steps (a jump by up to 3x
    is not skipped at all: it does not exceed three times the peak; with ``peak_ratio=None``, a
    jump by 2x is learned within 25).

    The peak is what keeps the guard off healthy runs. Minibatch gradient norms are heavy-tailed
    -- with small batches, or once a model fits most examples, an ordinary step can be a thousand
    times the median -- and a z-score against about 100 steps of history takes such a step for an
    outlier. Without the peak, on healthy runs of 10,000 steps (``benchmarks/guard_health.py``)
    the guard skipped 23 steps of a batch-4 regression MLP, 103 of a batch-16 BatchNorm MLP and 5
    of a GRU; with it, none in 80,000 steps of these and the char-level transformer (three seeds
    of the first two), no healthy norm above 0.59 of its threshold after step 100. The price
    is sensitivity where healthy norms are that wild: replayed through the guard's statistics,
    a corrupted batch (random labels, targets or bytes) at the same parameters exceeds the
    threshold at 52-92% of the steps of the regression, GRU and transformer runs, and 9-27% of
    the BatchNorm ones, whose healthy norms reach 2,700 times their median. Bursts of bad data
    are :func:`jaxstab.spike_recovery`'s to catch, by the loss.

    The same learning lets a *sustained burst* of anomalous steps talk the guard into accepting
    it: each skipped norm widens the band, and a burst of corrupted batches with norms 10x the
    usual is skipped for only about its first dozen steps. ``max_skip_run=R`` holds the band
    still through runs of up to ``R`` consecutive z-score skips (their norms do not feed the
    statistics), so a burst of up to ``R`` steps is skipped whole; a longer run is taken for a
    lasting change of level and learned as above, ``R`` steps later. Choose ``R`` as the longest
    burst to wait out (e.g. 64); a genuine change of level then costs ``R`` more skipped steps.
    For bursts that get through anyway, :func:`jaxstab.spike_recovery` rolls back.

    Cost: one global norm, and one select per inner-state leaf with a scalar predicate. On the
    fast path, which every optimizer of optax takes, each select sits where the inner update
    computes the new value, so XLA fuses it into the inner optimizer's own elementwise update and
    writes the state in place, with no copy of the donated state. The fast path traces the inner
    update once and evaluates it again with the selects inserted: inside a nested ``jax.jit``
    only when inlining that call loses nothing (no shardings, layouts, donation or compiler
    options) and the value is computed inside it and returned once, otherwise right after the
    call or control-flow construct that returns it. It is not taken when the inner update has
    side effects (callbacks, debug prints), cannot be traced to a jaxpr (Python control flow on
    values, outside ``jit``), or when its re-evaluation fails or gives an output of another type:
    then ``inner.update`` runs as it is (its side effects run once, its errors are its own) and
    every state leaf is selected after it -- as correct, at the cost of a copy of the state.

    Args:
      inner: the transformation to guard, e.g. ``optax.adam(1e-3)``.
      z_threshold: z-score above which a step is skipped; ``> 0``.
      decay: EMA decay of the norm statistics, in ``[0, 1)``.
      warmup_steps: accepted nonzero steps that seed the statistics before z-scores are judged;
        ``>= 0`` (0 acts as 1; ``float("inf")``: never, only non-finite and ``max_norm`` skips).
      max_norm: optional fixed bound: steps with a larger global norm are skipped; ``>= 0``.
      eps: added to the standard deviation in the z-score; ``>= 0``.
      max_skip_run: optional longest run of z-score skips that leaves the statistics alone;
        ``>= 0`` (``None``: every skipped norm feeds them, clipped to the threshold).
      peak_ratio: a norm must also exceed this multiple of the peak to be skipped for its
        z-score; ``>= 0`` (``None`` or 0: the z-score alone decides).
      peak_half_life: accepted nonzero steps over which an accepted norm's weight in the peak
        halves; ``> 0``.
      axis_name: inside ``shard_map``/``pmap`` with the tree sharded across devices, the mapped
        axis name(s): the norm becomes global with one ``psum``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state wraps ``inner``'s and holds
      ``skipped``, ``skipped_total``, ``grad_norm``, ``threshold`` (see :func:`jaxstab.telemetry`).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxstab.guards import skip_anomalies
      >>> tx = skip_anomalies(optax.adam(0.1), warmup_steps=2)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> for g in [1.0, 1.2, jnp.nan, 1.1]:
      ...     updates, state = tx.update({"w": jnp.full(2, g)}, state, params)
      ...     print(bool(state.skipped), updates["w"][0] != 0)
      False True
      False True
      True False
      False True
      >>> int(state.inner_state[0].count)  # Adam saw 3 steps: the NaN step never happened
      3
    """
    _checks.check_transformation("inner", inner)
    _checks.check_range("z_threshold", z_threshold, low=0, low_open=True)
    _checks.check_range("decay", decay, low=0, high=1, high_open=True)
    _checks.check_range("warmup_steps", warmup_steps, low=0)
    _checks.check_range("eps", eps, low=0)
    if max_norm is not None:
        _checks.check_range("max_norm", max_norm, low=0)
    if max_skip_run is not None:
        _checks.check_range("max_skip_run", max_skip_run, low=0)
    if peak_ratio is not None:
        _checks.check_range("peak_ratio", peak_ratio, low=0)
    _checks.check_range("peak_half_life", peak_half_life, low=0, low_open=True)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        zero = lambda: jnp.zeros((), jnp.float32)  # distinct buffers: states get donated
        return SkipAnomaliesState(
            inner.init(params),
            _stats.mean_var_init(),
            jnp.zeros((), bool),
            jnp.zeros((), jnp.int32),
            zero(),
            zero(),
            jnp.zeros((), jnp.int32),
            zero(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        norm = _norms.global_norm(updates, axis_name=axis_name)
        stats = state.stats
        z_limit = _stats.z_limit(stats, z_threshold, eps, warmup_steps)
        threshold = z_limit
        if peak_ratio is not None:
            threshold = jnp.maximum(threshold, _stats.as_f32(peak_ratio) * state.peak)
        learn = jnp.isfinite(norm)
        if max_norm is not None:
            threshold = jnp.minimum(threshold, _stats.as_f32(max_norm))
            learn &= norm <= _stats.as_f32(max_norm)
        skip = ~(jnp.isfinite(norm) & (norm <= threshold))
        # The inner update sees ``g`` zeroed on a skipped step, not ``g``: fed ``g`` itself, XLA
        # merges Adam's ``g * g`` with the norm's (common subexpressions) and writes it out as a
        # full array.
        inner_updates, inner_state = _update_or_keep(
            inner, skip, _zero_if(skip, updates), state.inner_state, params, extra_args
        )
        z_skip = skip & learn  # finite and under max_norm: skipped for its z-score
        run = jnp.where(z_skip, state.skip_run + 1, 0)
        if max_skip_run is not None:
            learn &= ~z_skip | (run > _stats.step_count(max_skip_run))
        stats = _stats.mean_var_update(
            stats, jnp.minimum(norm, z_limit), decay=decay, warmup_steps=warmup_steps, accept=learn
        )
        new_state = SkipAnomaliesState(
            inner_state,
            stats,
            skip,
            state.skipped_total + skip.astype(jnp.int32),
            _stats.as_f32(norm),  # float64 for float64 trees: the state keeps init's dtype
            threshold,
            run,
            _stats.peak_update(state.peak, norm, peak_half_life, accept=~skip),
        )
        return _zero_if(skip, inner_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Dynamic loss scaling


def all_finite(tree, *, axis_name: AxisName = None) -> jax.Array:
    """Whether every floating-point value in ``tree`` is finite, as a bool scalar.

    With ``axis_name`` (inside ``shard_map``/``pmap``) the answer covers every device's shard.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.guards import all_finite
      >>> bool(all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}))
      False
    """
    leaves = _norms.float_leaves(tree)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True
    ok = jnp.asarray(ok)
    if axis_name is not None:
        with _checks.mapped_axis(axis_name):
            ok = jax.lax.pmin(ok.astype(jnp.int32), axis_name).astype(bool)
    return ok


class DynamicLossScale(NamedTuple):
    """A dynamic loss scale for float16 training: a pytree of five arrays.

    Multiply the loss by the scale before differentiating (:meth:`scale`) so small float16
    gradients do not flush to zero(), divide the gradients by it (:meth:`unscale`), then
    :meth:`adjust` it: after ``period`` finite steps in a row it grows by ``factor``; after a step
    with an overflow it shrinks by ``factor``, never below ``min_scale``. Every field is an array
    leaf, so the configuration survives ``jit``, ``tree_map``, flatten/unflatten and checkpoints
    (``flax.serialization``, orbax) unchanged -- jmp's ``DynamicLossScale`` drops its minimum
    there. Make one with :func:`dynamic_loss_scale`.
    """

    loss_scale: jax.Array  # float32, the current scale
    counter: jax.Array  # int32, finite steps since the scale last changed
    period: jax.Array  # int32, finite steps between growths
    factor: jax.Array  # float32, growth and shrink factor
    min_scale: jax.Array  # float32, floor of the scale

    def scale(self, tree):
        """``tree`` (the loss, or any pytree) times the loss scale, each leaf in its dtype."""
        return _norms.scale_tree(tree, self.loss_scale)

    def unscale(self, tree):
        """``tree`` (the gradients) divided by the loss scale, each leaf in its dtype."""
        return _norms.scale_tree(tree, 1.0 / self.loss_scale)

    def adjust(self, grads_finite) -> DynamicLossScale:
        """The next loss scale, given whether this step's (unscaled) gradients were all finite."""
        grads_finite = jnp.asarray(grads_finite)
        counter = self.counter + 1
        due = counter >= self.period
        grown = self.loss_scale * self.factor
        grown = jnp.where(due & jnp.isfinite(grown), grown, self.loss_scale)
        shrunk = jnp.maximum(self.loss_scale / self.factor, self.min_scale)
        return self._replace(
            loss_scale=jnp.where(grads_finite, grown, shrunk),
            counter=jnp.where(grads_finite & ~due, counter, 0),
        )


def dynamic_loss_scale(
    initial_scale: float = 2.0**15,
    *,
    period: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
) -> DynamicLossScale:
    """A :class:`DynamicLossScale` starting at ``initial_scale``.

    Combine it with :func:`skip_anomalies` so an overflow step is both skipped (the optimizer
    never sees it) and answered by a lower scale.

    Args:
      initial_scale: the starting scale, ``>= min_scale``; a power of 2 keeps scaling exact.
      period: finite steps in a row after which the scale grows; ``>= 1``.
      factor: growth and shrink factor; ``>= 1``.
      min_scale: the scale never goes below this; ``> 0``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxstab.guards import dynamic_loss_scale, skip_anomalies, all_finite
      >>> loss_fn = lambda p, x: jnp.sum((p["w"] * x) ** 2).astype(jnp.float16)
      >>> params = {"w": jnp.ones(2, jnp.float16)}
      >>> tx = skip_anomalies(optax.sgd(0.1))
      >>> opt_state, loss_scale = tx.init(params), dynamic_loss_scale(2.0**15)
      >>> @jax.jit
      ... def train_step(params, opt_state, loss_scale, x):
      ...     grads = jax.grad(lambda p: loss_scale.scale(loss_fn(p, x)))(params)
      ...     grads = loss_scale.unscale(grads)
      ...     loss_scale = loss_scale.adjust(all_finite(grads))  # halve after an overflow
      ...     updates, opt_state = tx.update(grads, opt_state, params)  # skip it
      ...     return optax.apply_updates(params, updates), opt_state, loss_scale
      >>> x = jnp.array([1.0, 2.0], jnp.float16)
      >>> params, opt_state, loss_scale = train_step(params, opt_state, loss_scale, x)
      >>> bool(opt_state.skipped), float(loss_scale.loss_scale)  # 8 * 2**15 overflows float16
      (True, 16384.0)
      >>> params["w"]  # unchanged
      Array([1., 1.], dtype=float16)

    References:
      Micikevicius et al., `Mixed Precision Training <https://arxiv.org/abs/1710.03740>`_,
      ICLR 2018.
    """
    _checks.check_range("min_scale", min_scale, low=0, low_open=True)
    _checks.check_range("initial_scale", initial_scale, low=min_scale)
    _checks.check_range("period", period, low=1)
    _checks.check_range("factor", factor, low=1)
    return DynamicLossScale(
        jnp.asarray(initial_scale, jnp.float32),
        jnp.zeros((), jnp.int32),
        jnp.asarray(period, jnp.int32),
        jnp.asarray(factor, jnp.float32),
        jnp.asarray(min_scale, jnp.float32),
    )
