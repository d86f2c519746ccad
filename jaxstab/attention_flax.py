"""Recording each head's largest attention logit in Flax models, for :func:`jaxstab.qk_clip`.

:func:`dot_product_attention` is a drop-in ``attention_fn`` for ``flax.linen``'s
``MultiHeadDotProductAttention`` and ``flax.nnx``'s ``MultiHeadAttention``: the same outputs as
Flax's own ``dot_product_attention``, plus the per-head maximum pre-softmax logit stored on the
calling module, and optionally Gemma 2's soft-cap on the logits (``logit_softcap=``).
:func:`max_logits` gathers what a linen model recorded into the pytree ``qk_clip`` takes; for nnx
use :func:`jaxstab.attention.gather_max_logits` on ``nnx.capture``'s state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import Module as LinenModule
from flax.linen.dtypes import promote_dtype

from jaxstab import _checks
from jaxstab.attention import MAX_LOGITS, gather_max_logits
from jaxstab.logits import softcap

# The linen collection the logits are sown into.
COLLECTION = "attention_logits"


class MaxLogits(nnx.Intermediate):
    """The nnx variable type holding a module's per-head maximum logits (``nnx.capture`` it)."""


def _head_max(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Float32 max over everything but the heads axis (-3) of ``(batch..., heads, q, k)``."""
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    axes = tuple(a for a in range(logits.ndim) if a != logits.ndim - 3)
    return jax.lax.stop_gradient(jnp.max(logits, axis=axes).astype(jnp.float32))


def _record(module, value: jax.Array) -> None:
    """Stores ``value`` on ``module``, keeping the elementwise max over calls within one apply."""
    keep_max = dict(init_fn=lambda: jnp.full_like(value, -jnp.inf), reduce_fn=jnp.maximum)
    if isinstance(module, LinenModule):
        module.sow(COLLECTION, MAX_LOGITS, value, **keep_max)
    else:
        module.sow(MaxLogits, MAX_LOGITS, value, **keep_max)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    force_fp32_for_softmax: bool = False,
    is_causal: bool = False,
    *,
    logit_softcap: float | jax.Array | None = None,
) -> jax.Array:
    """Flax's dot-product attention that also records each head's largest logit on ``module``.

    Computes what ``flax.linen.dot_product_attention`` (and nnx's) computes, with the same
    arguments, and records ``S[h] = max q . k / sqrt(head_dim)`` over batch, queries and the keys
    the mask lets through (the signed maximum, before ``bias`` is added: the part of the logit
    that scaling the query and key weights scales). Flax passes the module only with
    ``sow_weights=True``, so call the attention layer with it; the logits then go to

    - linen: the ``"attention_logits"`` collection (``mutable=["attention_logits"]``); gather
      them with :func:`max_logits`;
    - nnx: a :class:`MaxLogits` variable named ``max_logits``; capture it with
      ``nnx.capture(fn, MaxLogits)`` and gather with ``gather_max_logits(nnx.to_pure_dict(state))``.

    With ``logit_softcap=c`` the logits ``q . k / sqrt(head_dim)`` are soft-capped to
    ``c * tanh(logits / c)`` (:func:`jaxstab.logits.softcap`, float32 math, rounded to the
    attention dtype) before ``bias`` is added and before masking and the softmax, as in Gemma 2
    (``c = 50``); bind it with ``functools.partial`` (Flax passes its own arguments by keyword and
    keeps only those in the partial's signature). The recorded maximum stays the *raw* logit,
    before the cap: what the query and key weights produce, so the telemetry shows their growth
    and ``qk_clip`` (which scales those weights) stays exact beside a cap. ``None`` (the
    default) caps nothing and computes exactly what it computes without the argument.

    Grouped-query attention (fewer key/value heads, nnx's ``num_kv_heads``) records one value per
    query head. The recording costs one more reduction over the logits: a training step measured
    within a few percent of Flax's own attention (``benchmarks/bench_attention.py``).

    Args:
      query, key, value: ``(batch..., length, heads, head_dim)``.
      bias, mask, broadcast_dropout, dropout_rng, dropout_rate: as in Flax's
        ``dot_product_attention``.
      deterministic, dtype, precision, force_fp32_for_softmax, is_causal: as there too.
      module: the attention module to record on; None records nothing.
      logit_softcap: the soft-cap on the logits, ``> 0`` and finite (a Python float or scalar
        array), or None for none.

    Returns:
      ``(batch..., q_length, heads, v_head_dim)``, equal to Flax's output.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxstab.attention_flax import dot_product_attention, max_logits
      >>> layer = nn.MultiHeadDotProductAttention(2, attention_fn=dot_product_attention)
      >>> x = jnp.ones((1, 5, 8))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y, recorded = layer.apply(variables, x, sow_weights=True, mutable=["attention_logits"])
      >>> max_logits(recorded).shape  # one per head
      (2,)

      Soft-capped at 50 like Gemma 2 (the softmax sees at most 50; the raw logits are recorded):

      >>> import functools
      >>> capped = functools.partial(dot_product_attention, logit_softcap=50.0)
      >>> layer = nn.MultiHeadDotProductAttention(2, attention_fn=capped)
      >>> y_capped, recorded = layer.apply(variables, 100 * x, sow_weights=True,
      ...                                  mutable=[COLLECTION])
      >>> y_raw, raw = layer.clone(attention_fn=dot_product_attention).apply(
      ...     variables, 100 * x, sow_weights=True, mutable=[COLLECTION])
      >>> bool((max_logits(recorded) == max_logits(raw)).all())
      True

    References:
      Gemma Team, `Gemma 2: Improving Open Language Models at a Practical Size
      <https://arxiv.org/abs/2408.00118>`_, 2024 (attention logits soft-capped at 50.0).
    """
    if logit_softcap is not None:
        _checks.check_positive_scalar("logit_softcap", logit_softcap)
    query, key, value = promote_dtype(query, key, value, dtype=dtype)
    dtype = query.dtype
    q_heads, kv_heads = query.shape[-2], key.shape[-2]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} key heads")
    group = q_heads // kv_heads
    query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
    if group > 1:  # (batch..., kv_heads, group, q, k): query head h uses key head h // group
        grouped = query.reshape(*query.shape[:-2], kv_heads, group, query.shape[-1])
        logits = jnp.einsum("...qhgd,...khd->...hgqk", grouped, key, precision=precision)
        logits = logits.reshape(*logits.shape[:-4], q_heads, *logits.shape[-2:])
    else:
        logits = jnp.einsum("...qhd,...khd->...hqk", query, key, precision=precision)

    if is_causal:
        causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if module is not None:
        _record(module, _head_max(logits, mask))
    if logit_softcap is not None:
        logits = softcap(logits, logit_softcap)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(dtype).min)
    if force_fp32_for_softmax and dtype != jnp.float32:
        weights = jax.nn.softmax(logits.astype(jnp.float32))
    else:
        weights = jax.nn.softmax(logits).astype(dtype)

    if not deterministic and dropout_rate > 0.0:
        keep_prob = 1.0 - dropout_rate
        shape = (1,) * (key.ndim - 2) + weights.shape[-2:] if broadcast_dropout else weights.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))

    if group == 1:
        return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)
    grouped = weights.reshape(*weights.shape[:-3], kv_heads, group, *weights.shape[-2:])
    out = jnp.einsum("...hgqk,...khd->...qhgd", grouped, value, precision=precision)
    return out.reshape(*out.shape[:-3], q_heads, value.shape[-1])


def max_logits(variables):
    """The ``max_logits`` pytree for :func:`jaxstab.qk_clip` from a linen model's variables.

    Args:
      variables: the mutable collections ``apply`` returned (or any dict holding
        ``"attention_logits"``).

    Returns:
      Per-head maxima following the params' structure down to each attention module.
    """
    if COLLECTION not in variables:
        raise KeyError(
            f"max_logits: no {COLLECTION!r} collection in the variables given (it has "
            f"{sorted(variables)}). The attention records only when called with "
            f"sow_weights=True and apply(..., mutable=[{COLLECTION!r}]), e.g. "
            f"MultiHeadDotProductAttention(..., attention_fn=dot_product_attention)(x, "
            "sow_weights=True)"
        )
    return gather_max_logits(variables[COLLECTION])
