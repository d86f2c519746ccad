"""Norms of gradient trees: float32, overflow-safe, single pass in the common case.

Everything here is a pure function of arrays; the transforms build on it. Sums of squares are
accumulated in float32 whatever the leaf dtype. When a sum leaves the range where float32 squares
are exact (it overflows, or it is so small that squares fall into subnormals), it is computed again
from values multiplied by a power of two that brings their squares into range, inside a
``lax.cond`` that runs only in that rare case: the common case reads every gradient once. Norms
from about 1e-35 up to float32's largest value (3.4e38) come out right; optax's overflow to Inf
from a norm of 1.8e19 on (float32) or from float16 elements of 256.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Sums of squares inside [_SUMSQ_LO, _SUMSQ_HI] are trusted. The upper bound is float32's largest
# finite value; the lower one keeps every square that matters above float32's smallest normal
# (1.2e-38) for trees of up to 1e12 elements, so flushed subnormals cost < 1e-6 relative error.
_SUMSQ_LO = 1e-20
_SUMSQ_HI = float(jnp.finfo(jnp.float32).max)
# Rescue factors (exact powers of two): a sum above _SUMSQ_HI means a norm in [1.8e19, 3.4e38],
# whose values times 2**-70 have squares in [2e-4, 1e35]; a sum below _SUMSQ_LO means a norm
# under 1e-10, whose values times 2**70 have squares that sum to at most 1.4e22.
_DOWN = 2.0**-70
_UP = 2.0**70
# The global norm's rescue branch reduces leaves of up to _GROUP_LEAF elements in concatenated
# groups of up to _GROUP_SIZE elements: one reduction per group instead of one per leaf keeps the
# compile time of trees with thousands of small leaves near optax's, at a temporary of 64 MiB.
_GROUP_LEAF = 2**20
_GROUP_SIZE = 2**24

KeyPath = tuple[Any, ...]
# The ``axis_name`` of every public function: the mapped axis name(s) of ``shard_map``/``pmap``.
AxisName = str | Sequence[str] | None


def is_array_leaf(x) -> bool:
    """Whether ``x`` is a floating-point array leaf that carries gradient (not None/MaskedNode)."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def float_leaves(tree) -> list[jax.Array]:
    """The floating-point leaves of ``tree``; None, ``optax.MaskedNode`` and integers dropped."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return [x for x in leaves if is_array_leaf(x)]


def sumsq(x: jax.Array, axis=None, keepdims: bool = False, scale=None) -> jax.Array:
    """Sum of squared magnitudes of ``x`` (times ``scale``, if given) accumulated in float32."""
    x32 = jnp.abs(x).astype(jnp.float32) if jnp.iscomplexobj(x) else x.astype(jnp.float32)
    if scale is not None:
        x32 = x32 * scale
    return jnp.sum(x32 * x32, axis=axis, keepdims=keepdims)


def _trusted(ssq: jax.Array) -> jax.Array:
    return (ssq >= _SUMSQ_LO) & (ssq <= _SUMSQ_HI)


def _rescue_scale(ssq: jax.Array) -> jax.Array:
    """The power of two that brings the squares behind an untrusted ``ssq`` into range."""
    return jnp.where(ssq > _SUMSQ_HI, _DOWN, _UP).astype(jnp.float32)


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _grouped_sumsq(leaves: Sequence[jax.Array], scale: jax.Array) -> jax.Array:
    """``sum(sumsq(x, scale=scale) for x in leaves)`` with small leaves reduced in groups."""
    parts, group, size = [], [], 0
    for x in leaves:
        if x.size > _GROUP_LEAF:
            parts.append(sumsq(x, scale=scale))
            continue
        if group and size + x.size > _GROUP_SIZE:
            parts.append(sumsq(jnp.concatenate(group), scale=scale))
            group, size = [], 0
        group.append(jnp.ravel(x).astype(jnp.float32))
        size += x.size
    if group:
        parts.append(sumsq(jnp.concatenate(group), scale=scale))
    return sum(parts)


def global_norm(tree, *, axis_name: AxisName = None) -> jax.Array:
    """L2 norm of all floating-point leaves of ``tree`` as a float32 scalar.

    Unlike ``optax.global_norm``, the result is right for every norm float32 represents: float16
    leaves of 300 or float32 leaves of 1e20 (whose squares overflow) and tiny gradients (whose
    squares underflow) are summed again from values rescaled by a power of two, in a branch that
    runs only then. ``None`` leaves and ``optax.MaskedNode`` are ignored, integer leaves skipped;
    a NaN anywhere gives NaN and an Inf (without NaN) gives Inf.

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
      >>> float(jaxstab.global_norm([jnp.full((4,), 1e20)]))
      2e+20
    """
    leaves = float_leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    ssq = _psum(sum(sumsq(x) for x in leaves), axis_name)

    def rescue(s):
        scale = _rescue_scale(s)
        return jnp.sqrt(_psum(_grouped_sumsq(leaves, scale), axis_name)) / scale

    return jax.lax.cond(_trusted(ssq), jnp.sqrt, rescue, ssq)


def unit_norms(
    leaves: Sequence[jax.Array],
    axes: Sequence[tuple[int, ...]],
    *,
    axis_name: AxisName = None,
) -> list[jax.Array]:
    """Per-unit float32 L2 norms of each leaf, reduced over its ``axes`` (kept as size-1 dims).

    Overflow-safe like :func:`global_norm`, with one rescue branch for all leaves that runs only
    when some unit needs it. A unit whose squares all underflow to exactly 0 keeps norm 0 (for
    clipping such a unit is far below any threshold), so all-zero units cost no second pass. With
    ``axis_name`` the sums of squares are summed over devices, for leaves sharded along reduced
    axes (e.g. whole-leaf norms of a sharded tree).
    """
    if not leaves:
        return []
    ssq = [
        _psum(sumsq(x, axis=a, keepdims=True), axis_name)
        for x, a in zip(leaves, axes, strict=True)
    ]
    bad = [~(_trusted(s) | (s == 0)) for s in ssq]

    def rescue(ssq):
        out = []
        for x, a, s, b in zip(leaves, axes, ssq, bad, strict=True):
            scale = _rescue_scale(s)
            exact = jnp.sqrt(_psum(sumsq(x, axis=a, keepdims=True, scale=scale), axis_name))
            out.append(jnp.where(b, exact / scale, jnp.sqrt(s)))
        return out

    any_bad = jnp.any(jnp.stack([jnp.any(b) for b in bad]))
    return jax.lax.cond(any_bad, rescue, lambda ssq: [jnp.sqrt(s) for s in ssq], ssq)


def clip_factor(norm: jax.Array, max_norm) -> jax.Array:
    """Float32 factor that brings ``norm`` down to ``max_norm``: ``min(1, max_norm / norm)``.

    Exactly 1 when ``norm <= max_norm`` (the update is untouched) and 0 when ``norm`` is not
    finite (the update becomes zeros, never NaN). Works elementwise on per-unit norms too.
    """
    max_norm = jnp.asarray(max_norm, jnp.float32)
    over = norm > max_norm
    factor = jnp.where(over, max_norm / jnp.where(over, norm, 1.0), 1.0)
    return jnp.where(jnp.isfinite(norm), factor, 0.0)


def scale_leaf(x: jax.Array, factor: jax.Array) -> jax.Array:
    """``x * factor`` in ``x``'s dtype, multiplied in float32 (at least), zero where factor is 0.

    ``factor`` is a float32 scalar or broadcastable per-unit array. A factor of 0 gives exact
    zeros even where ``x`` is NaN/Inf, so a rejected step cannot leak a NaN; the select has a
    scalar-shaped predicate, which XLA fuses into the consumer (the optimizer's update).
    """
    wide = jnp.promote_types(x.dtype, jnp.float32)
    scaled = (x.astype(wide) * factor).astype(x.dtype)
    return jnp.where(factor == 0, jnp.zeros((), x.dtype), scaled)


def scale_tree(tree, factor: jax.Array):
    """Applies :func:`scale_leaf` with one scalar ``factor`` to every float leaf of ``tree``."""
    return jax.tree.map(lambda x: scale_leaf(x, factor) if is_array_leaf(x) else x, tree)


# --------------------------------------------------------------------------------------------
# Layouts: which axes of a leaf form one unit


def path_str(path: KeyPath) -> str:
    """A key path as a ``/``-joined string, e.g. ``"Dense_0/kernel"``."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


_ATTENTION_INPUTS = frozenset({"query", "key", "value"})


def flax_unit_axes(path: KeyPath, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Reduction axes of one unit for a leaf of a Flax model, from its path and shape.

    A unit is one output neuron (or channel); its norm reduces over everything that feeds it:

    - biases and scales (any rank, e.g. attention's ``(heads, head_dim)`` bias), vectors and
      scalars: the whole leaf;
    - ``query``/``key``/``value`` kernels ``(features, heads, head_dim)``: axis 0 (the input);
    - every other ``kernel`` -- Dense ``(in, out)``, Conv ``(..., in, out)``, the attention
      output projection ``(heads, head_dim, features)``: all axes but the last;
    - other leaves follow optax's rules by rank: 2 and 3 reduce axis 0, 4 and 5 all but the last.

    On unnamed leaves (lists, tuples) the result equals ``optax.adaptive_grad_clip``'s layouts.

    Example:
      >>> from jax.tree_util import DictKey as K
      >>> from jaxstab import flax_unit_axes
      >>> flax_unit_axes((K("out"), K("kernel")), (8, 16, 64))
      (0, 1)
      >>> flax_unit_axes((K("query"), K("kernel")), (64, 8, 16))
      (0,)
    """
    keys = path_str(path).split("/")
    name, parent = keys[-1], (keys[-2] if len(keys) > 1 else "")
    ndim = len(shape)
    if sum(d != 1 for d in shape) <= 1 or name in ("bias", "scale"):
        return tuple(range(ndim))
    if name == "kernel" and parent not in _ATTENTION_INPUTS:
        return tuple(range(ndim - 1))
    if ndim in (2, 3):
        return (0,)
    if ndim in (4, 5):
        return tuple(range(ndim - 1))
    raise ValueError(
        f"adaptive_grad_clip has no default unit layout for leaf {path_str(path)!r} of shape "
        f"{shape}; pass axis= or unit_axes= to choose its reduction axes"
    )


# --------------------------------------------------------------------------------------------
# Per-tensor norms


def leaf_norms(leaves: Sequence[jax.Array], *, axis_name=None) -> jax.Array:
    """Float32 L2 norm of each array in ``leaves``, as a vector of shape ``(len(leaves),)``.

    Overflow-safe like :func:`global_norm` (:func:`unit_norms` over whole leaves). With
    ``axis_name`` (inside ``shard_map``/``pmap``) each norm is taken over the leaf's shards on all
    devices. The global norm of the tree is ``global_norm(leaf_norms(...))``.
    """
    if not leaves:
        return jnp.zeros((0,), jnp.float32)
    axes = [tuple(range(x.ndim)) for x in leaves]
    norms = unit_norms(leaves, axes, axis_name=axis_name)
    return jnp.stack([n.reshape(()) for n in norms])
