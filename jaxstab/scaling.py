"""Norm scaling: every update rescaled to one global norm (normalized gradient descent)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import _checks, _norms
from jaxstab._norms import AxisName
from jaxstab.telemetry import telemetry_state


@telemetry_state("normalize_by_global_norm", ("grad_norm", "scale"))
class NormalizeByGlobalNormState(NamedTuple):
    """Telemetry of :func:`normalize_by_global_norm` for the last step."""

    grad_norm: jax.Array  # float32 global norm of the incoming updates
    scale: jax.Array  # float32 factor applied (0 = zero or non-finite step)


def normalize_by_global_norm(
    target: float | jax.Array = 1.0,
    *,
    eps: float | jax.Array = 1e-6,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Scales updates to global norm ``target`` (normalized gradient descent).

    Updates are multiplied by ``target / max(norm, eps)``: every update with norm at least
    ``eps`` leaves with norm exactly ``target`` (up to rounding), smaller ones are scaled by
    ``target / eps`` rather than blown up to ``target``, zero gradients stay exactly zero, and a
    non-finite step gives an all-zero update -- never NaN. The norm is float32 and overflow-safe
    (float16 gradients of 300 are normalized, not zeroed); each leaf keeps its dtype, and the
    scale is one multiply fused into the optimizer's update.

    Args:
      target: the global norm of every update; ``>= 0``. May be injected with
        ``optax.inject_hyperparams``.
      eps: norms below this are treated as ``eps``; ``> 0``.
      axis_name: inside ``shard_map``/``pmap`` with the tree sharded across devices, the mapped
        axis name(s): the norm becomes global with one ``psum``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds ``grad_norm`` and ``scale``
      (see :func:`jaxstab.telemetry`).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.scaling import normalize_by_global_norm
      >>> tx = normalize_by_global_norm(2.0)
      >>> grads = {"w": jnp.array([0.3, 0.4])}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> updates["w"], float(state.scale)
      (Array([1.2, 1.6], dtype=float32), 4.0)
      >>> tx.update({"w": jnp.zeros(2)}, state)[0]["w"]
      Array([0., 0.], dtype=float32)

    References:
      Hazan, Levy & Shalev-Shwartz, `Beyond Convexity: Stochastic Quasi-Convex Optimization
      <https://arxiv.org/abs/1507.02030>`_, NeurIPS 2015 (normalized gradient descent).
    """
    _checks.check_range("target", target, low=0)
    _checks.check_range("eps", eps, low=0, low_open=True)

    def init_fn(params):
        del params
        return NormalizeByGlobalNormState(jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32))

    def update_fn(updates, state, params=None, **extra_args):
        del state, params, extra_args
        norm = _norms.global_norm(updates, axis_name=axis_name)
        target_ = jnp.asarray(target, norm.dtype)  # float64 for float64 leaves
        scale = target_ / jnp.maximum(norm, jnp.asarray(eps, norm.dtype))
        scale = jnp.where(jnp.isfinite(norm) & (norm > 0), scale, 0.0)
        f32 = lambda x: x.astype(jnp.float32)  # telemetry
        new_state = NormalizeByGlobalNormState(f32(norm), f32(scale))
        return _norms.scale_tree(updates, scale), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
