"""Running statistics of gradient norms, shared by the adaptive transforms and the guards.

Pure functions over small ``NamedTuple`` states of float32/int32 arrays: no Python lists, no host
sync, so a whole run works under ``jit`` and ``lax.scan``. Every update takes an ``accept`` flag and
leaves the state bit-for-bit unchanged when it is false, when the sample is not finite, or when it
is exactly 0 (a step that carried no gradient: a frozen model, a fully masked step): a NaN or Inf
step can never poison the statistics, and zero steps never drive them to zero.

- :class:`MeanVar`: mean and variance of a scalar stream. The first ``warmup_steps`` accepted
  samples give the exact mean and population variance (Welford's recurrence, no buffer); after
  that both follow exponential moving averages (ZClip's statistics). :func:`z_limit` turns them
  into a threshold. Used by ``zscore_clip`` and ``skip_anomalies``.
- :class:`RobustLevel`: centre and mean absolute deviation of a heavy-tailed stream (winsorized
  EMAs after an exact warm-up), used on log-losses by ``spike_recovery``.
- :func:`ema`: one exponential-moving-average step, also used per tensor by ``adagc``.
- :class:`P2Quantile`: a streaming quantile in 16 numbers (the P-square algorithm), used by
  ``quantile_clip``.
- :func:`step_count`: a step-count hyperparameter such as ``warmup_steps`` as int32; counts past
  int32's range (``2**31``, ``float("inf")``) saturate, i.e. are never reached.

**Level shifts.** A z-score threshold learns only from what it lets through, so two histories
would freeze it: a warm-up of identical norms (standard deviation 0, every later norm an outlier)
and an outlier clipped to about the mean (the statistics then learn the mean again). Here the
standard deviation used in z-scores is at least ``MIN_SPREAD`` (1%) of the mean, and a sample above
the threshold is learned as the threshold itself, not as the value it was clipped to: each such
step raises the mean by at least a factor ``1 + (1 - decay) * z_threshold / 100`` and (for
``z_threshold > 1``) widens the band geometrically, so a lasting change of level is learned in a
number of steps that grows with the logarithm of the change (see ``zscore_clip``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_F32 = jnp.float32
_TINY = float(jnp.finfo(jnp.float32).tiny)
_COUNT_MAX = int(jnp.iinfo(jnp.int32).max)
# Smallest standard deviation used in z-scores, relative to the mean: it binds only for histories
# of nearly equal norms (relative spread under 1%), which would otherwise freeze the threshold.
MIN_SPREAD = 0.01


def as_f32(x) -> jax.Array:
    """``x`` as float32: hyperparameters injected by ``optax.inject_hyperparams`` arrive in the
    parameters' dtype (possibly float16), statistics are always kept in float32."""
    return jnp.asarray(x, _F32)


def select(accept: jax.Array, new, old):
    """``new`` where the scalar ``accept`` holds, else ``old`` (leaf by leaf, bit-exact)."""
    return jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)


def step_count(n) -> jax.Array:
    """A number of steps (``int``, ``float`` or array, possibly ``inf``) as an int32 scalar.

    Counts past int32's largest value saturate at it: ``warmup_steps=float("inf")`` or ``2**40``
    means a warm-up that never ends (the step counters saturate too, after 2.1e9 steps).
    """
    if not isinstance(n, jax.Array):
        return jnp.asarray(np.minimum(np.asarray(n, np.float64), _COUNT_MAX).astype(np.int32))
    if jnp.issubdtype(n.dtype, jnp.integer):
        return jnp.minimum(n, _COUNT_MAX).astype(jnp.int32)
    return jnp.where(n >= _COUNT_MAX, _COUNT_MAX, n.astype(jnp.int32))  # float: inf, 3e9


def ema(mean: jax.Array, x: jax.Array, decay) -> jax.Array:
    """One step of an exponential moving average: ``decay * mean + (1 - decay) * x``."""
    decay = as_f32(decay)
    return decay * mean + (1 - decay) * x


# --------------------------------------------------------------------------------------------
# Mean and variance: exact during warm-up, exponential moving averages after


class MeanVar(NamedTuple):
    """Running mean and (population) variance of a float32 scalar stream."""

    samples: jax.Array  # int32, samples accepted so far (not `count`: optax's step lookups)
    mean: jax.Array  # float32
    var: jax.Array  # float32


def mean_var_init() -> MeanVar:
    zero = lambda: jnp.zeros((), _F32)  # distinct buffers: states get donated
    return MeanVar(jnp.zeros((), jnp.int32), zero(), zero())


def warmup_length(warmup_steps) -> jax.Array:
    """Samples that seed the statistics: ``warmup_steps``, at least 1 (a mean needs a sample)."""
    return jnp.maximum(step_count(warmup_steps), 1)


def ready(stats: MeanVar, warmup_steps) -> jax.Array:
    """Whether warm-up is over, i.e. the statistics may be used to judge a sample."""
    return stats.samples >= warmup_length(warmup_steps)


def std(stats: MeanVar) -> jax.Array:
    return jnp.sqrt(jnp.maximum(stats.var, 0.0))


def spread(stats: MeanVar) -> jax.Array:
    """The standard deviation that z-scores use: at least ``MIN_SPREAD`` times the mean."""
    return jnp.maximum(std(stats), MIN_SPREAD * stats.mean)


def z_limit(stats: MeanVar, z_threshold, eps, warmup_steps) -> jax.Array:
    """The largest sample whose z-score ``(x - mean) / (spread + eps)`` is at most
    ``z_threshold``; +inf during warm-up. Feed a larger finite sample to :func:`mean_var_update`
    as this limit (an Inf one must stay rejected): the statistics then learn a lasting change of
    level (see the module docstring)."""
    limit = stats.mean + as_f32(z_threshold) * (spread(stats) + as_f32(eps))
    return jnp.where(ready(stats, warmup_steps), limit, jnp.inf)


def mean_var_update(stats: MeanVar, x, *, decay, warmup_steps, accept=True) -> MeanVar:
    """Adds the sample ``x`` unless ``accept`` is false or ``x`` is not finite or exactly 0.

    While fewer than ``warmup_length(warmup_steps)`` samples were accepted, ``mean``/``var`` are
    the exact mean and population variance of the samples so far (Welford). After that:
    ``mean <- ema(mean, x)``, then ``var <- ema(var, (x - mean)**2)`` with the new mean.
    """
    x = as_f32(x)
    accept = jnp.asarray(accept) & jnp.isfinite(x) & (x != 0)
    n = (stats.samples + 1).astype(_F32)
    delta = x - stats.mean
    welford_mean = stats.mean + delta / n
    welford_var = stats.var + (delta * (x - welford_mean) - stats.var) / n
    ema_mean = ema(stats.mean, x, decay)
    ema_var = ema(stats.var, jnp.square(x - ema_mean), decay)
    warm = stats.samples < warmup_length(warmup_steps)
    new = MeanVar(
        optax.safe_increment(stats.samples),
        jnp.where(warm, welford_mean, ema_mean),
        jnp.where(warm, welford_var, ema_var),
    )
    return select(accept, new, stats)


def peak_update(peak: jax.Array, x, half_life, accept=True) -> jax.Array:
    """The largest sample so far, each older one counting half every ``half_life`` samples:
    ``max(peak * 0.5 ** (1 / half_life), x)``, unchanged unless ``accept`` and ``x`` is finite
    and nonzero (an exactly-zero gradient is no sample, as in :func:`mean_var_update`)."""
    x = as_f32(x)
    accept = jnp.asarray(accept) & jnp.isfinite(x) & (x != 0)
    decayed = peak * jnp.exp2(-1 / as_f32(half_life))
    return select(accept, jnp.maximum(decayed, x), peak)


# --------------------------------------------------------------------------------------------
# Robust level and spread of a heavy-tailed stream (minibatch losses, on the log scale)


class RobustLevel(NamedTuple):
    """Running centre and mean absolute deviation of a scalar stream, robust to outliers."""

    samples: jax.Array  # int32, samples accepted so far (not `count`: optax's step lookups)
    center: jax.Array  # float32
    spread: jax.Array  # float32, mean absolute deviation about the centre


def robust_init() -> RobustLevel:
    zero = lambda: jnp.zeros((), _F32)
    return RobustLevel(jnp.zeros((), jnp.int32), zero(), zero())


def robust_spread(stats: RobustLevel) -> jax.Array:
    """The spread used in limits: at least ``MIN_SPREAD``."""
    return jnp.maximum(stats.spread, MIN_SPREAD)


def robust_limit(stats: RobustLevel, z, warmup_steps) -> jax.Array:
    """``center + z * robust_spread``; +inf during warm-up."""
    limit = stats.center + as_f32(z) * robust_spread(stats)
    return jnp.where(ready(stats, warmup_steps), limit, jnp.inf)


def robust_update(stats: RobustLevel, y, *, decay, warmup_steps, clip_z, accept=True):
    """Adds the sample ``y`` unless ``accept`` is false or ``y`` is not finite.

    Over the first ``warmup_length(warmup_steps)`` samples the centre is their exact mean and the
    spread the mean of ``|y - centre|`` (each about the centre before it); after that both are
    EMAs with ``decay`` of ``y`` winsorized to ``centre +- clip_z * spread``, so one outlier moves
    them by at most ``(1 - decay) * clip_z`` spreads, while a gradual drift is followed.
    """
    y = as_f32(y)
    accept = jnp.asarray(accept) & jnp.isfinite(y)
    warm = stats.samples < warmup_length(warmup_steps)
    band = as_f32(clip_z) * jnp.maximum(stats.spread, MIN_SPREAD)
    y = jnp.where(warm, y, jnp.clip(y, stats.center - band, stats.center + band))
    n = stats.samples.astype(_F32)
    rate = jnp.where(warm, 1 / (n + 1), 1 - as_f32(decay))
    spread_rate = jnp.where(warm, 1 / jnp.maximum(n, 1), rate)  # no deviation from the first
    deviation = jnp.abs(y - stats.center)
    new = RobustLevel(
        optax.safe_increment(stats.samples),
        stats.center + rate * (y - stats.center),
        jnp.where(n == 0, 0.0, stats.spread + spread_rate * (deviation - stats.spread)),
    )
    return select(accept, new, stats)


# --------------------------------------------------------------------------------------------
# Streaming quantile: the P-square algorithm


class P2Quantile(NamedTuple):
    """State of a P-square quantile estimator over the logarithms of the samples.

    Until 5 samples are in, ``heights`` holds them sorted (padded with +inf); after that it holds
    the 5 markers' heights: the minimum, the ``p/2``, ``p`` and ``(1+p)/2`` quantiles and the
    maximum. ``positions`` are the markers' ranks (1-based, exact integers) and ``offsets`` their
    desired minus actual ranks, kept small so float32 stays exact over any run length.
    """

    samples: jax.Array  # int32, samples accepted so far (not `count`: optax's step lookups)
    heights: jax.Array  # float32 (5,), log-samples or marker heights
    positions: jax.Array  # int32 (5,)
    offsets: jax.Array  # float32 (5,)


def p2_init() -> P2Quantile:
    return P2Quantile(
        jnp.zeros((), jnp.int32),
        jnp.full((5,), jnp.inf, _F32),
        jnp.arange(1, 6, dtype=jnp.int32),
        jnp.zeros((5,), _F32),
    )


def _p2_step(state: P2Quantile, y: jax.Array, p: jax.Array) -> P2Quantile:
    """One P-square step (at least 5 samples already in) with the log-sample ``y``."""
    q = [state.heights[i] for i in range(5)]
    n = [state.positions[i] for i in range(5)]
    # The cell k holding y (q[k] <= y < q[k+1]); the extreme markers follow the extremes.
    k = sum((y >= q[i]).astype(jnp.int32) for i in (1, 2, 3))
    q[0], q[4] = jnp.minimum(q[0], y), jnp.maximum(q[4], y)
    moved = [(k < i).astype(jnp.int32) for i in range(5)]
    n = [n[i] + moved[i] for i in range(5)]
    increments = (0.0, p / 2, p, (1 + p) / 2, 1.0)
    d = [state.offsets[i] + increments[i] - moved[i] for i in range(5)]
    for i in (1, 2, 3):  # in order: each adjusted marker is the next one's neighbour
        gap_up, gap_down = n[i + 1] - n[i], n[i] - n[i - 1]
        s = jnp.where(
            (d[i] >= 1) & (gap_up > 1), 1, jnp.where((d[i] <= -1) & (gap_down > 1), -1, 0)
        )
        sf, up, down = s.astype(_F32), gap_up.astype(_F32), gap_down.astype(_F32)
        parabolic = q[i] + sf / (up + down) * (
            (down + sf) * (q[i + 1] - q[i]) / up + (up - sf) * (q[i] - q[i - 1]) / down
        )
        linear = jnp.where(s > 0, q[i] + (q[i + 1] - q[i]) / up, q[i] - (q[i] - q[i - 1]) / down)
        inside = (q[i - 1] < parabolic) & (parabolic < q[i + 1])
        q[i] = jnp.where(s != 0, jnp.where(inside, parabolic, linear), q[i])
        n[i] = n[i] + s
        d[i] = d[i] - sf
    return P2Quantile(state.samples, jnp.stack(q), jnp.stack(n), jnp.stack(d))


def p2_update(state: P2Quantile, x, p, accept=True) -> P2Quantile:
    """Adds the sample ``x >= 0`` to the estimate of the ``p``-quantile, unless ``accept`` is false
    or ``x`` is not finite or exactly 0 (a step without gradient says nothing about the norms to
    expect, and would pull the quantile toward float32's smallest value).

    Runs on ``log(max(x, tiny))``: quantiles commute with the logarithm, gradient norms are far
    closer to log-normal than to normal (so P-square's parabolic interpolation fits better), and a
    finite spike of any size moves the interpolated markers by its logarithm only.
    """
    x, p = as_f32(x), as_f32(p)
    accept = jnp.asarray(accept) & jnp.isfinite(x) & (x != 0)
    y = jnp.log(jnp.maximum(x, _TINY))
    filling = P2Quantile(
        state.samples,
        jnp.sort(state.heights.at[4].set(y)),  # slot 4 is +inf while fewer than 5 samples are in
        state.positions,
        jnp.stack([0.0, 2 * p - 1, 4 * p - 2, 2 * p - 1, 0.0]),  # desired ranks once 5 are in
    )
    new = select(state.samples < 5, filling, _p2_step(state, y, p))
    new = new._replace(samples=optax.safe_increment(state.samples))
    return select(accept, new, state)


def p2_estimate(state: P2Quantile, p) -> jax.Array:
    """The current ``p``-quantile estimate (float32); +inf before the first sample.

    With fewer than 5 samples it is their exact quantile, interpolated linearly on the log scale;
    after that it is the middle P-square marker.
    """
    p = as_f32(p)
    samples = state.samples
    rank = (jnp.minimum(samples, 5) - 1).astype(_F32) * p
    lo = jnp.floor(rank).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(samples - 1, 0))
    h = state.heights
    exact = h[lo] + (rank - lo) * jnp.where(hi > lo, h[hi] - h[lo], 0.0)
    log_q = jnp.where(samples >= 5, h[2], exact)
    return jnp.where(samples > 0, jnp.exp(log_q), jnp.inf)
