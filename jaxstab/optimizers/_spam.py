"""SPAM: Adam with spike-aware clipping of gradient entries and periodic momentum resets.

A gradient entry far above its second moment is clipped to a multiple of it before it enters
the moments, both moments are reset every ``reset_interval`` steps (so a spike absorbed into them
is forgotten) and the step warms up again after each reset (Huang et al. 2025).

Moments are float32 whatever the parameters' dtype (the update keeps the gradients' dtype), and
non-finite values are gated per tensor: a tensor whose gradient holds a NaN/Inf, or whose sum of
squares overflows float32 (a norm above about 1.8e19), gets an all-zero update and keeps its
moments, while the other tensors step as usual; ``nonfinite`` counts such tensors, and the step
count advances unless every tensor was gated. To skip the *whole step* instead, wrap the
optimizer in :func:`jaxstab.skip_anomalies`. With clipping and resets switched off it equals
``optax.adamw``, complex parameters included (a clipped spike keeps its phase).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import _checks, _norms
from jaxstab._norms import AxisName
from jaxstab.optimizers import _adam
from jaxstab.optimizers._adam import Mask
from jaxstab.telemetry import telemetry_state

_F32 = jnp.float32
# The warm-up starts at 1 - _WARMUP_DROP of the update (the reference code's cosine schedule).
_WARMUP_DROP = 0.99


@telemetry_state("scale_by_spam", ("spike_fraction", "scale", "nonfinite"))
class ScaleBySpamState(NamedTuple):
    """State of :func:`scale_by_spam`: Adam's moments and this step's telemetry."""

    count: jax.Array  # int32, steps with at least one finite tensor; drives resets and bias
    # correction
    mu: optax.Updates  # first moment, float32 (or mu_dtype)
    nu: optax.Updates  # second moment, float32
    spike_fraction: jax.Array  # float32 share of entries clipped as spikes (NaN: not counted)
    scale: jax.Array  # float32 warm-up factor of Adam's direction
    nonfinite: jax.Array  # float32 number of tensors gated (zero update, moments kept)


def _clipped_from_new_moment(g, new_v, clip_on, b2, theta):
    """SPAM's clipped gradient recovered from ``g`` and the *new* second moment alone.

    A spike (``v > 0`` and ``g**2 > theta * v``, with ``v`` the previous moment) is replaced by
    ``sign(g) sqrt(theta v)``, so the new moment is ``c v`` with ``c = b2 + (1 - b2) theta``;
    an entry that is not a spike gives a new moment ``>= c g**2 / theta``. So ``g`` is a spike iff
    ``g**2 > theta new_v / c``, and then its clipped value is ``sign(g) sqrt(theta new_v / c)``;
    an entry whose previous moment was 0 (never clipped) is the one whose new moment is exactly
    ``(1 - b2) g**2``. The first moment is thus computed after the second, from its output: if
    it read the previous second moment while that is rewritten in place, XLA would copy every
    second moment first. Exact to float32 rounding while the moments are normal floats; an entry
    whose moment is subnormal (a gradient under about 1e-19, far below ``eps``) gets its clipped
    value to within about 20%.
    """
    cap2 = (theta / (b2 + (1 - b2) * theta)) * new_v  # one scalar: no division per entry
    g2 = _norms.abs_sq(g)
    spike = clip_on & (g2 > cap2) & (new_v != (1 - b2) * g2)
    return _norms.select(spike, jnp.sign(g) * jnp.sqrt(cap2), g)


def _spam_schedule(step, reset_interval, warmup_steps, spike_delay):
    """For the 1-based accepted ``step``: (reset the moments?, warm-up factor, clipping on?)."""
    if reset_interval is None:
        return jnp.asarray(False), jnp.ones((), _F32), step >= spike_delay
    phase = step % reset_interval  # steps since the last reset (0: a reset step)
    n = jnp.asarray(warmup_steps, _F32)
    cosine = 1 - _WARMUP_DROP * (1 + jnp.cos(jnp.pi * phase.astype(_F32) / (n + 1))) / 2
    warm = (step >= reset_interval) & (phase < warmup_steps)
    return phase == 0, jnp.where(warm, cosine, 1.0).astype(_F32), phase >= spike_delay


def scale_by_spam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    *,
    spike_threshold: float | jax.Array | None = 5000.0,
    reset_interval: int | jax.Array | None = 500,
    warmup_steps: int | jax.Array = 150,
    spike_delay: int | jax.Array = 20,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask = None,
    count_spikes: bool = False,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam's scaling with SPAM's spike-aware clipping and momentum reset (no learning rate).

    The paper's algorithm as its reference code runs it, at the :math:`t`-th accepted step:

    1. **Momentum reset**: when :math:`t \bmod \Delta T = 0` both moments are set
       to zero before the step, so a spike absorbed into them is forgotten.
    2. **Spike-aware clipping**: an entry with :math:`g_i^2 > \theta\, v_{t-1,i}`
       (against the *previous*, uncorrected second moment) is replaced by
       :math:`\operatorname{sign}(g_i)\sqrt{\theta\, v_{t-1,i}}`: its sign kept, its magnitude
       capped. As in the reference code, clipping waits ``spike_delay`` steps after the start and
       after every reset, while :math:`v` is still too young to judge spikes. Unlike it, an entry
       whose second moment is still exactly zero (no gradient since the start or the last reset:
       an unused embedding row, an idle expert) is not judged; the reference clips its first
       gradient to zero, which freezes it until the next reset.
    3. Adam's moments :math:`m_t, v_t` from the clipped gradient and their bias correction with
       the global :math:`t` (not reset, as in the paper and its code), then the direction
       :math:`\hat m_t / (\sqrt{\hat v_t + \bar\epsilon} + \epsilon)`.
    4. **Warm-up** after a reset: the direction is multiplied by the cosine ramp
       :math:`1 - 0.99 (1 + \cos(\pi k / (N + 1))) / 2` for the :math:`k`-th step after a reset,
       :math:`k < N` (from 0.01 to 1; none before the first reset), which also tames the
       momenta restarted from zero. Weight decay, if any, is added after, unscaled.

    Defaults are the paper's (:math:`\theta = 5000`, :math:`\Delta T = 500`, :math:`N = 150`;
    20 steps of delay as in its code) except ``eps``, which is ``optax.adamw``'s. With
    ``spike_threshold=None`` and ``reset_interval=None`` this equals ``optax.scale_by_adam``
    followed by ``optax.add_decayed_weights``. A tensor whose gradient is not finite (or whose
    sum of squares overflows float32: a norm above about 1.8e19) gets zeros and keeps its
    moments; the others step as usual. Cost: Adam's passes plus one reduction over the
    gradients (their sums of squares, the finiteness check); ``count_spikes=True`` adds one over
    the gradients and the second moment.

    Args:
      b1: decay of the first moment, in ``[0, 1)``.
      b2: decay of the second moment, in ``[0, 1)``.
      eps: added to the denominator outside the square root; ``>= 0``.
      eps_root: added to the second moment inside the square root; ``>= 0``.
      mu_dtype: optional dtype of the first moment; by default float32 (at least).
      spike_threshold: ``theta``, the ratio of ``g**2`` to the second moment above which an
        entry is a spike; ``> 0``, None switches clipping off.
      reset_interval: ``Delta T``, steps between moment resets; ``>= 1``, None switches resets
        (and warm-ups) off.
      warmup_steps: ``N``, steps of cosine warm-up after each reset; ``>= 0``.
      spike_delay: clipping is off while the steps since the start (1-based) or since the last
        reset (the reset step being 0) are fewer than this; ``>= 0``.
      weight_decay: decoupled weight decay (a number or a schedule of the step), not warmed up;
        ``>= 0``. Needs ``params`` in ``update``.
      mask: which parameters decay, as in ``optax.add_decayed_weights``.
      count_spikes: whether to count the clipped entries for ``spike_fraction`` (NaN if not):
        one more pass over the gradients and the second moment.
      axis_name: inside ``shard_map``/``pmap`` with tensors sharded across devices, the mapped
        axis name(s): the finiteness check and ``spike_fraction`` become global.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds the moments and
      ``spike_fraction``, ``scale``, ``nonfinite`` (see :func:`jaxstab.telemetry`). The float and
      integer hyperparameters may be injected with ``optax.inject_hyperparams``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab import scale_by_spam
      >>> tx = scale_by_spam(b2=0.9, spike_threshold=50.0, reset_interval=4, warmup_steps=2,
      ...                    spike_delay=1, count_spikes=True)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for g in [1.0, 1.0, 1000.0, 1.0, 1.0]:  # a spike at step 3, a reset at step 4
      ...     updates, state = tx.update({"w": jnp.array([g, 1.0])}, state)
      ...     print(float(state.spike_fraction), round(float(state.scale), 2))
      0.0 1.0
      0.0 1.0
      0.5 1.0
      0.0 0.01
      0.0 0.26

    References:
      Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training
      <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.
    """
    _adam.check_adam(b1, b2, eps, eps_root, 0.0 if callable(weight_decay) else weight_decay)
    if spike_threshold is not None:
        _checks.check_range("spike_threshold", spike_threshold, low=0, low_open=True)
    if reset_interval is not None:
        _checks.check_range("reset_interval", reset_interval, low=1)
    _checks.check_range("warmup_steps", warmup_steps, low=0)
    _checks.check_range("spike_delay", spike_delay, low=0)

    def init_fn(params):
        mu, nu = _adam.init_moments(params, mu_dtype)
        zero = lambda: jnp.zeros((), _F32)  # distinct buffers: states get donated
        count = jnp.zeros((), jnp.int32)
        return ScaleBySpamState(count, mu, nu, zero(), jnp.ones((), _F32), zero())

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        treedef, grads = _adam.flatten(updates, state.mu)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        decays = _adam.decayed_leaves(params, treedef, weight_decay, mask, state.count)
        b1_, b2_, eps_, eps_root_ = map(_adam.hyper, (b1, b2, eps, eps_root))
        step = optax.safe_increment(state.count)
        bc1, bc2 = _adam.bias_correction(b1_, step), _adam.bias_correction(b2_, step)
        reset, warm, clip_on = _spam_schedule(step, reset_interval, warmup_steps, spike_delay)

        # A reset zeroes both moments before the step: the moments' decays become 0 (scalars,
        # not a select per entry), and the spike test waits, as it judges against zero moments.
        theta = _adam.hyper(0.0 if spike_threshold is None else spike_threshold)
        if reset_interval is not None:
            b1_m, b2_v = _norms.select(reset, 0.0, b1_), _norms.select(reset, 0.0, b2_)
            clip_on = clip_on & ~reset
        else:
            b1_m, b2_v = b1_, b2_

        def start(raw, v):
            """The gradient in float32, its square and its spike mask (None without clipping):
            entries whose previous second moment is nonzero and below ``g**2 / theta``."""
            g = raw.astype(_adam.stat_dtype(raw.dtype))
            g2 = _norms.abs_sq(g)
            if spike_threshold is None:
                return g, g2, None
            return g, g2, clip_on & (v > 0) & (g2 > theta * v)

        # Before the update, one reduction per tensor: its sum of squares (not finite: a NaN/Inf
        # or an overflowing square or norm, and the tensor is gated) and, if asked, the spike
        # count.
        finite, finite_each, any_finite, nonfinite = _adam.gate_by_sum_of_squares(grads, axis_name)
        # The warm-up factor of the direction as a reduction's output: XLA computes it once. As
        # plain scalar arithmetic it would be copied into every tensor's update, a cosine each,
        # multiplying compile time.
        scale = jnp.min(jnp.broadcast_to(warm, finite_each.shape))
        spike_fraction = jnp.full((), 0.0 if count_spikes else jnp.nan, _F32)
        if spike_threshold is not None and grads and count_spikes:
            counts = jnp.stack(
                [jnp.sum(start(raw, v)[2], dtype=_F32) for raw, v in zip(grads, nus, strict=True)]
            )
            sizes = jnp.asarray([g.size for g in grads], _F32)
            if axis_name is not None:
                with _checks.mapped_axis(axis_name):
                    counts, sizes = jax.lax.psum((counts, sizes), axis_name)
            counts = _norms.select(finite_each, counts, jnp.zeros_like(counts))
            spike_fraction = jnp.sum(counts) / jnp.maximum(jnp.sum(sizes), 1)

        out, out_mu, out_nu = [], [], []
        for ok, raw, m, v, decay in zip(finite, grads, mus, nus, decays, strict=True):
            g, g2, spike = start(raw, v)
            if spike is not None:
                g2 = _norms.select(spike, theta * v, g2)  # the clipped gradient, squared
            sel_v = _norms.select(ok, (1 - b2_) * g2 + b2_v * v, v)
            if spike is not None:
                g = _clipped_from_new_moment(g, sel_v, clip_on, b2_, theta)
            sel_m = _norms.select(
                ok, (1 - b1_) * g + b1_m * m.astype(g.dtype), m.astype(g.dtype)
            )
            direction = scale * _adam.adam_direction(sel_m, sel_v, bc1, bc2, eps_, eps_root_)
            out.append(_adam.finish(direction, decay, ok.astype(_F32), raw.dtype))
            out_mu.append(sel_m.astype(m.dtype))
            out_nu.append(sel_v)
        new_state = ScaleBySpamState(
            jnp.where(any_finite, step, state.count),
            treedef.unflatten(out_mu),
            treedef.unflatten(out_nu),
            spike_fraction,
            scale,
            nonfinite,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask = None,
    *,
    spike_threshold: float | jax.Array | None = 5000.0,
    reset_interval: int | jax.Array | None = 500,
    warmup_steps: int | jax.Array = 150,
    spike_delay: int | jax.Array = 20,
    count_spikes: bool = False,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """SPAM: Spike-Aware Adam with Momentum Reset (Huang et al. 2025), AdamW's signature.

    ``optax.adamw``'s arguments in its positions, plus SPAM's: entries with
    ``g**2 > spike_threshold * v`` clipped to ``sign(g) * sqrt(spike_threshold * v)``, both
    moments reset every ``reset_interval`` steps, and a cosine warm-up of ``warmup_steps`` after
    each reset (see :func:`scale_by_spam` for the algorithm). With ``spike_threshold=None`` and
    ``reset_interval=None`` it equals ``optax.adamw``.

    The resets are not free on a healthy run. On a batch-16 MLP with BatchNorm (10,000 steps, 3
    seeds; ``benchmarks/guard_health.py``) the paper's settings ended with a held-out loss 76%
    above AdamW's (67-85%; AdamW against itself at a rate ``1 + 1e-6`` times as large: -8% to
    +19%), and with ``reset_interval=None`` 3.5% above. The resets alone (``spike_threshold=None``)
    cost 40%, and after each reset the second moment is small, so ordinary entries are clipped as
    spikes too (on 39% of the steps, 2% without resets). On the char-level transformer and a GRU
    SPAM did not hurt (final loss 1.4% and 2.2% below AdamW's). For small batches or BatchNorm,
    pass ``reset_interval=None``.

    Args:
      learning_rate: a number or a schedule of the step.
      b1, b2, eps, eps_root, mu_dtype, weight_decay, mask: as in ``optax.adamw``; the moments
        are float32 (at least) unless ``mu_dtype`` sets the first one's dtype.
      spike_threshold: ``theta`` (5000 in the paper); None switches clipping off.
      reset_interval: steps between moment resets (500 in the paper); None switches them off.
      warmup_steps: cosine warm-up steps after each reset (150 in the paper).
      spike_delay: steps after the start and each reset before clipping starts (20).
      count_spikes: whether to count clipped entries for the telemetry (one more pass).
      axis_name: inside ``shard_map``/``pmap``, the mapped axis name(s).

    Returns:
      An ``optax.GradientTransformationExtraArgs``, a chain of :func:`scale_by_spam` (telemetry
      ``spike_fraction``, ``scale``, ``nonfinite``) and ``optax.scale_by_learning_rate``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxstab
      >>> from jaxstab import spam
      >>> tx = spam(1e-3, reset_interval=100, warmup_steps=10)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.full(3, jnp.nan)}, state, params)
      >>> updates["w"], int(state[0].count)  # a NaN tensor: zero update, nothing learned
      (Array([0., 0., 0.], dtype=float32), 0)
      >>> sorted(jaxstab.telemetry(state))
      ['0/scale_by_spam/nonfinite', '0/scale_by_spam/scale', '0/scale_by_spam/spike_fraction']

    References:
      Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training
      <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.
    """
    return optax.chain(
        scale_by_spam(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            spike_threshold=spike_threshold,
            reset_interval=reset_interval,
            warmup_steps=warmup_steps,
            spike_delay=spike_delay,
            weight_decay=weight_decay,
            mask=mask,
            count_spikes=count_spikes,
            axis_name=axis_name,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
