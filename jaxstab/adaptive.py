"""Adaptive clipping: thresholds learned from the run's own gradient norms.

- :func:`zscore_clip` (ZClip): clip norms whose z-score against running statistics is too high.
- :func:`quantile_clip` (AutoClip): clip to a running quantile of past norms.
- :func:`adagc` (AdaGC): per-tensor thresholds from an EMA of each tensor's clipped norm.

The statistics live in :mod:`jaxstab._stats`: float32, inside the graph (nothing returns to
Python, whole runs under ``lax.scan``), and immune to non-finite steps, which give a zero update
and leave every statistic untouched, and to zero-gradient steps, which never drive a threshold to
zero.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import _checks, _norms, _stats
from jaxstab._norms import AxisName
from jaxstab.telemetry import telemetry_state

_MODES = ("reciprocal", "threshold", "mean")


def _check_common(decay, warmup_steps):
    _checks.check_range("decay", decay, low=0, high=1, high_open=True)
    _checks.check_range("warmup_steps", warmup_steps, low=0)


# --------------------------------------------------------------------------------------------
# ZClip


@telemetry_state("zscore_clip", ("grad_norm", "scale", "clipped", "threshold"))
class ZScoreClipState(NamedTuple):
    """State of :func:`zscore_clip`: running statistics and this step's telemetry."""

    stats: _stats.MeanVar  # samples, mean and variance of the finite nonzero norms (clipped)
    grad_norm: jax.Array  # float32 global norm of the incoming updates
    scale: jax.Array  # float32 factor applied (1 = untouched, 0 = non-finite step zeroed)
    clipped: jax.Array  # bool, whether the factor was below 1
    threshold: jax.Array  # float32 largest norm left untouched this step (+inf in warm-up)


def zscore_clip(
    z_threshold: float | jax.Array = 2.5,
    *,
    decay: float | jax.Array = 0.97,
    warmup_steps: int | jax.Array = 25,
    mode: str = "reciprocal",
    max_norm: float | jax.Array | None = None,
    eps: float | jax.Array = 1e-6,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Z-score clipping (ZClip): clips gradient norms that are outliers of the run's own history.

    The first ``warmup_steps`` finite, nonzero steps are left alone (except by ``max_norm``) while
    their norms seed the mean ``mu`` and population variance ``var``, accumulated in float32 inside
    the graph (Welford's recurrence, no buffer). After that, with ``sd = max(sqrt(var), mu / 100)``,
    a norm ``g`` with ``z = (g - mu) / (sd + eps) > z_threshold`` is clipped to ``tau``:

    - ``mode="reciprocal"`` (ZClip's adaptive scaling):
      ``tau = mu + z_threshold**2 * sd / z``, so larger spikes are clipped harder;
    - ``mode="threshold"``: ``tau = mu + z_threshold * sd``;
    - ``mode="mean"``: ``tau = mu``.

    ``max_norm``, if given, caps the result too. The statistics then follow exponential moving
    averages of ``v = min(g, threshold)``, where ``threshold = mu + z_threshold * (sd + eps)`` is
    the largest norm left untouched: ``mu <- decay * mu + (1 - decay) * v`` and
    ``var <- decay * var + (1 - decay) * (v - mu)**2`` with the new ``mu``.

    Three departures from the reference implementation, each a way it stops training for good:

    - ZClip learns the clipped value ``tau``, which in ``"reciprocal"`` and ``"mean"`` modes is
      about ``mu`` for a large jump, and uses ``sd = sqrt(var)``, which is 0 after a warm-up of
      equal norms: a lasting rise of the norm's level is then clipped back forever. Here a
      clipped step raises the mean by at least a factor ``1 + (1 - decay) * z_threshold / 100``
      and widens the band geometrically, so a lasting change of level is learned in a number of
      steps that grows with its logarithm. With the defaults, after a warm-up of equal norms, a
      jump by 2x stops being clipped within 60 steps, by 1000x within 160 steps; on ordinary
      histories (spread above 1% of the mean) the clip is ZClip's.
    - A step whose gradient is exactly zero (a frozen model, a masked step) is not a sample: it
      counts neither for the statistics nor for the warm-up, instead of driving both to 0.
    - A NaN/Inf step gives an all-zero update and leaves the statistics (and the warm-up count)
      untouched instead of poisoning them forever.

    Nothing leaves the device: a whole run works under ``jit`` and ``lax.scan``. ``warmup_steps=0``
    acts as 1 (the statistics need one norm); ``float("inf")`` means warm-up never ends. The update
    is one scalar multiply, fused into the optimizer's.

    Args:
      z_threshold: z-score above which a norm is clipped; ``> 0``.
      decay: EMA decay of the statistics (ZClip's ``alpha``), in ``[0, 1)``.
      warmup_steps: finite, nonzero steps that seed the statistics before any clipping;
        ``>= 0``, possibly ``float("inf")``.
      mode: ``"reciprocal"``, ``"threshold"`` or ``"mean"`` (see above).
      max_norm: optional fixed cap on the global norm, applied at every step (warm-up included).
      eps: added to the standard deviation in the z-score; ``>= 0``.
      axis_name: inside ``shard_map``/``pmap`` with the tree sharded across devices, the mapped
        axis name(s): the norm becomes global with one ``psum``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds the statistics and
      ``grad_norm``, ``scale``, ``clipped``, ``threshold`` (see :func:`jaxstab.telemetry`). The
      float hyperparameters may be injected with ``optax.inject_hyperparams``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.adaptive import zscore_clip
      >>> tx = zscore_clip(z_threshold=2.5, warmup_steps=3)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for norm in [1.0, 1.1, 0.9, 1.0, 10.0]:  # warm-up, then a spike
      ...     updates, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
      >>> round(float(state.threshold), 3)  # mu + 2.5 sigma of the norms so far
      1.201
      >>> float(state.grad_norm), round(float(updates["w"][0]), 3)  # 10 clipped to mu + 0.004
      (10.0, 1.004)

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025.
    """
    _checks.check_range("z_threshold", z_threshold, low=0, low_open=True)
    _check_common(decay, warmup_steps)
    _checks.check_range("eps", eps, low=0)
    if max_norm is not None:
        _checks.check_range("max_norm", max_norm, low=0)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")

    def init_fn(params):
        del params
        zero = lambda: jnp.zeros((), jnp.float32)  # distinct buffers: states get donated
        return ZScoreClipState(
            _stats.mean_var_init(), zero(), jnp.ones((), jnp.float32), jnp.zeros((), bool), zero()
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        z_thr = _stats.as_f32(z_threshold)
        norm = _norms.global_norm(updates, axis_name=axis_name)
        stats = state.stats
        mu, sd = stats.mean, _stats.spread(stats)
        limit = _stats.z_limit(stats, z_thr, eps, warmup_steps)  # +inf in warm-up
        over = norm > limit
        if mode == "reciprocal":
            z = (norm - mu) / (sd + _stats.as_f32(eps))
            tau = mu + z_thr * z_thr * sd / jnp.where(over, z, 1.0)
        elif mode == "threshold":
            tau = mu + z_thr * sd
        else:
            tau = mu
        target = jnp.where(over, tau, norm)  # min(g, tau): tau < g whenever over
        threshold = limit
        if max_norm is not None:
            target = jnp.minimum(target, _stats.as_f32(max_norm))
            threshold = jnp.minimum(threshold, _stats.as_f32(max_norm))
        scale = _norms.clip_factor(norm, target)
        stats = _stats.mean_var_update(
            stats,
            jnp.minimum(norm, limit),  # an Inf norm would be learned as the limit
            decay=decay,
            warmup_steps=warmup_steps,
            accept=jnp.isfinite(norm),
        )
        new_state = ZScoreClipState(
            stats, _stats.as_f32(norm), _stats.as_f32(scale), scale < 1, _stats.as_f32(threshold)
        )
        return _norms.scale_tree(updates, scale), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# AutoClip


@telemetry_state("quantile_clip", ("grad_norm", "scale", "clipped", "threshold"))
class QuantileClipState(NamedTuple):
    """State of :func:`quantile_clip`: a streaming quantile and this step's telemetry."""

    quantile: _stats.P2Quantile  # P-square estimator over the finite norms (16 numbers)
    grad_norm: jax.Array  # float32 global norm of the incoming updates
    scale: jax.Array  # float32 factor applied (1 = untouched, 0 = non-finite step zeroed)
    clipped: jax.Array  # bool, whether the factor was below 1
    threshold: (
        jax.Array
    )  # float32 quantile of past norms the update was clipped to (+inf in warm-up)


def quantile_clip(
    quantile: float | jax.Array = 0.9,
    *,
    warmup_steps: int | jax.Array = 25,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Quantile clipping (AutoClip): clips the global norm to a running quantile of past norms.

    After ``warmup_steps`` finite, nonzero steps (left alone), each update is clipped to global norm
    ``q``, the ``quantile`` of all past finite norms, so about ``1 - quantile`` of the steps are
    clipped. AutoClip keeps every past norm (memory grows with the run); here the quantile is
    streamed by the P-square algorithm (Jain & Chlamtac 1985): 5 markers, 16 numbers of state
    whatever the run length or model size, run on the norms' logarithms (so one huge spike moves
    it by its logarithm only). The first 5 norms give their exact quantile.

    Accuracy: on 3000 i.i.d. norms (log-normal, exponential, uniform, Pareto; quantiles 0.1 to
    0.99; 10 seeds each) the final estimate's rank among all norms is within 0.3 points of
    ``quantile`` on average (0.7 at worst), and the share of steps 1000-3000 that get clipped is
    within 0.7 points of ``1 - quantile``; a norm of 1e30 in the stream moves the estimate by
    under 3%. A non-finite step gives an all-zero update and does not enter the estimate; nor does
    a step whose gradient is exactly zero, which counts for the warm-up neither (a run of such
    steps would otherwise pull the quantile toward float32's smallest value and clip the next
    real steps to nothing).

    Args:
      quantile: which quantile of past norms to clip to, in ``(0, 1)``; may be injected with
        ``optax.inject_hyperparams``.
      warmup_steps: finite, nonzero steps that only feed the estimate before any clipping;
        ``>= 0``, possibly ``float("inf")`` (never clip).
      axis_name: inside ``shard_map``/``pmap`` with the tree sharded across devices, the mapped
        axis name(s): the norm becomes global with one ``psum``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds the estimator and
      ``grad_norm``, ``scale``, ``clipped``, ``threshold`` (see :func:`jaxstab.telemetry`).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.adaptive import quantile_clip
      >>> tx = quantile_clip(0.5, warmup_steps=3)
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> for norm in [1.0, 2.0, 3.0, 10.0]:
      ...     updates, state = tx.update({"w": jnp.array([norm])}, state)
      >>> updates["w"], bool(state.clipped)  # clipped to the median of 1, 2, 3 (log scale)
      (Array([2.], dtype=float32), True)

    References:
      Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source Separation Networks
      <https://arxiv.org/abs/2007.14469>`_, MLSP 2020. Jain & Chlamtac, `The P² algorithm for
      dynamic calculation of quantiles and histograms without storing observations
      <https://doi.org/10.1145/4372.4378>`_, CACM 1985.
    """
    _checks.check_range("quantile", quantile, low=0, high=1, low_open=True, high_open=True)
    _checks.check_range("warmup_steps", warmup_steps, low=0)

    def init_fn(params):
        del params
        zero = lambda: jnp.zeros((), jnp.float32)  # distinct buffers: states get donated
        return QuantileClipState(
            _stats.p2_init(), zero(), jnp.ones((), jnp.float32), jnp.zeros((), bool), zero()
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = _norms.global_norm(updates, axis_name=axis_name)
        est = state.quantile
        ready = est.samples >= _stats.step_count(warmup_steps)
        threshold = jnp.where(ready, _stats.p2_estimate(est, quantile), jnp.inf)
        scale = _norms.clip_factor(norm, threshold)
        est = _stats.p2_update(est, norm, quantile)
        new_state = QuantileClipState(
            est, _stats.as_f32(norm), _stats.as_f32(scale), scale < 1, threshold
        )
        return _norms.scale_tree(updates, scale), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# AdaGC


@telemetry_state("adagc", ("grad_norm", "clip_fraction", "nonfinite"))
class AdagcState(NamedTuple):
    """State of :func:`adagc`: per-tensor thresholds and this step's telemetry."""

    finite_steps: jax.Array  # int32, finite steps seen (`count` is the optimizer's)
    ema: tuple[jax.Array, ...]  # per float tensor (flatten order): float32 EMA of its clipped
    # norm (+inf: none yet). A tuple of scalars, not a vector: a vector sliced into every tensor's
    # update makes XLA's compile time grow quadratically with the number of tensors.
    grad_norm: jax.Array  # float32 global norm of the incoming updates
    clip_fraction: jax.Array  # float32 share of tensors whose update was scaled down
    nonfinite: jax.Array  # float32 number of tensors zeroed as non-finite (thresholds kept)


def adagc(
    relative: float | jax.Array = 1.05,
    *,
    decay: float | jax.Array = 0.98,
    warmup_steps: int | jax.Array = 100,
    warmup_max_norm: float | jax.Array = 1.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """AdaGC: per-tensor adaptive clipping against an EMA of each tensor's own clipped norm.

    During the first ``warmup_steps`` finite steps the update is clipped to global norm
    ``warmup_max_norm`` and each tensor's threshold ``ema`` is the minimum of its clipped norms.
    After that each tensor ``i`` is scaled on its own by
    ``h_i = min(1, relative * ema_i / norm_i)`` and ``ema_i <- decay * ema_i + (1 - decay) *
    norm_i * h_i``, so a spike in one tensor clips that tensor only, and a lasting rise of a
    tensor's norm is learned at the rate the paper chose: while clipped, its threshold grows by a
    factor ``1 + (1 - decay) * (relative - 1)`` per step (2x takes 645 steps with the defaults).
    Defaults are the paper's (``lambda_rel = 1.05``, ``beta = 0.98``, 100 warm-up steps with
    ``lambda_abs = 1.0``).

    Two guards the paper lacks: a tensor whose gradient is not finite (a NaN/Inf, or a norm past
    float32) gets an all-zero update and keeps its threshold, while the other tensors step as
    usual (``nonfinite`` counts such tensors; during warm-up the global clip uses the finite
    tensors' norm); and a tensor whose gradient is exactly zero (a zero-initialised branch
    such as LoRA's ``A`` before ``B`` moves, an MoE expert that got no tokens) leaves its threshold
    alone, instead of driving it to 0 and freezing that tensor for good. A tensor's first nonzero
    norm seeds its threshold unclipped. A step counts towards the warm-up unless no tensor was
    finite. To skip the *whole step* on a non-finite value instead, wrap the chain in
    :func:`jaxstab.skip_anomalies`.

    Args:
      relative: per-tensor threshold as a multiple of its EMA (``lambda_rel``); ``> 0``.
      decay: EMA decay (``beta``), in ``[0, 1)``.
      warmup_steps: finite steps of global clipping that seed the thresholds; ``>= 0``, possibly
        ``float("inf")`` (a global clip for good).
      warmup_max_norm: global-norm bound during warm-up (``lambda_abs``); ``>= 0``.
      axis_name: inside ``shard_map``/``pmap`` with the tree sharded across devices, the mapped
        axis name(s): each tensor's norm becomes global with one ``psum``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds one float32 threshold per
      tensor and ``grad_norm``, ``clip_fraction``, ``nonfinite`` (see
      :func:`jaxstab.telemetry`). The float hyperparameters may be injected with
      ``optax.inject_hyperparams``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.adaptive import adagc
      >>> tx = adagc(warmup_steps=2, warmup_max_norm=10.0)
      >>> grads = {"a": jnp.array([1.0]), "b": jnp.array([1.0])}
      >>> state = tx.init(grads)
      >>> for _ in range(3):
      ...     _, state = tx.update(grads, state)
      >>> spike = {"a": jnp.array([100.0]), "b": jnp.array([1.0])}
      >>> updates, state = tx.update(spike, state)
      >>> updates  # only the spiking tensor is clipped, to 1.05 x its EMA
      {'a': Array([1.05], dtype=float32), 'b': Array([1.], dtype=float32)}

    References:
      Wang et al., `AdaGC: Improving Training Stability for Large Language Model Pretraining
      <https://arxiv.org/abs/2502.11034>`_, 2025.
    """
    _checks.check_range("relative", relative, low=0, low_open=True)
    _check_common(decay, warmup_steps)
    _checks.check_range("warmup_max_norm", warmup_max_norm, low=0)

    def init_fn(params):
        ema = tuple(jnp.full((), jnp.inf, jnp.float32) for _ in _norms.float_leaves(params))
        zero = lambda: jnp.zeros((), jnp.float32)  # distinct buffers: states get donated
        return AdagcState(jnp.zeros((), jnp.int32), ema, zero(), zero(), zero())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree.flatten(
            updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
        )
        grads = [x for x in leaves if _norms.is_array_leaf(x)]
        if len(grads) != len(state.ema):
            raise ValueError(
                f"adagc was initialised for {len(state.ema)} float tensors but got updates "
                f"with {len(grads)}: {treedef}"
            )
        axes = [tuple(range(x.ndim)) for x in grads]
        norms = [n.reshape(()) for n in _norms.unit_norms(grads, axes, axis_name=axis_name)]
        stacked = jnp.stack(norms) if grads else jnp.zeros((0,), jnp.float32)
        finite_each = jnp.isfinite(stacked)
        norm = _norms.global_norm(stacked)
        nonfinite = jnp.sum(~finite_each, dtype=jnp.float32)
        # The warm-up's global clip from the finite tensors' norms, so that a non-finite tensor
        # does not zero the others.
        finite_norm = _norms.global_norm(
            _norms.select(finite_each, stacked, jnp.zeros_like(stacked))
        )
        warm = state.finite_steps < _stats.step_count(warmup_steps)
        warm_factor = _norms.clip_factor(finite_norm, warmup_max_norm)
        relative_ = _stats.as_f32(relative)

        def tensor(n, ema):
            """Factors and new thresholds from tensors' own norms and thresholds: scalars for one
            tensor's update, or vectors of all tensors for telemetry. ``_norms.select``, not
            ``jnp.where``: no nested jit traced per tensor."""
            finite = jnp.isfinite(n)
            factor = _norms.select(warm, warm_factor, _norms.clip_factor(n, relative_ * ema))
            factor = _norms.select(finite, factor, jnp.zeros_like(factor))
            clipped = n * factor
            new = _norms.select(
                warm | jnp.isinf(ema), jnp.minimum(ema, clipped), _stats.ema(ema, clipped, decay)
            )
            return factor, _norms.select(finite & (n > 0), new, ema).astype(jnp.float32)

        factors, ema = zip(*map(tensor, norms, state.ema), strict=True) if grads else ((), ())
        factor_of = iter(factors)
        new_leaves = [
            _norms.scale_leaf(x, next(factor_of)) if _norms.is_array_leaf(x) else x for x in leaves
        ]
        # The share of clipped tensors from the stacked norms and thresholds (one vector
        # computation), not from the per-tensor factors: stacking those costs a fusion per tensor.
        fraction = jnp.zeros(())
        if grads:
            every_factor, _ = tensor(stacked, jnp.stack(state.ema))
            fraction = jnp.mean(((every_factor < 1) & finite_each).astype(jnp.float32))
        any_finite = jnp.any(finite_each) | (not grads)
        finite_steps = jnp.where(
            any_finite, optax.safe_increment(state.finite_steps), state.finite_steps
        )
        new_state = AdagcState(finite_steps, ema, _stats.as_f32(norm), fraction, nonfinite)
        return jax.tree.unflatten(treedef, new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
