"""Fixed clipping: global-norm clipping and adaptive (unit-wise) gradient clipping."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import _checks, _norms
from jaxstab._norms import AxisName
from jaxstab.telemetry import telemetry_state

KeyPath = _norms.KeyPath
PathPredicate = Callable[[KeyPath, jax.Array], bool] | str | None


@telemetry_state("clip_by_global_norm", ("grad_norm", "scale", "clipped"))
class ClipByGlobalNormState(NamedTuple):
    """Telemetry of :func:`clip_by_global_norm` for the last step."""

    grad_norm: jax.Array  # float32 global norm of the incoming updates
    scale: jax.Array  # float32 factor applied (1 = untouched, 0 = non-finite step zeroed)
    clipped: jax.Array  # bool, whether the factor was below 1


def clip_by_global_norm(
    max_norm: float | jax.Array, *, axis_name: AxisName = None
) -> optax.GradientTransformationExtraArgs:
    """Clips updates to global norm ``max_norm`` with one scalar multiply.

    Same call and results as ``optax.clip_by_global_norm`` on finite input, and right where optax
    is wrong: the norm is overflow-safe (float16 gradients of 300, float32 gradients of 1e20 are
    clipped to norm ``max_norm`` instead of zeroed), zero gradients with ``max_norm=0`` stay zero
    (optax: NaN), and a non-finite step gives an all-zero update instead of NaN. Updates are
    scaled by ``min(1, max_norm / norm)`` -- a multiply XLA fuses into the optimizer's own update,
    so clip+Adam costs little more than Adam. Each leaf keeps its dtype.

    Args:
      max_norm: the largest global norm of the update; ``>= 0``. May be injected with
        ``optax.inject_hyperparams``.
      axis_name: inside ``shard_map``/``pmap`` with the tree sharded across devices, the mapped
        axis name(s): the norm becomes global with one ``psum``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds ``grad_norm``, ``scale``,
      ``clipped`` (see :func:`jaxstab.telemetry`).

    Example:
      >>> import jax.numpy as jnp, optax, jaxstab
      >>> tx = jaxstab.clip_by_global_norm(1.0)
      >>> grads = {"w": jnp.array([3.0, 4.0])}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> updates["w"], float(state.grad_norm)
      (Array([0.6, 0.8], dtype=float32), 5.0)

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, ICML 2013.
    """
    _checks.check_range("max_norm", max_norm, low=0)

    def init_fn(params):
        del params
        return ClipByGlobalNormState(
            jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32), jnp.zeros((), bool)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del state, params, extra_args
        norm = _norms.global_norm(updates, axis_name=axis_name)
        scale = _norms.clip_factor(norm, max_norm)
        f32 = lambda x: x.astype(jnp.float32)  # telemetry; the norm is float64 for float64 leaves
        new_state = ClipByGlobalNormState(f32(norm), f32(scale), scale < 1)
        return _norms.scale_tree(updates, scale), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Adaptive gradient clipping


def _as_predicate(name: str, spec: PathPredicate) -> Callable[[KeyPath, jax.Array], bool]:
    if spec is None:
        return lambda path, leaf: False
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda path, leaf: pattern.search(_norms.path_str(path)) is not None
    if callable(spec):
        return spec
    raise TypeError(f"{name} must be None, a regex string or a callable(path, leaf), got {spec!r}")


@telemetry_state("adaptive_grad_clip", ("grad_norm", "clip_fraction", "nonfinite"))
class AdaptiveGradClipState(NamedTuple):
    """Telemetry of :func:`adaptive_grad_clip` for the last step."""

    grad_norm: jax.Array  # float32 global norm of the incoming updates
    clip_fraction: jax.Array  # float32 share of units that were clipped
    nonfinite: jax.Array  # float32 number of units (and excluded leaves) zeroed as non-finite


def _normalize_axes(axes, ndim: int, where: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"unit axes {axes} out of range for {where} of rank {ndim}")
    return tuple(sorted(a % ndim for a in axes))


def adaptive_grad_clip(
    clipping: float | jax.Array,
    eps: float | jax.Array = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    *,
    unit_axes: Callable[[KeyPath, jax.Array], int | tuple[int, ...] | None] | None = None,
    stacked: PathPredicate = None,
    exclude: PathPredicate = None,
) -> optax.GradientTransformationExtraArgs:
    """Adaptive gradient clipping (AGC): each unit's gradient norm to ``clipping`` x its weights'.

    For every unit (output neuron or channel) the gradient is scaled by
    ``min(1, clipping * max(||w||, eps) / ||g||)``. Same signature and results as
    ``optax.adaptive_grad_clip`` on optax's layouts, plus what Flax models need:

    - unit axes chosen per leaf from Flax's layouts (:func:`jaxstab.flax_unit_axes`): Dense and Conv
      kernels, attention input and output projections, biases and scales of any rank;
    - ``unit_axes``: a per-leaf override, ``f(path, leaf) -> axes`` (``None`` keeps the default);
    - ``stacked``: leaves whose leading axis stacks layers (``nn.scan``/``nn.vmap``); that axis is
      never reduced, so units never mix layers;
    - ``exclude``: leaves passed through unclipped (the paper never clips the final classifier).

    ``stacked`` and ``exclude`` take a regex searched in the ``/``-joined key path (e.g.
    ``"Dense_3"``) or a callable ``f(path, leaf) -> bool``. Norms are float32 and overflow-safe;
    the scale is one per-unit multiply fused into the optimizer's update.

    Non-finite values are handled per unit, as the math is: a unit whose gradient holds a NaN or
    Inf (or whose norm overflows float32) gets a zero update, an excluded leaf likewise as a
    whole, and every other unit its usual update; ``nonfinite`` counts them. To skip the *whole
    step* instead (the optimizer's state untouched too), wrap the chain in
    :func:`jaxstab.skip_anomalies`.

    Args:
      clipping: the largest allowed ratio of gradient norm to parameter norm, per unit; ``> 0``.
      eps: floor on parameter norms, so zero-initialised units can still move; ``>= 0``.
      axis: reduction axes for every leaf (optax's meaning); ``None`` chooses them per leaf.
      unit_axes: optional per-leaf override of the reduction axes.
      stacked: which leaves have a leading stacked-layers axis (only with ``axis=None``).
      exclude: which leaves to leave unclipped.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose update needs ``params``; its state holds
      ``grad_norm``, ``clip_fraction`` and ``nonfinite``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxstab
      >>> params = {"hidden": {"kernel": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 1))}}
      >>> grads = jax.tree.map(lambda p: 10 * p, params)
      >>> tx = jaxstab.adaptive_grad_clip(0.01, exclude="head")
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> updates["hidden"]["kernel"][0, 0], updates["head"]["kernel"][0, 0]
      (Array(0.01, dtype=float32), Array(10., dtype=float32))
      >>> float(state.clip_fraction)  # both units of "hidden" were clipped
      1.0

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without Normalization
      <https://arxiv.org/abs/2102.06171>`_, ICML 2021.
    """
    _checks.check_range("clipping", clipping, low=0, low_open=True)
    _checks.check_range("eps", eps, low=0)
    is_stacked = _as_predicate("stacked", stacked)
    is_excluded = _as_predicate("exclude", exclude)

    def axes_for(path, leaf) -> tuple[int, ...]:
        where = f"leaf {_norms.path_str(path)!r}"
        if unit_axes is not None and (chosen := unit_axes(path, leaf)) is not None:
            return _normalize_axes(chosen, leaf.ndim, where)
        if axis is not None:
            return _normalize_axes(axis, leaf.ndim, where)
        if is_stacked(path, leaf):
            if leaf.ndim < 1:
                raise ValueError(f"stacked {where} must have a leading layers axis")
            return tuple(a + 1 for a in _norms.flax_unit_axes(path, leaf.shape[1:]))
        return _norms.flax_unit_axes(path, leaf.shape)

    def init_fn(params):
        del params
        zero = lambda: jnp.zeros((), jnp.float32)  # distinct buffers: states get donated
        return AdaptiveGradClipState(zero(), zero(), zero())

    def update_fn(updates, state, params=None, **extra_args):
        del state, extra_args
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs params: call update(updates, state, params)"
            )
        _checks.check_same_structure("updates", updates, "params", params)
        paths_g, treedef = jax.tree_util.tree_flatten_with_path(updates)
        leaves_g = [g for _, g in paths_g]
        leaves_p = treedef.flatten_up_to(params)
        # Leaves whose units are clipped; excluded and non-float leaves are passed through.
        clip_idx, kept_idx = [], []
        for i, (path, g) in enumerate(paths_g):
            if _norms.is_array_leaf(g):
                (kept_idx if is_excluded(path, g) else clip_idx).append(i)
        axes = [axes_for(paths_g[i][0], leaves_g[i]) for i in clip_idx]
        g_clip, p_clip = [leaves_g[i] for i in clip_idx], [leaves_p[i] for i in clip_idx]
        dtype = _norms.accumulation_dtype(g_clip + p_clip)
        g_norms = _norms.unit_norms(g_clip, axes, dtype=dtype)
        # An overflowing parameter norm only means "no clipping" and an underflowing one is below
        # ``eps``: no rescue needed, half the compile time.
        p_norms = _norms.unit_norms(p_clip, axes, exact=False, dtype=dtype)
        limit = lambda p_norm: clipping * jnp.maximum(p_norm, eps)
        # An excluded leaf passes through whole, or is zeroed whole if it is not finite.
        kept_norms = _norms.leaf_norms([leaves_g[i] for i in kept_idx])
        # Telemetry on all units at once, from one concatenation of the norms each: a per-leaf
        # computation would be one more fusion per leaf, the cost of a second rescue branch.
        every = lambda arrays: jnp.concatenate([jnp.ravel(a) for a in arrays])
        g_units = every(g_norms) if g_norms else jnp.zeros((0,), dtype)
        all_norms = jnp.concatenate([g_units, kept_norms.astype(dtype)])
        grad_norm = _norms.global_norm([all_norms])
        nonfinite = jnp.sum(~jnp.isfinite(all_norms), dtype=jnp.float32)
        clipped = jnp.sum(g_units > limit(every(p_norms))) if g_norms else 0
        fraction = jnp.asarray(clipped, jnp.float32) / max(sum(n.size for n in g_norms), 1)

        kept_finite = jnp.isfinite(kept_norms).astype(dtype)
        factors = {i: kept_finite[j] for j, i in enumerate(kept_idx)}
        for i, g_norm, p_norm in zip(clip_idx, g_norms, p_norms, strict=True):
            factors[i] = _norms.clip_factor(g_norm, limit(p_norm))  # 0 where not finite
        new_leaves = [
            _norms.scale_leaf(g, factors[i]) if i in factors else g
            for i, g in enumerate(leaves_g)
        ]
        state = AdaptiveGradClipState(grad_norm.astype(jnp.float32), fraction, nonfinite)
        return jax.tree.unflatten(treedef, new_leaves), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
