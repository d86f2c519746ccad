"""Norms of gradient trees: float32, overflow-safe, single pass in the common case.

Everything here is a pure function of arrays; the transforms build on it. The sum of squares is
accumulated in float32 whatever the leaf dtype. When it leaves the range where float32 squares are
exact enough (it overflows, or it is so small that squares fall into subnormals), the norm is
computed again from values rescaled by their largest magnitude, inside a ``lax.cond`` that only
runs in that rare case: the common case reads every gradient once.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

# Sums of squares inside [_SUMSQ_LO, _SUMSQ_HI] are trusted; outside it the norm is recomputed
# from rescaled values. The upper bound is float32's largest finite value; the lower one keeps
# every square that matters above float32's smallest normal (1.2e-38) for trees of up to 1e12
# elements, so flushed subnormals cost less than 1e-6 relative error.
_SUMSQ_LO = 1e-20
_SUMSQ_HI = float(jnp.finfo(jnp.float32).max)


def is_array_leaf(x) -> bool:
    """Whether ``x`` is a floating-point array leaf that carries gradient (not None/MaskedNode)."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def float_leaves(tree) -> list[jax.Array]:
    """The floating-point leaves of ``tree``; None, ``optax.MaskedNode`` and integers dropped."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return [x for x in leaves if is_array_leaf(x)]


def sumsq(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Sum of squared magnitudes of ``x`` accumulated in float32."""
    x32 = jnp.abs(x).astype(jnp.float32) if jnp.iscomplexobj(x) else x.astype(jnp.float32)
    return jnp.sum(x32 * x32, axis=axis, keepdims=keepdims)


def max_abs(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Largest magnitude of ``x`` in float32 (0 for an empty array)."""
    return jnp.max(jnp.abs(x).astype(jnp.float32), axis=axis, keepdims=keepdims, initial=0.0)


def _scaled_norm(scale: jax.Array, ssq_of_scaled: jax.Array) -> jax.Array:
    """``scale * sqrt(ssq_of_scaled)``, where ``scale`` (a max-abs) may be 0, Inf or NaN."""
    safe = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
    return jnp.where(jnp.isfinite(scale) & (scale > 0), safe * jnp.sqrt(ssq_of_scaled), scale)


def _trusted(ssq: jax.Array) -> jax.Array:
    return (ssq >= _SUMSQ_LO) & (ssq <= _SUMSQ_HI)


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmax(x, axis_name):
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def global_norm(tree, *, axis_name: str | Sequence[str] | None = None) -> jax.Array:
    """L2 norm of all floating-point leaves of ``tree`` as a float32 scalar.

    Unlike ``optax.global_norm``, the result is right for every representable norm: float16
    leaves of 300 or float32 leaves of 1e20 (whose squares overflow) and tiny gradients whose
    squares underflow are rescaled by their largest magnitude in a branch that runs only then.
    ``None`` leaves and ``optax.MaskedNode`` are ignored, integer leaves skipped; a NaN anywhere
    gives NaN and an Inf (without NaN) gives Inf.

    Args:
      tree: a pytree of arrays (gradients, updates, parameters).
      axis_name: inside ``shard_map``/``pmap``, where each device holds a shard of the tree, the
        mapped axis name(s) to reduce over: the norm is then global, with one ``psum``.

    Returns:
      A float32 scalar.

    Example:
      >>> import jax.numpy as jnp, jaxstab
      >>> float(jaxstab.global_norm({"a": jnp.array([3.0, 4.0]), "b": None}))
      5.0
      >>> float(jaxstab.global_norm({"a": jnp.full((4,), 300.0, jnp.float16)}))
      600.0
    """
    leaves = float_leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    ssq = _psum(sum(sumsq(x) for x in leaves), axis_name)

    def rescaled(_):
        m = _pmax(jnp.max(jnp.stack([max_abs(x) for x in leaves])), axis_name)
        inv = jnp.where((m > 0) & jnp.isfinite(m), 1.0 / m, 1.0)
        s = _psum(sum(sumsq(x.astype(jnp.float32) * inv) for x in leaves), axis_name)
        return _scaled_norm(m, s)

    return jax.lax.cond(_trusted(ssq), jnp.sqrt, rescaled, ssq)


def unit_norms(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Per-unit L2 norms of ``x`` reduced over ``axes`` (kept as size-1 dims), float32.

    Overflow-safe like :func:`global_norm`: units whose sum of squares overflows or is tiny are
    recomputed from values rescaled by the unit's largest magnitude, in a branch that runs only
    when some unit needs it. A unit whose squares all underflow to exactly 0 keeps norm 0 (for
    clipping, such a unit is far below any threshold), so all-zero units cost no second pass.
    """
    ssq = sumsq(x, axis=axes, keepdims=True)
    bad = ~(_trusted(ssq) | (ssq == 0))

    def rescaled(s):
        m = max_abs(x, axis=axes, keepdims=True)
        inv = jnp.where((m > 0) & jnp.isfinite(m), 1.0 / m, 1.0)
        exact = _scaled_norm(m, sumsq(x.astype(jnp.float32) * inv, axis=axes, keepdims=True))
        return jnp.where(bad, exact, jnp.sqrt(s))

    return jax.lax.cond(jnp.any(bad), rescaled, jnp.sqrt, ssq)
