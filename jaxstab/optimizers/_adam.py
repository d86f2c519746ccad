"""Adam's shared machinery: moments, bias correction, decoupled weight decay, per-tensor gating.

Pure functions over JAX arrays that the Adam variants of :mod:`jaxstab.optimizers` build on, so
the math that makes them drop-ins for ``optax.adamw`` lives in one place: the moments are float32
(at least) whatever the parameters' dtype, the bias correction rounds as optax's does, weight
decay follows ``optax.add_decayed_weights`` (mask included), and a tensor whose gradient is not
finite gets an exact-zero update and keeps its moments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import _checks, _norms
from jaxstab._norms import AxisName

_F32 = jnp.float32

# The ``mask`` of every factory: optax's (a tree of bools that is a prefix of the parameters, or a
# callable returning one), or None (every parameter decays).
Mask = Any | Callable[[optax.Params], Any] | None


def hyper(x):
    """A float hyperparameter for float32 arithmetic: Python numbers stay weakly typed (so the
    arithmetic rounds as optax's own), arrays injected by ``optax.inject_hyperparams`` (possibly
    in the parameters' float16/bfloat16) become float32."""
    return x if isinstance(x, int | float) else jnp.asarray(x, _F32)


def stat_dtype(dtype) -> jnp.dtype:
    """Statistics are at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, _F32)


def real(dtype) -> jnp.dtype:
    """The real dtype of a complex ``dtype`` (complex64: float32); others unchanged."""
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def check_adam(b1, b2, eps=0.0, eps_root=0.0, weight_decay=0.0):
    """Raises naming the argument unless the decays are in ``[0, 1)`` and the rest ``>= 0``."""
    _checks.check_range("b1", b1, low=0, high=1, high_open=True)
    _checks.check_range("b2", b2, low=0, high=1, high_open=True)
    _checks.check_range("eps", eps, low=0)
    _checks.check_range("eps_root", eps_root, low=0)
    _checks.check_range("weight_decay", weight_decay, low=0)


def init_moments(params, mu_dtype):
    """Zero first and second moments: float32 at least, the first in ``mu_dtype`` if given; the
    second is real (``|g|**2``) for complex parameters."""
    mu = jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype or stat_dtype(p.dtype)), params)
    nu = jax.tree.map(lambda p: jnp.zeros(p.shape, stat_dtype(real(p.dtype))), params)
    return mu, nu


def decayed_leaves(params, treedef, weight_decay, mask, count) -> list:
    """Per leaf of ``treedef``: ``(rate, param)`` to add ``rate * param``, or None (no decay).

    ``mask`` is optax's: a tree of bools that is a prefix of the parameters (``True`` decays),
    or a callable giving one from the parameters. A schedule is evaluated at ``count``.
    """
    if isinstance(weight_decay, int | float) and weight_decay == 0:
        return [None] * treedef.num_leaves
    if params is None:
        raise ValueError("weight_decay needs the parameters: pass params= to update")
    rate = hyper(weight_decay(count) if callable(weight_decay) else weight_decay)
    leaves = treedef.flatten_up_to(params)
    if mask is None:
        return [(rate, p) for p in leaves]
    flags = mask(params) if callable(mask) else mask
    full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub), flags, params)
    flags = treedef.flatten_up_to(full)
    return [(rate, p) if on else None for on, p in zip(flags, leaves, strict=True)]


@functools.partial(jax.jit, inline=True)
def bias_correction(decay, count):
    """``1 - decay**count`` in float32, computed as optax does (eager ``**`` rounds otherwise)."""
    return 1 - decay**count


def adam_direction(mu, nu, bc1, bc2, eps, eps_root):
    """Adam's bias-corrected direction ``mu_hat / (sqrt(nu_hat + eps_root) + eps)``."""
    return (mu / bc1) / (jnp.sqrt(nu / bc2 + eps_root) + eps)


def finish(direction, decay, factor, dtype):
    """``factor * (direction + rate * param)`` in ``dtype``; exact zeros where factor is 0."""
    if decay is not None:
        rate, p = decay
        direction = direction + rate * p.astype(direction.dtype)
    return _norms.scale_leaf(direction, factor).astype(dtype)


def accept(ok, new_m, m, new_v, v):
    """The new moments if the step is accepted, else the old ones (float32).

    The update is then computed from these, not from the new moments: on a rejected step it is
    zeroed anyway, and this way each moment's buffer is read once and rewritten in place (reading
    the old moments for the update as well would make XLA copy them first).
    """
    return _norms.select(ok, new_m, m.astype(new_m.dtype)), _norms.select(ok, new_v, v)


def flatten(updates, mu):
    """The updates' tree structure and leaves, after checking they match the moments'."""
    _checks.check_same_structure("updates", updates, "the optimizer state's moments", mu)
    treedef = jax.tree.structure(updates)
    return treedef, treedef.flatten_up_to(updates)


class Gate(NamedTuple):
    """Which tensors of a step are finite (see :func:`gate_by_sum_of_squares`)."""

    finite: list[jax.Array]  # per tensor, a bool scalar of its own
    finite_each: jax.Array  # the same as one bool vector (length >= 1), for telemetry
    any_finite: jax.Array  # bool: at least one tensor is finite, or there is none
    nonfinite: jax.Array  # float32 number of tensors that are not


def gate_by_sum_of_squares(grads: list[jax.Array], axis_name: AxisName = None) -> Gate:
    """Per-tensor finiteness from one reduction per tensor: its sum of squares.

    A tensor is not finite when its gradient holds a NaN/Inf or its sum of squares overflows the
    statistics' dtype (float32: a norm above about 1.8e19), so that a second moment built from it
    is finite too. A sum of squares is the cheapest reduction XLA:CPU runs (about half the time of
    a largest magnitude); the barrier keeps XLA from sharing its squares with the second moment's
    update (it would write them out as a full array). With ``axis_name`` (tensors sharded inside
    ``shard_map``) the sums are global, one ``psum``.
    """
    each = [
        jnp.sum(_norms.abs_sq(x.astype(stat_dtype(x.dtype))))
        for x in jax.lax.optimization_barrier(grads)
    ]
    if axis_name is not None:
        with _checks.mapped_axis(axis_name):
            each = jax.lax.psum(each, axis_name)
    # Each tensor is gated by its own scalar: slicing one vector of all of them into every
    # tensor's update makes XLA's compile time grow quadratically with the tensors.
    finite = [jnp.isfinite(x) for x in each]
    finite_each = jnp.isfinite(jnp.stack(each or [jnp.zeros(())]))  # all tensors at once
    any_finite = jnp.any(finite_each) | (not grads)
    nonfinite = jnp.sum(~finite_each, dtype=_F32) if grads else jnp.zeros((), _F32)
    return Gate(finite, finite_each, any_finite, nonfinite)
