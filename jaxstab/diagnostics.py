"""Diagnostics: which layer explodes? Per-leaf and per-layer gradient norms, ready to log."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxstab import _checks, _norms


def layer_norms(tree, params=None) -> dict[str, jax.Array]:
    """Per-leaf and per-layer L2 norms of a gradient tree (and gradient/parameter ratios).

    The first question when training blows up is *which layer explodes*. This returns a flat
    ``{path: float32 scalar}`` dict to log or plot every step:

    - ``"<leaf path>"``: the norm of each floating-point leaf, e.g. ``"Dense_0/kernel"``;
    - ``"<layer path>"``: the norm of all leaves sharing a parent, i.e. one Flax module's
      ``kernel`` and ``bias`` together, e.g. ``"Dense_0"`` (leaves at the top level of the tree
      have no layer);
    - with ``params`` (same tree structure), ``"<path>/ratio"`` for every leaf and layer: the
      gradient norm over the parameter norm. A healthy SGD step moves each layer by a small
      fraction of its weights (``lr * ratio`` well under 1); the ratio is what adaptive gradient
      clipping (:func:`jaxstab.adaptive_grad_clip`) bounds. A zero gradient has ratio 0, a nonzero
      gradient of all-zero parameters ``inf``.

    Paths are ``/``-joined keys as in :func:`jaxstab.telemetry`. Norms are float32 and
    overflow-safe like :func:`jaxstab.global_norm`; integer leaves, ``None`` and
    ``optax.MaskedNode`` are skipped. Pure and jit-able: the values stay on device, so a jitted
    step can return the dict.

    Args:
      tree: a pytree of gradients (or updates, or any arrays).
      params: optional pytree of parameters of the same structure, for the ratios.

    Returns:
      A ``dict[str, jax.Array]`` of float32 scalars: leaves in tree order, each layer right
      after its last leaf (a dict returned from ``jax.jit`` comes back sorted by key).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.diagnostics import layer_norms
      >>> grads = {"Dense_0": {"bias": jnp.array([0.0, 4.0]), "kernel": jnp.full((2, 2), 1.5)},
      ...          "Dense_1": {"kernel": jnp.array([[1e20], [0.0]])}}
      >>> params = {"Dense_0": {"bias": jnp.zeros(2), "kernel": jnp.ones((2, 2))},
      ...           "Dense_1": {"kernel": jnp.array([[2.0], [0.0]])}}
      >>> {k: float(v) for k, v in layer_norms(grads).items()}
      {'Dense_0/bias': 4.0, 'Dense_0/kernel': 3.0, 'Dense_0': 5.0,
       'Dense_1/kernel': 1e+20, 'Dense_1': 1e+20}
      >>> {k: float(v) for k, v in layer_norms(grads, params).items() if k.endswith("ratio")}
      {'Dense_0/bias/ratio': inf, 'Dense_0/kernel/ratio': 1.5, 'Dense_0/ratio': 2.5,
       'Dense_1/kernel/ratio': 5e+19, 'Dense_1/ratio': 5e+19}
    """
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    if params is not None:
        _checks.check_same_structure("tree", tree, "params", params)
        param_leaves = jax.tree.leaves(params)
        pairs = [(p, g, w) for (p, g), w in zip(pairs, param_leaves, strict=True)]
    else:
        pairs = [(p, g, None) for p, g in pairs]
    pairs = [(path, g, w) for path, g, w in pairs if _norms.is_array_leaf(g)]
    if not pairs:
        return {}
    paths = [_norms.path_str(path) for path, _, _ in pairs]
    g_norms = _norms.leaf_norms([g for _, g, _ in pairs])
    p_norms = None if params is None else _norms.leaf_norms([w for _, _, w in pairs])

    # Layers: leaves grouped by parent path, in order of first appearance.
    layers: dict[str, list[int]] = {}
    for i, path in enumerate(pairs):
        if len(path[0]) > 1:
            layers.setdefault("/".join(paths[i].split("/")[:-1]), []).append(i)
    last_leaf = {idx[-1]: name for name, idx in layers.items()}

    def ratio(g, p):
        return jnp.where(g == 0, 0.0, g / p)

    out: dict[str, jax.Array] = {}

    def put(key, value):
        if key in out:
            raise ValueError(f"layer_norms: two entries named {key!r}; rename the tree's keys")
        out[key] = value

    for i, path in enumerate(paths):
        put(path, g_norms[i])
        if p_norms is not None:
            put(f"{path}/ratio", ratio(g_norms[i], p_norms[i]))
        if i in last_leaf:
            name, idx = last_leaf[i], jnp.asarray(layers[last_leaf[i]])
            g_layer = _norms.global_norm(g_norms[idx])
            put(name, g_layer)
            if p_norms is not None:
                put(f"{name}/ratio", ratio(g_layer, _norms.global_norm(p_norms[idx])))
    return out


__all__ = ["layer_norms"]
