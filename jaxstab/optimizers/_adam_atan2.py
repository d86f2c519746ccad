"""Adam-atan2: Adam without epsilon, its step bounded and invariant to the gradients' scale.

Adam divides the first moment by the root of the second plus ``eps``. Where gradients are small
against ``eps`` (deep or wide layers, a loss scaled down, low-precision gradients) the ``eps`` term
dominates and the step shrinks towards zero, so ``eps`` must be scaled with the model. Everett et
al. (2024) replace the division by ``a * atan2(m_hat, b * sqrt(v_hat))``: for small ratios it is
Adam's ``(a / b) * m_hat / sqrt(v_hat)``, it never exceeds ``a * pi / 2`` in magnitude (Adam's
ratio reaches about ``(1 - b1) / sqrt(1 - b2)`` on a spike after a quiet stretch: 3.2 for the
defaults, 10 for ``b2 = 0.9999``), it has no ``eps`` to tune, and multiplying every gradient by a
constant leaves it unchanged.

- :func:`scale_by_adam_atan2`: the scaling (moments, bias correction, atan2, decoupled weight
  decay), to chain before a learning rate.
- :func:`adam_atan2`: the optimizer, ``optax.adamw``'s arguments without ``eps``.

Like the other optimizers of jaxstab it keeps its moments in float32 whatever the parameters'
dtype and gates non-finite values per tensor: a tensor whose gradient holds a NaN/Inf, or whose
sum of squares overflows float32 (a norm above about 1.8e19), gets an all-zero update and keeps
its moments, while the other tensors step as usual; ``nonfinite`` counts such tensors, and the
step count advances unless every tensor was gated. Complex parameters raise ``TypeError``: atan2
is defined for real numbers only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxstab import _checks, _norms
from jaxstab._norms import AxisName
from jaxstab.optimizers import _adam
from jaxstab.optimizers._adam import Mask
from jaxstab.telemetry import telemetry_state

_F32 = jnp.float32
# atan(t) = t + t**3 * P(t**2) on [0, 1]: P's coefficients, lowest first, fitted (weighted least
# squares on Chebyshev nodes, iterated towards minimax) to a relative error of 1.8e-8 in float64.
_ATAN_P = (
    -0.3333315772252511,
    0.19993832319995103,
    -0.14211217326481468,
    0.10665703997876214,
    -0.0755004251711262,
    0.043172030444085324,
    -0.016336433288208885,
    0.002911391064013319,
)

_HALF_PI_HIGH = float(np.float32(np.pi / 2))
_HALF_PI_LOW = float(np.float32(np.pi / 2 - _HALF_PI_HIGH))


def atan2_nonnegative(y: jax.Array, x: jax.Array) -> jax.Array:
    """``atan2(y, x)`` for ``x >= 0``, in one fused elementwise pass of two divisions and a
    polynomial.

    XLA:CPU runs ``lax.atan2`` one element at a time (about ten times the cost of Adam's
    ``m / (sqrt(v) + eps)``); this form vectorizes. ``atan`` of ``t = |y| / x`` or of its
    inverse, whichever lies in ``[0, 1]``, is a degree-15 odd polynomial exact to float32
    rounding, and ``pi / 2`` minus it covers ``|y| > x``: within 1.5 ulp of the exact value for
    normal results (``lax.atan2``: 1.3). ``atan2(+-0, 0) = +-0`` and ``atan2(+-inf, x) = +-pi /
    2`` for finite ``x``; NaN in, NaN out. Float64 (under ``jax_enable_x64``) takes
    ``lax.atan2``, as the polynomial is exact to float32 only.

    ``x`` is used twice only (XLA:CPU then fuses the whole computation into the optimizer's
    update; a third use, as in a ratio of the smaller to the larger, makes it write ``sqrt(v)``
    and the ratio out as full arrays).
    """
    if jnp.dtype(y.dtype) == jnp.float64:
        return jax.lax.atan2(y, x)
    ay = jnp.abs(y)
    flip = ay > x
    # x floored at the smallest normal: 0 / 0 is 0 here, as atan2(0, 0).
    q = ay / jnp.maximum(x, jnp.finfo(y.dtype).tiny)
    t = _norms.select(flip, 1 / q, q)
    z = t * t
    p = _ATAN_P[-1]
    for c in _ATAN_P[-2::-1]:
        p = p * z + c
    tail = t * z * p
    # pi/2 - atan(t) with pi/2 in two float32 parts, the small one beside the polynomial's tail
    # (the rounding of pi/2 alone is 0.7 ulp of a result near pi/4; XLA folds a plain ``+ low``).
    r = _norms.select(flip, (_HALF_PI_HIGH - t) + (_HALF_PI_LOW - tail), t + tail)
    return jnp.copysign(r, y)


@telemetry_state("scale_by_adam_atan2", ("nonfinite",))
class ScaleByAdamAtan2State(NamedTuple):
    """State of :func:`scale_by_adam_atan2`: Adam's moments and this step's telemetry."""

    count: jax.Array  # int32, steps with at least one finite tensor so far
    mu: optax.Updates  # first moment, float32 (or mu_dtype)
    nu: optax.Updates  # second moment, float32
    nonfinite: jax.Array  # float32 number of tensors gated (zero update, moments kept)


def _check_scale(name: str, value) -> None:
    """Raises ``ValueError`` unless ``value`` is in ``(0, inf)``: an infinite ``a`` would turn
    the zero direction of a zero gradient into NaN (``inf * 0``)."""
    _checks.check_range(name, value, low=0, low_open=True)
    if isinstance(value, int | float | np.floating) and np.isinf(value):
        raise ValueError(f"{name} must be in (0, inf), got {value!r}")


def _refuse_complex(tree, name: str) -> None:
    """Raises ``TypeError`` naming the first complex leaf of ``tree``."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.complexfloating):
            where = _norms.path_str(path) or "the root"
            raise TypeError(
                f"adam_atan2 needs real {name} (atan2 has no complex form), got {x.dtype} at "
                f"{where}; use optax.adamw or jaxstab.stable_adamw for complex parameters"
            )


def scale_by_adam_atan2(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    *,
    a: float | jax.Array = 1.27,
    b: float | jax.Array = 1.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam-atan2's scaling: Adam's moments, ``a * atan2(m_hat, b * sqrt(v_hat))`` (no eps).

    Adam's moments and bias correction, as ``optax.scale_by_adam``:

    .. math::

      m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
      v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
      \hat m_t = \frac{m_t}{1 - \beta_1^t}, \quad \hat v_t = \frac{v_t}{1 - \beta_2^t},

    then, entry by entry, the direction :math:`a \operatorname{atan2}(\hat m_t, b \sqrt{\hat v_t})`
    in place of Adam's :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)`, and with
    ``weight_decay`` :math:`\lambda` the decoupled :math:`+ \lambda \theta` of
    ``optax.add_decayed_weights`` (here, as it must come before the learning rate; chain
    ``optax.scale_by_learning_rate`` after it, or use :func:`adam_atan2`). Properties:

    - **Bounded**: every entry of the direction lies in :math:`[-a\pi/2, a\pi/2]`, however far
      the second moment lags behind a spike.
    - **No epsilon, scale invariant**: gradients multiplied by any :math:`c > 0` give the same
      direction (atan2 of two numbers scaled alike), within the range float32 moments hold:
      ``(1 - b2) * g**2`` must be a normal float32, so gradients from about
      ``1e-19 / sqrt(1 - b2)`` (3.5e-18 for ``b2 = 0.999``) to 1.8e19. Below, the second moment
      underflows to 0 and the entry steps ``a * pi / 2`` in its sign, never NaN; above, the
      tensor is gated (see below). Float64 parameters keep float64 moments and their range.
    - **Adam where it is Adam-like**: for :math:`|\hat m| \ll b \sqrt{\hat v}` the direction
      is :math:`(a / b)\, \hat m / \sqrt{\hat v}`; a steady gradient
      (:math:`\hat m = g`, :math:`\hat v = g^2`) steps :math:`a \operatorname{atan2}(1, b)`,
      0.997 for the defaults (:math:`a = 1.27 \approx 4/\pi`), where Adam steps 1.
    - A zero gradient with zero moments gives ``atan2(0, 0) = 0``: no NaN.

    A tensor whose gradient is not finite (or whose sum of squares overflows float32) gets zeros
    and keeps its moments; the others step as usual. Cost: Adam's elementwise pass (an atan2 in
    place of the division) and one reduction per tensor, its sum of squares, for the gating.

    Args:
      b1: decay of the first moment, in ``[0, 1)``; 0.9 (``optax.adamw``'s).
      b2: decay of the second moment, in ``[0, 1)``; 0.999 (``optax.adamw``'s; the PyTorch
        reference implementation uses 0.99).
      a: scale of the direction, ``> 0``; 1.27, as in the PyTorch implementation of the paper
        (lucidrains/adam-atan2-pytorch).
      b: scale of the second moment's root inside atan2, ``> 0``; 1, as there. Smaller ``b``
        makes the step more sign-like.
      mu_dtype: optional dtype of the first moment; by default float32 (at least), whatever the
        parameters' dtype. The second moment is always float32 (at least).
      weight_decay: decoupled weight decay ``lambda`` (a number or a schedule of the step);
        ``>= 0``. Needs ``params`` in ``update``.
      mask: which parameters decay, as in ``optax.add_decayed_weights``: a tree of bools that is
        a prefix of the parameters, or a callable returning one.
      axis_name: inside ``shard_map``/``pmap`` with tensors sharded across devices, the mapped
        axis name(s): the per-tensor finiteness check becomes global with one ``psum``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds the moments and
      ``nonfinite`` (see :func:`jaxstab.telemetry`). The float hyperparameters may be injected
      with ``optax.inject_hyperparams``. Complex parameters or gradients raise ``TypeError``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab import scale_by_adam_atan2
      >>> tx = scale_by_adam_atan2()
      >>> state = tx.init({"w": jnp.zeros(4)})
      >>> g = {"w": jnp.array([1e-12, 3.0, 0.0, -1e12])}
      >>> updates, state = tx.update(g, state)
      >>> updates["w"].round(3)  # a * atan2(g, |g|) whatever the scale; 0 stays 0
      Array([ 0.997,  0.997,  0.   , -0.997], dtype=float32)
      >>> for _ in range(3):  # a gradient that flips sign moves m_hat first: smaller steps
      ...     updates, state = tx.update({"w": -g["w"]}, state)
      ...     print(*(round(float(u), 3) for u in updates["w"]))
      -0.067 -0.067 0.0 0.067
      -0.486 -0.486 0.0 0.486
      -0.664 -0.664 0.0 0.664

    References:
      Everett, Xiao, Wortsman et al., `Scaling Exponents Across Parameterizations and Optimizers
      <https://arxiv.org/abs/2407.05872>`_, ICML 2024.
    """
    _adam.check_adam(b1, b2, weight_decay=0.0 if callable(weight_decay) else weight_decay)
    _check_scale("a", a)
    _check_scale("b", b)

    def init_fn(params):
        _refuse_complex(params, "parameters")
        mu, nu = _adam.init_moments(params, mu_dtype)
        return ScaleByAdamAtan2State(jnp.zeros((), jnp.int32), mu, nu, jnp.zeros((), _F32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        treedef, grads = _adam.flatten(updates, state.mu)
        _refuse_complex(grads, "gradients")
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        decays = _adam.decayed_leaves(params, treedef, weight_decay, mask, state.count)
        b1_, b2_, a_, b_ = map(_adam.hyper, (b1, b2, a, b))
        step = optax.safe_increment(state.count)
        bc1, bc2 = _adam.bias_correction(b1_, step), _adam.bias_correction(b2_, step)
        finite, _, any_finite, nonfinite = _adam.gate_by_sum_of_squares(grads, axis_name)
        # atan2(y, x) = atan2(s y, s x) for s > 0: with s = sqrt(1 - b2**t) / b the bias
        # corrections and b fold into one scalar on the first moment, one multiply per entry.
        ratio = jnp.sqrt(bc2) / (b_ * bc1)

        out, out_mu, out_nu = [], [], []
        for ok, raw, m, v, decay in zip(finite, grads, mus, nus, decays, strict=True):
            g = raw.astype(_adam.stat_dtype(raw.dtype))
            new_m = (1 - b1_) * g + b1_ * m.astype(g.dtype)
            new_v = (1 - b2_) * _norms.abs_sq(g) + b2_ * v
            sel_m, sel_v = _adam.accept(ok, new_m, m, new_v, v)
            y = ratio * sel_m
            direction = a_ * atan2_nonnegative(y, jnp.sqrt(sel_v).astype(y.dtype))
            out.append(_adam.finish(direction, decay, ok.astype(_F32), raw.dtype))
            out_mu.append(sel_m.astype(m.dtype))
            out_nu.append(sel_v)
        new_state = ScaleByAdamAtan2State(
            jnp.where(any_finite, step, state.count),
            treedef.unflatten(out_mu),
            treedef.unflatten(out_nu),
            nonfinite,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_atan2(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    *,
    a: float | jax.Array = 1.27,
    b: float | jax.Array = 1.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Adam-atan2 (Everett et al. 2024): ``optax.adamw`` without ``eps``, its step bounded.

    Each parameter moves by ``-learning_rate * (a * atan2(m_hat, b * sqrt(v_hat)) + weight_decay
    * param)``: Adam's moments and bias correction, the division replaced by an atan2 (see
    :func:`scale_by_adam_atan2`), the weight decay decoupled and placed as in ``optax.adamw``
    (added to the direction, then multiplied by the learning rate; the PyTorch reference
    implementation multiplies it by ``learning_rate / initial learning_rate`` instead).

    A drop-in for ``optax.adamw`` called with keywords: ``learning_rate``, ``b1``, ``b2``,
    ``mu_dtype``, ``weight_decay`` and ``mask`` mean what they mean there, with its defaults.
    There is no ``eps`` and no ``eps_root``; for that reason every argument after ``b2`` is
    keyword-only, so that ``optax.adamw``'s positional ``eps`` cannot land in ``a``.

    Args:
      learning_rate: a number or a schedule of the step.
      b1, b2, mu_dtype, weight_decay, mask: as in ``optax.adamw`` (defaults 0.9, 0.999, None,
        1e-4, None); the moments are float32 (at least) unless ``mu_dtype`` sets the first one's.
      a: scale of the direction; ``> 0``, 1.27 (see :func:`scale_by_adam_atan2`). Each step of
        a parameter is at most ``learning_rate * (a * pi / 2 + weight_decay * |param|)``.
      b: scale of the second moment's root inside atan2; ``> 0``, 1.
      axis_name: inside ``shard_map``/``pmap`` with tensors sharded across devices, the mapped
        axis name(s).

    Returns:
      An ``optax.GradientTransformationExtraArgs``, a chain of :func:`scale_by_adam_atan2`
      (telemetry ``nonfinite``) and ``optax.scale_by_learning_rate``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxstab
      >>> from jaxstab import adam_atan2
      >>> params = {"w": jnp.ones(2)}
      >>> tiny = {"w": jnp.array([1e-10, -1e-10])}  # gradients far below Adam's eps
      >>> for tx in (optax.adamw(1e-3, weight_decay=0.0), adam_atan2(1e-3, weight_decay=0.0)):
      ...     updates, _ = tx.update(tiny, tx.init(params), params)
      ...     print(updates["w"] / 1e-3)  # in units of the learning rate
      [-0.0099  0.0099]
      [-0.9975  0.9975]
      >>> tx = adam_atan2(1e-3)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
      >>> updates["w"], int(state[0].count)  # one NaN gates the whole tensor, nothing learned
      (Array([0., 0.], dtype=float32), 0)
      >>> {k: float(v) for k, v in jaxstab.telemetry(state).items()}
      {'0/scale_by_adam_atan2/nonfinite': 1.0}

    References:
      Everett, Xiao, Wortsman et al., `Scaling Exponents Across Parameterizations and Optimizers
      <https://arxiv.org/abs/2407.05872>`_, ICML 2024.
    """
    return optax.chain(
        scale_by_adam_atan2(
            b1,
            b2,
            a=a,
            b=b,
            mu_dtype=mu_dtype,
            weight_decay=weight_decay,
            mask=mask,
            axis_name=axis_name,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
