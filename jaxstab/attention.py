"""QK-Clip: per-head rescaling of query and key weights that keeps attention logits under ``tau``.

Attention-logit growth -- the largest pre-softmax logit ``q . k / sqrt(d)`` of a head running away
as training goes on -- saturates the softmax, stalls learning and leads to loss spikes (Wortsman
et al. 2024). Gradient clipping cannot stop it: the logits grow through many ordinary steps, and a
saturated softmax passes back *small* gradients. :func:`qk_clip` acts on the weights instead:
after the optimizer's step, each head whose largest logit ``S`` exceeded ``tau`` has its query
and key projections scaled by ``sqrt(tau / S)`` each, which brings its logits down by exactly
``tau / S`` and leaves the rest of the model alone.

This module is pure optax and knows nothing of Flax; the logits come from the recording
``attention_fn`` of :mod:`jaxstab.attention_flax` (or from any model that reports them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstab import _checks, _norms
from jaxstab.telemetry import telemetry_state

KeyPath = _norms.KeyPath
# The leaf name under which the recording attention_fn stores each module's per-head maxima.
MAX_LOGITS = "max_logits"


@telemetry_state("qk_clip", ("heads_clipped", "max_logit"))
class QKClipState(NamedTuple):
    """Telemetry of :func:`qk_clip` for the last step."""

    heads_clipped: jax.Array  # float32 number of heads whose logits were scaled down
    max_logit: jax.Array  # float32 largest finite max logit reported this step (-inf if none)


def flax_projection(path: KeyPath) -> str | None:
    """``"query"`` or ``"key"`` for the kernel and bias of Flax's attention projections, else None.

    Flax's ``MultiHeadDotProductAttention`` (linen) and ``MultiHeadAttention`` (nnx) keep them at
    ``<module>/query/{kernel,bias}`` and ``<module>/key/{kernel,bias}``: kernels of shape
    ``(features, heads, head_dim)``, biases ``(heads, head_dim)``.

    Example:
      >>> from jax.tree_util import DictKey as K
      >>> from jaxstab.attention import flax_projection
      >>> flax_projection((K("attn"), K("key"), K("kernel")))
      'key'
      >>> flax_projection((K("attn"), K("out"), K("bias"))) is None
      True
    """
    names = _norms.path_str(path).split("/")
    if len(names) >= 2 and names[-2] in ("query", "key") and names[-1] in ("kernel", "bias"):
        return names[-2]
    return None


def gather_max_logits(tree, name: str = MAX_LOGITS):
    """The ``max_logits`` pytree :func:`qk_clip` takes, from what the attention modules recorded.

    Every mapping that holds ``name`` is replaced by the array stored there, so the result follows
    the model's parameters down to each attention module: where ``params["Block_0"]["attn"]``
    holds that module's projections, the result's ``["Block_0"]["attn"]`` is its ``(num_heads,)``
    array (``(layers, num_heads)`` under ``nn.scan``). Mappings without attention are dropped.

    Args:
      tree: nested mappings, e.g. linen's ``variables["attention_logits"]``, or
        ``nnx.to_pure_dict`` of the state ``nnx.capture`` returned.
      name: the leaf name the recording ``attention_fn`` used.

    Returns:
      Nested dicts of arrays, or None when ``tree`` holds no recorded logits.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.attention import gather_max_logits
      >>> sown = {"Block_0": {"attn": {"max_logits": jnp.array([1.0, 9.0])}}, "Dense_0": {}}
      >>> gather_max_logits(sown)
      {'Block_0': {'attn': Array([1., 9.], dtype=float32)}}
    """
    if not isinstance(tree, Mapping):
        return None
    if name in tree:
        return jnp.asarray(tree[name])
    found = {k: gather_max_logits(v, name) for k, v in tree.items()}
    return {k: v for k, v in found.items() if v is not None} or None


def _head_factors(max_logits: jax.Array, tau) -> jax.Array:
    """``min(1, tau / S)`` per head in float32; 1 where ``S`` is not finite or not above ``tau``."""
    s = max_logits.astype(jnp.float32)
    over = jnp.isfinite(s) & (s > tau)
    return jnp.where(over, tau / jnp.where(over, s, 1.0), 1.0)


def _projection_factors(gamma: jax.Array, kv_heads: int) -> tuple[jax.Array, jax.Array]:
    """Factors ``(a, b)`` of query and key heads with ``a[h] * b[h // g] = gamma[h]`` per head.

    Without grouping (``kv_heads`` = query heads) both are ``sqrt(gamma)``, as in Kimi K2. With
    ``g`` query heads per key head, the key takes ``sqrt`` of the group's mildest factor (1 as soon
    as one head of the group is under ``tau``, so unclipped heads keep their weights) and each
    query head the rest; every factor stays <= 1.
    """
    q_heads = gamma.shape[-1]
    if q_heads % kv_heads:
        raise ValueError(
            f"qk_clip: {q_heads} query heads are not a multiple of {kv_heads} key heads"
        )
    grouped = gamma.reshape(*gamma.shape[:-1], kv_heads, q_heads // kv_heads)
    key = jnp.sqrt(jnp.max(grouped, axis=-1))
    query = (grouped / key[..., None]).reshape(gamma.shape)
    return query, key


def _clip_leaf(update: jax.Array, param: jax.Array, factor: jax.Array) -> jax.Array:
    """``u`` such that ``param + u = factor * (param + update)``; exactly ``update`` where 1.

    ``factor`` has shape ``(stack..., heads)``; the leaf ``(stack..., [features,] heads, dim)``.
    Written ``update * f + param * (f - 1)`` so a factor of 1 returns the update bit for bit.
    """
    stack = factor.ndim - 1
    shape = factor.shape[:stack] + (1,) * (param.ndim - stack - 2) + (factor.shape[-1], 1)
    f = factor.reshape(shape)
    wide = jnp.promote_types(update.dtype, jnp.float32)
    out = update.astype(wide) * f + param.astype(wide) * (f - 1)
    return out.astype(update.dtype)


def qk_clip(
    tau: float | jax.Array = 30.0,
    *,
    projection: Callable[[KeyPath], str | None] | None = None,
    axis_name: _norms.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """QK-Clip: scales the query and key weights of each head whose logits exceeded ``tau``.

    Place it after the optimizer in the chain. Its update takes this step's per-head maximum
    attention logits ``S`` (``max_logits=``, see below) and returns updates such that, after
    ``optax.apply_updates``, every head with ``S > tau`` has its query and key projections (kernel
    and bias) equal to ``sqrt(tau / S)`` times what the optimizer made of them, so that head's
    logits scale by exactly ``tau / S``. Heads at or under ``tau``, heads whose ``S`` is NaN or
    Inf, and every other leaf get the optimizer's update unchanged, bit for bit. With grouped-query
    attention (fewer key heads than query heads) the key head takes ``sqrt`` of its group's
    mildest factor and each query head the rest, so each head's logits still scale by exactly
    ``min(1, tau / S)``. The arithmetic is float32; each update keeps its dtype.

    ``max_logits`` follows the structure of ``params`` down to each attention module: where
    ``params["Block_0"]["attn"]`` holds that module's ``query`` and ``key``,
    ``max_logits["Block_0"]["attn"]`` is an array of shape ``(num_heads,)``, or
    ``(layers, num_heads)`` for a module stacked by ``nn.scan`` (any leading axes stack). Record
    it with ``jaxstab.attention_flax.dot_product_attention`` and collect it with
    :func:`gather_max_logits`.

    Choosing ``tau`` (default 30): the logits are ``q . k / sqrt(head_dim)``, so the threshold
    does not depend on the head size to first order, and a logit gap of 30 already gives one key
    ``e**30 ~ 1e13`` times the weight of another -- far sharper than any context length needs;
    logits above it only saturate the softmax. In the learning-rate sweep of
    ``examples/transformer_lm.py`` (char-level GPT, 5 rates spanning 100x, 2 seeds, AdamW),
    ``tau=30`` cut AdamW's learning-rate sensitivity from 0.236 to 0.104 (0.44x; layer-normalized
    queries and keys: 0.42x) without changing the best loss, against 0.140 (0.59x) for Kimi K2's
    ``tau=100``, and kept every run's last 100 steps under 39. A head whose logits share a large
    offset (a key bias) can exceed 30 while healthy: if ``heads_clipped`` is above 0 at learning
    rates that train well, raise ``tau``.

    Args:
      tau: the largest logit a head keeps after the step; ``> 0``. May be injected with
        ``optax.inject_hyperparams``.
      projection: ``f(path) -> "query" | "key" | None`` naming the leaves to scale; the attention
        module is the leaf's grandparent (``path[:-2]``). ``None`` means Flax's layout
        (:func:`flax_projection`).
      axis_name: inside ``pmap``/``shard_map`` with the batch split across devices (data
        parallel), the mapped axis name(s): each head's largest logit is taken over every
        device's batch (one ``pmax``), so the replicas clip alike and stay identical. Not needed
        under ``jit`` with sharded arrays.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose update needs ``params`` and
      ``max_logits``; its state holds ``heads_clipped`` and ``max_logit``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxstab
      >>> from jaxstab.attention import qk_clip
      >>> params = {"attn": {"query": {"kernel": jnp.ones((2, 2, 1))},
      ...                    "key": {"kernel": jnp.ones((2, 2, 1))}}}
      >>> tx = optax.chain(optax.sgd(0.0), qk_clip(tau=100.0))
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> max_logits = {"attn": jnp.array([400.0, 50.0])}  # head 0 is 4x over tau
      >>> updates, state = tx.update(grads, tx.init(params), params, max_logits=max_logits)
      >>> new = optax.apply_updates(params, updates)
      >>> new["attn"]["query"]["kernel"][0, :, 0]  # head 0 scaled by sqrt(1/4), head 1 untouched
      Array([0.5, 1. ], dtype=float32)
      >>> {k: float(v) for k, v in jaxstab.telemetry(state).items()}
      {'1/qk_clip/heads_clipped': 1.0, '1/qk_clip/max_logit': 400.0}

    References:
      Kimi Team, `Kimi K2: Open Agentic Intelligence <https://arxiv.org/abs/2507.20534>`_, 2025
      (QK-Clip, MuonClip). Wortsman et al., `Small-scale proxies for large-scale Transformer
      training instabilities <https://arxiv.org/abs/2309.14322>`_, ICLR 2024.
    """
    _checks.check_range("tau", tau, low=0, low_open=True)
    projection = projection or flax_projection

    def init_fn(params):
        del params
        return QKClipState(jnp.zeros((), jnp.float32), jnp.full((), -jnp.inf, jnp.float32))

    def update_fn(updates, state, params=None, *, max_logits=None, **extra_args):
        del state, extra_args
        if params is None or max_logits is None:
            missing = " and ".join(
                name for name, v in (("params", params), ("max_logits", max_logits)) if v is None
            )
            raise ValueError(
                f"qk_clip needs params and max_logits, got no {missing}: call "
                "tx.update(updates, state, params, max_logits=...) (flax's "
                "TrainState.apply_gradients passes no extra arguments: call tx.update yourself, "
                "then state.replace(...))"
            )
        _checks.check_same_structure("updates", updates, "params", params)
        if axis_name is not None:
            with _checks.mapped_axis(axis_name):
                max_logits = jax.lax.pmax(max_logits, axis_name)
        logits = {
            _norms.path_str(path): s
            for path, s in jax.tree_util.tree_flatten_with_path(max_logits)[0]
        }
        paths_u, treedef = jax.tree_util.tree_flatten_with_path(updates)
        leaves_p = treedef.flatten_up_to(params)
        # Find every projection and the key heads of each module before scaling anything.
        roles, kv_heads = {}, {}
        for i, (path, u) in enumerate(paths_u):
            role = projection(path) if _norms.is_array_leaf(u) else None
            if role is None:
                continue
            module = _norms.path_str(_norms.leaf_path(path)[:-2])
            if module not in logits:
                raise ValueError(
                    f"qk_clip: no max_logits for attention module {module!r} (leaf "
                    f"{_norms.path_str(path)!r}); max_logits has {sorted(logits)}"
                )
            roles[i] = (role, module)
            if role == "key":
                kv_heads[module] = u.shape[-2]
        unused = sorted(set(logits) - {m for _, m in roles.values()})
        if unused:
            raise ValueError(f"qk_clip: max_logits for {unused} match no query/key parameters")

        gammas = {m: _head_factors(s, tau) for m, s in logits.items()}
        factors = {
            m: _projection_factors(g, kv_heads.get(m, g.shape[-1])) for m, g in gammas.items()
        }
        new_leaves = [u for _, u in paths_u]
        for i, (role, module) in roles.items():
            query, key = factors[module]
            factor = query if role == "query" else key
            new_leaves[i] = _clip_leaf(new_leaves[i], leaves_p[i], factor)

        all_s = jnp.concatenate([jnp.ravel(s).astype(jnp.float32) for s in logits.values()])
        finite = jnp.isfinite(all_s)
        state = QKClipState(
            sum(jnp.sum(g < 1) for g in gammas.values()).astype(jnp.float32),
            jnp.max(jnp.where(finite, all_s, -jnp.inf)),
        )
        return jax.tree.unflatten(treedef, new_leaves), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
