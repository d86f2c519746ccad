"""Update-side stabilizers: Adam variants that keep the *update* in check, not the gradient.

Gradient clipping acts before the optimizer, but many loss spikes are born inside it: Adam's
second moment lags behind a sudden rise in squared gradients, and ``m / sqrt(v)`` blows up while
the gradient norm looks ordinary. The two optimizers here act at that point:

- :func:`scale_by_stable_adam` / :func:`stable_adamw` (StableAdamW): AdamW whose per-tensor
  learning rate shrinks when this step's gradient is large against the second moment.
- :func:`scale_by_spam` / :func:`spam` (SPAM): Adam with spike-aware clipping of gradient entries
  against the second moment, periodic resets of both moments and a short warm-up after each.

Both keep their moments in float32 whatever the parameters' dtype (the update keeps the
gradients' dtype), and gate non-finite values per tensor, as their math is per tensor: a tensor
whose gradient holds a NaN/Inf, or a value whose square overflows float32 (for SPAM: whose sum of
squares does, a norm above about 1.8e19), gets an all-zero update and keeps its moments, while
the other tensors step as usual; ``nonfinite`` counts such tensors, and the step count advances
unless every tensor was gated. To skip the *whole step* instead, wrap the optimizer in
:func:`jaxstab.skip_anomalies`.
With their stabilizer switched off both equal ``optax.adamw``, complex parameters included (as
there, a complex first moment and a real second moment of ``|g|**2``; StableAdamW's RMS and
SPAM's spike test take the modulus, and a clipped spike keeps its phase).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import _adam, _checks, _norms
from jaxstab._adam import Mask
from jaxstab._norms import AxisName
from jaxstab.telemetry import telemetry_state

_F32 = jnp.float32
# Floor of the RMS denominator when eps = 0: a zero gradient with a zero moment gives 0, not NaN.
_TINY = float(jnp.finfo(jnp.float32).tiny)
# SPAM's warm-up starts at 1 - _WARMUP_DROP of the update (the reference code's cosine schedule).
_WARMUP_DROP = 0.99


# --------------------------------------------------------------------------------------------
# StableAdamW


@telemetry_state("scale_by_stable_adam", ("clip_fraction", "max_rms", "nonfinite"))
class ScaleByStableAdamState(NamedTuple):
    """State of :func:`scale_by_stable_adam`: Adam's moments and this step's telemetry."""

    count: jax.Array  # int32, steps with at least one finite tensor so far
    mu: optax.Updates  # first moment, float32 (or mu_dtype)
    nu: optax.Updates  # second moment, float32
    clip_fraction: jax.Array  # float32 share of tensors whose learning rate was divided
    max_rms: jax.Array  # float32 largest per-tensor RMS of g / sqrt(nu_hat), finite tensors
    nonfinite: jax.Array  # float32 number of tensors gated (zero update, moments kept)


def scale_by_stable_adam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    *,
    clip_threshold: float | jax.Array = 1.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam's scaling with StableAdamW's per-tensor update clipping (no learning rate).

    Adam's moments (as ``optax.scale_by_adam``) give each tensor the direction
    :math:`d = \hat m_t / (\sqrt{\hat v_t + \bar\epsilon} + \epsilon)` and, with ``weight_decay``
    :math:`\lambda`, :math:`d + \lambda \theta`. For each tensor StableAdamW measures how far
    this step's gradient outruns the second moment,

    .. math::

      \mathrm{RMS}_t = \sqrt{\operatorname{mean}\left(g_t^2 / \max(\hat v_t, \epsilon^2)\right)},

    with :math:`\hat v_t` the bias-corrected second moment *including* :math:`g_t^2` (the paper's
    :math:`u_t`; its :math:`\hat\beta_2` form equals Adam's bias correction), and divides the
    tensor's step -- weight decay included, as the paper's learning rate :math:`\eta_t` multiplies
    both -- by :math:`\max(1, \mathrm{RMS}_t / c)` with :math:`c` = ``clip_threshold``. This is
    Adafactor's update clipping carried into AdamW: when the second moment falls behind a sudden
    rise in squared gradients (the paper sees loss spikes 1-8 steps after), the step shrinks
    instead of blowing up. The weight decay sits inside this transform for that reason; chain
    ``optax.scale_by_learning_rate`` after it (or use :func:`stable_adamw`).

    When no tensor is clipped the result equals ``optax.scale_by_adam`` followed by
    ``optax.add_decayed_weights``. A tensor whose gradient is not finite (or whose squares
    overflow float32) gets zeros and keeps its moments; the others step as usual. Cost: one
    reduction per tensor (its inputs, gradient and second moment, read once more) and one fused
    elementwise pass, as Adam's.

    Args:
      b1: decay of the first moment, in ``[0, 1)``.
      b2: decay of the second moment, in ``[0, 1)``.
      eps: added to the denominator outside the square root; ``eps**2`` floors the RMS's
        denominator; ``>= 0``.
      eps_root: added to the second moment inside the square root of the direction; ``>= 0``.
      mu_dtype: optional dtype of the first moment; by default float32 (at least), whatever the
        parameters' dtype. The second moment is always float32 (at least).
      clip_threshold: the RMS above which a tensor's step is divided (``c``, 1 in the paper);
        ``> 0``, ``inf`` switches clipping off.
      weight_decay: decoupled weight decay ``lambda`` (a number or a schedule of the step);
        ``>= 0``. Needs ``params`` in ``update``.
      mask: which parameters decay, as in ``optax.add_decayed_weights``: a tree of bools that is
        a prefix of the parameters, or a callable returning one.
      axis_name: inside ``shard_map``/``pmap`` with tensors sharded across devices, the mapped
        axis name(s): each RMS becomes the tensor's global one with one ``psum``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds the moments and
      ``clip_fraction``, ``max_rms``, ``nonfinite`` (see :func:`jaxstab.telemetry`). The float
      hyperparameters may be injected with ``optax.inject_hyperparams``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxstab.optimizers import scale_by_stable_adam
      >>> tx = scale_by_stable_adam(b2=0.99)
      >>> state = tx.init({"w": jnp.zeros(2), "b": jnp.zeros(2)})
      >>> for g in [1.0, 1.0, 1.0, 30.0]:  # the second moment lags behind a spike in "w"
      ...     updates, state = tx.update({"w": jnp.full(2, g), "b": jnp.ones(2)}, state)
      >>> round(float(state.max_rms), 2), float(state.clip_fraction)
      (1.98, 0.5)
      >>> updates["w"].round(3), updates["b"].round(3)  # Adam's 0.623 divided by 1.98; b as Adam
      (Array([0.314, 0.314], dtype=float32), Array([1., 1.], dtype=float32))

    References:
      Wortsman, Dettmers et al., `Stable and low-precision training for large-scale
      vision-language models <https://arxiv.org/abs/2304.13013>`_, NeurIPS 2023.
      Shazeer & Stern, `Adafactor <https://arxiv.org/abs/1804.04235>`_, ICML 2018.
    """
    _adam.check_adam(b1, b2, eps, eps_root, 0.0 if callable(weight_decay) else weight_decay)
    _checks.check_range("clip_threshold", clip_threshold, low=0, low_open=True)

    def init_fn(params):
        mu, nu = _adam.init_moments(params, mu_dtype)
        zero = lambda: jnp.zeros((), _F32)  # distinct buffers: states get donated
        return ScaleByStableAdamState(jnp.zeros((), jnp.int32), mu, nu, zero(), zero(), zero())

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        treedef, grads = _adam.flatten(updates, state.mu)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        decays = _adam.decayed_leaves(params, treedef, weight_decay, mask, state.count)
        b1_, b2_, eps_, eps_root_ = map(_adam.hyper, (b1, b2, eps, eps_root))
        step = optax.safe_increment(state.count)
        bc1, bc2 = _adam.bias_correction(b1_, step), _adam.bias_correction(b2_, step)
        gs = [g.astype(_adam.stat_dtype(g.dtype)) for g in grads]
        new_nu = lambda g, v: (1 - b2_) * _norms.abs_sq(g) + b2_ * v
        # g^2 / max(nu_hat, eps^2) = bc2 / (1 - b2) * g^2 / max(g^2 + k nu, floor) with
        # k = b2 / (1 - b2): five elementwise operations per entry in the reduction, whose cost
        # on XLA:CPU grows with each. A floor that is not a compile-time constant keeps XLA:CPU
        # from writing out a full array of it every step.
        k = b2_ / (1 - b2_)
        floor = jnp.maximum(jnp.square(jnp.asarray(eps_, _F32)) * bc2, _TINY) / (1 - b2_)
        # The barrier keeps XLA from sharing g*g between this reduction and the moment update
        # (it would write it out as a full array): each pass computes its own.
        ratio_sums = [
            jnp.sum(_norms.abs_sq(g) / jnp.maximum(_norms.abs_sq(g) + k * v, floor)).astype(_F32)
            for g, v in zip(*jax.lax.optimization_barrier((gs, nus)), strict=True)
        ]
        sizes = [float(max(g.size, 1)) for g in gs]
        if axis_name is not None:
            with _checks.mapped_axis(axis_name):
                ratio_sums, sizes = jax.lax.psum((ratio_sums, sizes), axis_name)
        ratio_scale = bc2 / (1 - b2_)
        threshold = _adam.hyper(clip_threshold)
        mean_sq = lambda r, n: ratio_scale * r / n  # RMS_t ** 2
        clip_fraction, max_rms, nonfinite = (jnp.zeros((), _F32) for _ in range(3))
        any_finite = jnp.asarray(True)
        if gs:  # telemetry over all tensors at once
            all_rms = jnp.sqrt(mean_sq(jnp.stack(ratio_sums), jnp.stack(sizes)))
            finite_each = jnp.isfinite(all_rms)
            any_finite = jnp.any(finite_each)
            nonfinite = jnp.sum(~finite_each, dtype=_F32)
            clip_fraction = jnp.mean((all_rms > threshold).astype(_F32))  # NaN > c is False
            max_rms = jnp.max(_norms.select(finite_each, all_rms, jnp.zeros_like(all_rms)))
        # Each tensor's finiteness and factor min(1, c / RMS_t) from its own scalars (exactly 1
        # unless clipped; 1 for a zero RMS or c = inf; 0 if not finite): a vector of all of them
        # sliced into every tensor's update makes XLA's compile time grow quadratically with the
        # number of tensors.
        finite = [jnp.isfinite(r) for r in ratio_sums]
        factors = [
            _norms.select(
                ok, jnp.minimum(1.0, threshold * jax.lax.rsqrt(mean_sq(r, n))), jnp.zeros((), _F32)
            )
            for ok, r, n in zip(finite, ratio_sums, sizes, strict=True)
        ]

        out, out_mu, out_nu = [], [], []
        for i, (g, raw, m, v, decay) in enumerate(zip(gs, grads, mus, nus, decays, strict=True)):
            new_m, new_v = (1 - b1_) * g + b1_ * m.astype(g.dtype), new_nu(g, v)
            m, v = _adam.accept(finite[i], new_m, m, new_v, v)
            direction = _adam.adam_direction(m, v, bc1, bc2, eps_, eps_root_)
            out.append(_adam.finish(direction, decay, factors[i], raw.dtype))
            out_mu.append(m.astype(mus[i].dtype))
            out_nu.append(v)
        new_state = ScaleByStableAdamState(
            jnp.where(any_finite, step, state.count),
            treedef.unflatten(out_mu),
            treedef.unflatten(out_nu),
            clip_fraction,
            max_rms.astype(_F32),
            nonfinite,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stable_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask = None,
    *,
    clip_threshold: float | jax.Array = 1.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """StableAdamW: ``optax.adamw`` with per-tensor update clipping (Wortsman et al. 2023).

    A drop-in for ``optax.adamw`` (same arguments, same positions, same defaults): each tensor's
    learning rate, weight decay included, is divided by ``max(1, RMS_t / clip_threshold)``, where
    ``RMS_t`` is the root mean square of ``g_t / sqrt(v_hat_t)`` over the tensor (see
    :func:`scale_by_stable_adam`). The paper uses it instead of gradient clipping. When no tensor
    is clipped the updates equal ``optax.adamw``'s to float rounding.

    Args:
      learning_rate: a number or a schedule of the step.
      b1, b2, eps, eps_root, mu_dtype: as in ``optax.adamw``; the moments are float32 (at least)
        unless ``mu_dtype`` sets the first one's dtype.
      weight_decay: decoupled weight decay (a number or a schedule), multiplied by the learning
        rate and divided by the tensor's clipping factor like the rest of its step; ``>= 0``.
      mask: which parameters decay, as in ``optax.adamw``.
      clip_threshold: the RMS above which a tensor's step shrinks; ``> 0`` (1 in the paper).
      axis_name: inside ``shard_map``/``pmap`` with tensors sharded across devices, the mapped
        axis name(s).

    Returns:
      An ``optax.GradientTransformationExtraArgs``, a chain of :func:`scale_by_stable_adam`
      (telemetry ``clip_fraction``, ``max_rms``, ``nonfinite``) and
      ``optax.scale_by_learning_rate``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxstab
      >>> from jaxstab.optimizers import stable_adamw
      >>> tx = stable_adamw(1e-2, b2=0.95)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> loss = lambda p, x: jnp.sum((p["w"] * x) ** 2)
      >>> for x in [1.0, 1.0, 50.0]:  # a batch that spikes the gradient
      ...     grads = jax.grad(loss)(params, x)
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> {k: round(float(v), 3) for k, v in jaxstab.telemetry(state).items()}
      {'0/scale_by_stable_adam/clip_fraction': 1.0, '0/scale_by_stable_adam/max_rms': 1.689,
       '0/scale_by_stable_adam/nonfinite': 0.0}

    References:
      Wortsman, Dettmers et al., `Stable and low-precision training for large-scale
      vision-language models <https://arxiv.org/abs/2304.13013>`_, NeurIPS 2023.
    """
    return optax.chain(
        scale_by_stable_adam(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            clip_threshold=clip_threshold,
            weight_decay=weight_decay,
            mask=mask,
            axis_name=axis_name,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


# --------------------------------------------------------------------------------------------
# SPAM


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
      >>> from jaxstab.optimizers import scale_by_spam
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
      >>> from jaxstab.optimizers import spam
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
