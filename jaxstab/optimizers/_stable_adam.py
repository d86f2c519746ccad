"""StableAdamW: AdamW whose per-tensor step shrinks when the gradient outruns the second moment.

Gradient clipping acts before the optimizer, but many loss spikes are born inside it: Adam's
second moment lags behind a sudden rise in squared gradients, and ``m / sqrt(v)`` blows up while
the gradient norm looks ordinary. :func:`scale_by_stable_adam` / :func:`stable_adamw` act at that
point: each tensor's learning rate is divided by how far this step's gradient outruns the second
moment (Adafactor's update clipping carried into AdamW, Wortsman et al. 2023).

Moments are float32 whatever the parameters' dtype (the update keeps the gradients' dtype), and
non-finite values are gated per tensor, as the math is per tensor: a tensor whose gradient holds
a NaN/Inf, or a value whose square overflows float32, gets an all-zero update and keeps its
moments, while the other tensors step as usual; ``nonfinite`` counts such tensors, and the step
count advances unless every tensor was gated. To skip the *whole step* instead, wrap the
optimizer in :func:`jaxstab.skip_anomalies`. With clipping switched off it equals
``optax.adamw``, complex parameters included (a complex first moment and a real second moment of
``|g|**2``; the RMS takes the modulus).
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
# Floor of the RMS denominator when eps = 0: a zero gradient with a zero moment gives 0, not NaN.
_TINY = float(jnp.finfo(jnp.float32).tiny)


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
      >>> from jaxstab import scale_by_stable_adam
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
      >>> from jaxstab import stable_adamw
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
