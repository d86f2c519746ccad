"""Norms of gradient trees: float32, overflow-safe, single pass in the common case.

Everything here is a pure function of arrays; the transforms build on it. Sums of squares are
accumulated in float32 for float32 and narrower leaves (float64 once a leaf is float64 or
complex128, under ``jax_enable_x64``); complex leaves count by their modulus. When a sum leaves the
range where squares are exact (it overflows, or it is so small that squares fall into subnormals),
it is computed again from values multiplied by a power of two that brings their squares into range.
On the CPU that second sum sits in a ``lax.cond`` that runs only in that rare case, so the common
case reads every gradient once. On GPU and TPU, where a conditional is a host round trip every
step, the plain and both rescaled sums are taken side by side in one pass and a select picks one
(see :func:`_per_platform`): no conditional in the compiled step.
Norms from about 1e-35 up to float32's largest value (3.4e38) come out right (float64: 1e-280 to
1.8e308); optax's overflow to Inf from a norm of 1.8e19 on (float32) or from float16 elements of
256.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxstab import _checks


class _Range(NamedTuple):
    """Where a sum of squares in one accumulation dtype is trusted, and the rescue factors."""

    low: float  # smallest trusted sum
    high: float  # largest trusted sum: the dtype's largest finite value
    down: float  # exact power of two for sums above ``high``
    up: float  # exact power of two for sums below ``low``


# float32: the lower bound keeps every square that matters above float32's smallest normal
# (1.2e-38) for trees of up to 1e12 elements, so flushed subnormals cost < 1e-6 relative error. A
# sum above the upper one means a norm in [1.8e19, 3.4e38], whose values times 2**-70 have squares
# in [2e-4, 1e35]; a sum below the lower one means a norm under 1e-10, whose values times 2**70
# have squares that sum to at most 1.4e22. float64: the same reasoning from its smallest normal
# (2.2e-308) and largest value (1.8e308).
_RANGES = {
    np.dtype(np.float32): _Range(1e-20, float(np.finfo(np.float32).max), 2.0**-70, 2.0**70),
    np.dtype(np.float64): _Range(1e-280, float(np.finfo(np.float64).max), 2.0**-600, 2.0**600),
}
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


def accumulation_dtype(leaves: Sequence[jax.Array]) -> np.dtype:
    """float32, or float64 when a leaf is float64 or complex128 (only under ``jax_enable_x64``)."""
    return np.dtype(jnp.result_type(jnp.float32, *(jnp.finfo(x.dtype).dtype for x in leaves)))


def _magnitude(x: jax.Array, dtype) -> jax.Array:
    """``|x|`` for complex ``x`` (its modulus, not its real part), ``x`` otherwise, as ``dtype``."""
    return (jnp.abs(x) if jnp.iscomplexobj(x) else x).astype(dtype)


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|**2`` per entry: ``x * x`` for real ``x``; for complex ``x`` its squared modulus
    ``re**2 + im**2`` in the real dtype (what a second moment of complex gradients holds, as in
    ``optax.scale_by_adam``)."""
    if jnp.iscomplexobj(x):
        return x.real * x.real + x.imag * x.imag
    return x * x


def sumsq(x: jax.Array, axis=None, keepdims: bool = False, scale=None, dtype=jnp.float32):
    """Sum of squared magnitudes of ``x`` (times ``scale``, if given) accumulated in ``dtype``."""
    x = _magnitude(x, dtype)
    if scale is not None:
        x = x * scale
    return jnp.sum(x * x, axis=axis, keepdims=keepdims)


def select(pred, on_true, on_false) -> jax.Array:
    """``jnp.where(pred, on_true, on_false)``, as one ``lax.select`` where no broadcasting is
    needed (a scalar ``pred`` with cases of one shape, or all three of one shape): ``jnp.where``
    traces a nested ``jit`` at every call, which adds up to seconds of compile time over hundreds
    of leaves. Where operands must broadcast it is ``jnp.where``, which also keeps their sharding.
    The cases take ``on_false``'s dtype."""
    on_false = jnp.asarray(on_false)
    on_true = jnp.asarray(on_true, on_false.dtype)
    pred = jnp.asarray(pred)
    if on_true.shape == on_false.shape and pred.shape in ((), on_false.shape):
        return jax.lax.select(pred, on_true, on_false)
    return jnp.where(pred, on_true, on_false)


def _trusted(ssq: jax.Array) -> jax.Array:
    r = _RANGES[ssq.dtype]
    return (ssq >= r.low) & (ssq <= r.high)


def _rescue_scale(ssq: jax.Array) -> jax.Array:
    """The power of two that brings the squares behind an untrusted ``ssq`` into range."""
    r = _RANGES[ssq.dtype]
    return select(ssq > r.high, r.down, jnp.full(ssq.shape, r.up, ssq.dtype))


def _psum(x, axis_name):
    if axis_name is None:
        return x
    with _checks.mapped_axis(axis_name):
        return jax.lax.psum(x, axis_name)


def _three_sums(x: jax.Array, axis, keepdims: bool, dtype) -> tuple[jax.Array, ...]:
    """The sums of squares of ``x``, of ``x`` times the rescue factor for overflow and of ``x``
    times the one for underflow: three reductions of one input, which GPU and TPU compilers fuse
    into one pass over ``x``."""
    r = _RANGES[np.dtype(dtype)]
    return tuple(
        sumsq(x, axis=axis, keepdims=keepdims, scale=scale, dtype=dtype)
        for scale in (None, r.down, r.up)
    )


def _from_three_sums(plain: jax.Array, down: jax.Array, up: jax.Array) -> jax.Array:
    """The norm from :func:`_three_sums`: the plain sum's root where it is trusted, else the
    root of the rescaled sum that brings its squares into range, scaled back (also for a unit
    whose squares all underflow to 0, which the branch form leaves at 0)."""
    r = _RANGES[plain.dtype]
    rescued = select(plain > r.high, jnp.sqrt(down) / r.down, jnp.sqrt(up) / r.up)
    return select(_trusted(plain), jnp.sqrt(plain), rescued)


# Which form of the overflow rescue the norms trace: "auto" picks per platform at lowering time;
# tests set "branchless" or "branch" to run either form on the CPU.
_RESCUE = "auto"


def _per_platform(with_branch: Callable[[], Any], branchless: Callable[[], Any]):
    """The norm computed by ``with_branch`` on the CPU and by ``branchless`` elsewhere.

    XLA:CPU runs the common case fastest as one plain reduction with the rescue in a
    ``lax.cond`` that runs only when a sum leaves the trusted range. On GPU and TPU a
    conditional costs a copy of its predicate to the host and a wait, every step, while three
    accumulators in one pass over memory-bound data cost nothing: there the norms keep all three
    and choose with a select.

    ``lax.platform_dependent`` picks the form when the step is lowered, so a step exported from
    a CPU machine for ``cuda`` gets the GPU form; it traces both forms, though (about 1 s more
    at 640 leaves). Where the default backend is a GPU or TPU only the branchless form is traced:
    a step placed on CPU devices there runs it too, correctly, a little slower.
    """
    if _RESCUE == "branch":
        return with_branch()
    if _RESCUE == "branchless" or jax.default_backend() != "cpu":
        return branchless()
    return jax.lax.platform_dependent(cpu=with_branch, default=branchless)


def _grouped_sumsq(leaves: Sequence[jax.Array], scale: jax.Array) -> jax.Array:
    """``sum(sumsq(x, scale=scale) for x in leaves)`` in ``scale``'s dtype, with small leaves
    reduced in groups."""
    dtype = scale.dtype
    parts, group, size = [], [], 0
    for x in leaves:
        if x.size > _GROUP_LEAF:
            parts.append(sumsq(x, scale=scale, dtype=dtype))
            continue
        if group and size + x.size > _GROUP_SIZE:
            parts.append(sumsq(jnp.concatenate(group), scale=scale, dtype=dtype))
            group, size = [], 0
        group.append(_magnitude(jnp.ravel(x), dtype))
        size += x.size
    if group:
        parts.append(sumsq(jnp.concatenate(group), scale=scale, dtype=dtype))
    return sum(parts)


def global_norm(tree, *, axis_name: AxisName = None) -> jax.Array:
    """L2 norm of all floating-point leaves of ``tree`` as a float32 scalar (float64 if a leaf is).

    Unlike ``optax.global_norm``, the result is right for every norm float32 represents: float16
    leaves of 300 or float32 leaves of 1e20 (whose squares overflow) and tiny gradients (whose
    squares underflow) are summed again from values rescaled by a power of two (on the CPU in a
    branch that runs only then; on GPU and TPU beside the plain sum, with no conditional).
    Complex leaves count by their modulus. Float64 leaves (under ``jax_enable_x64``) are summed
    in float64, so a finite float64 gradient of 1e39 or 1e-40 has a finite, nonzero norm.
    ``None`` leaves and ``optax.MaskedNode`` are ignored, integer leaves skipped; a NaN anywhere
    gives NaN and an Inf (without NaN) gives Inf.

    Args:
      tree: a pytree of arrays (gradients, updates, parameters).
      axis_name: inside ``shard_map``/``pmap``, where each device holds a shard of the tree, the
        mapped axis name(s) to reduce over: the norm is then global, with one ``psum``.

    Returns:
      A float32 scalar; float64 when a leaf is float64 or complex128.

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
    dtype = accumulation_dtype(leaves)

    def with_branch():
        ssq = _psum(sum(sumsq(x, dtype=dtype) for x in leaves), axis_name)

        def rescue(s):
            scale = _rescue_scale(s)
            return jnp.sqrt(_psum(_grouped_sumsq(leaves, scale), axis_name)) / scale

        return jax.lax.cond(_trusted(ssq), jnp.sqrt, rescue, ssq)

    def branchless():
        sums = [_three_sums(x, None, False, dtype) for x in leaves]
        return _from_three_sums(*_psum(tuple(map(sum, zip(*sums, strict=True))), axis_name))

    return _per_platform(with_branch, branchless)


def unit_norms(
    leaves: Sequence[jax.Array],
    axes: Sequence[tuple[int, ...]],
    *,
    axis_name: AxisName = None,
    exact: bool = True,
    dtype=None,
) -> list[jax.Array]:
    """Per-unit L2 norms of each leaf, reduced over its ``axes`` (kept as size-1 dims), in
    ``dtype`` (default: the :func:`accumulation_dtype` of all ``leaves``, float32 unless one is
    float64).

    Overflow-safe like :func:`global_norm`: on the CPU with one rescue branch for all leaves that
    runs only when some unit needs it, where a unit whose squares all underflow to exactly 0 keeps
    norm 0 (for clipping such a unit is far below any threshold), so all-zero units cost no second
    pass; on GPU and TPU with the rescaled sums beside the plain one and no conditional. With
    ``axis_name`` the sums of squares are summed over devices, for leaves sharded along reduced
    axes (e.g. whole-leaf norms of a sharded tree).

    With ``exact=False`` there is no rescue branch (a unit's norm past float32's range is Inf, one
    under 1e-10 may be inexact): for norms whose extremes do not matter, such as AGC's parameter
    norms (compared with ``max(norm, eps)``), at half the compile time.

    Compile time stays near that of plain per-leaf norms: one reduction per leaf, the rescue
    decision one test over all units at once.
    """
    if not leaves:
        return []
    dtype = accumulation_dtype(leaves) if dtype is None else dtype
    plain = lambda: [
        _psum(sumsq(x, axis=a, keepdims=True, dtype=dtype), axis_name)
        for x, a in zip(leaves, axes, strict=True)
    ]
    if not exact:
        return [jnp.sqrt(s) for s in plain()]

    def with_branch():
        ssq = plain()
        every_unit = jnp.concatenate([jnp.ravel(s) for s in ssq])
        any_bad = jnp.any(~(_trusted(every_unit) | (every_unit == 0)))

        def rescue(ssq):
            out = []
            for x, a, s in zip(leaves, axes, ssq, strict=True):
                scale = _rescue_scale(s)
                exact = _psum(sumsq(x, axis=a, keepdims=True, scale=scale, dtype=dtype), axis_name)
                out.append(select(_trusted(s) | (s == 0), jnp.sqrt(s), jnp.sqrt(exact) / scale))
            return out

        return jax.lax.cond(any_bad, rescue, lambda ssq: [jnp.sqrt(s) for s in ssq], ssq)

    def branchless():
        return [
            _from_three_sums(*_psum(_three_sums(x, a, True, dtype), axis_name))
            for x, a in zip(leaves, axes, strict=True)
        ]

    return _per_platform(with_branch, branchless)


def clip_factor(norm: jax.Array, max_norm) -> jax.Array:
    """Factor that brings ``norm`` down to ``max_norm``: ``min(1, max_norm / norm)``, in
    ``norm``'s dtype (float32, or float64 for the norm of float64 leaves).

    Exactly 1 when ``norm <= max_norm`` (the update is untouched) and 0 when ``norm`` is not
    finite (the update becomes zeros, never NaN). Works elementwise on per-unit norms too.
    """
    max_norm = jnp.asarray(max_norm, norm.dtype)
    over = norm > max_norm
    one = jnp.ones_like(norm)
    factor = select(over, max_norm / select(over, norm, one), one)
    return select(jnp.isfinite(norm), factor, jnp.zeros_like(norm))


def scale_leaf(x: jax.Array, factor: jax.Array) -> jax.Array:
    """``x * factor`` in ``x``'s dtype, multiplied in float32 (at least), zero where factor is 0.

    ``factor`` is a float32 (or float64) scalar or broadcastable per-unit array. A factor of 0
    gives exact zeros even where ``x`` is NaN/Inf, so a rejected step cannot leak a NaN; the select
    has a scalar-shaped predicate, which XLA fuses into the consumer (the optimizer's update).
    """
    wide = jnp.promote_types(x.dtype, jnp.float32)
    scaled = (x.astype(wide) * factor).astype(x.dtype)
    return select(factor == 0, jnp.zeros_like(scaled), scaled)


def scale_tree(tree, factor: jax.Array):
    """Applies :func:`scale_leaf` with one scalar ``factor`` to every float leaf of ``tree``."""
    return jax.tree.map(lambda x: scale_leaf(x, factor) if is_array_leaf(x) else x, tree)


# --------------------------------------------------------------------------------------------
# Layouts: which axes of a leaf form one unit


def leaf_path(path: KeyPath) -> KeyPath:
    """``path`` without the trailing ``.value`` of a Flax ``nnx.Variable`` (what the leaves of
    ``nnx.state``, ``nnx.split`` and ``nnx.grad`` flatten through), so that the Variable's and the
    plain array's leaves have one path, e.g. ``out/kernel``."""
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
        return path[:-1]
    return path


def path_str(path: KeyPath) -> str:
    """A key path as a ``/``-joined string, e.g. ``"Dense_0/kernel"`` (a trailing ``.value`` of an
    ``nnx.Variable`` dropped, see :func:`leaf_path`)."""
    parts = []
    for key in leaf_path(path):
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
    """L2 norm of each array in ``leaves``, as a vector of shape ``(len(leaves),)`` (float32 unless
    a leaf is float64).

    Overflow-safe like :func:`global_norm` (:func:`unit_norms` over whole leaves). With
    ``axis_name`` (inside ``shard_map``/``pmap``) each norm is taken over the leaf's shards on all
    devices. The global norm of the tree is ``global_norm(leaf_norms(...))``.
    """
    if not leaves:
        return jnp.zeros((0,), jnp.float32)
    axes = [tuple(range(x.ndim)) for x in leaves]
    norms = unit_norms(leaves, axes, axis_name=axis_name)
    return jnp.stack([n.reshape(()) for n in norms])
