"""Output- and attention-logit stabilizers: PaLM's z-loss and Gemma 2's soft-capping.

The second instability of Transformer training (after attention-logit growth) is *output-logit
divergence*: the output logits drift together, the softmax normalizer ``log Z = logsumexp(logits)``
runs away from 0 and the loss stalls or spikes (Wortsman et al. 2024, especially with little or no
weight decay). Two cures, both pure functions of the logits:

- :func:`z_loss`, an auxiliary loss term ``weight * mean(log Z ** 2)`` pulling ``log Z`` back to 0
  (PaLM);
- :func:`softcap`, ``cap * tanh(x / cap)``, a smooth bound on logits (Gemma 2 caps attention
  logits at 50 and final logits at 30). For the attention logits, pass ``logit_softcap=`` to
  :func:`jaxstab.attention_flax.dot_product_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxstab import _checks


def _check_floating(name: str, x) -> jax.Array:
    """``x`` as a JAX array, or ``TypeError`` naming ``name`` unless it holds floats."""
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError):  # e.g. None, a string, a ragged list
        raise TypeError(f"{name} must be a floating-point array, got {x!r}") from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def _softcap(x: jax.Array, cap) -> jax.Array:
    """``cap * tanh(x / cap)`` in float32 (float64 for float64 ``x``), in ``x``'s dtype."""
    compute = jnp.promote_types(x.dtype, jnp.float32)
    cap = jnp.asarray(cap, compute)
    return (cap * jnp.tanh(x.astype(compute) / cap)).astype(x.dtype)


def softcap(x: jax.Array, cap: float | jax.Array) -> jax.Array:
    """Soft-caps ``x`` to ``(-cap, cap)``: ``cap * tanh(x / cap)``.

    Close to the identity for ``|x|`` well under ``cap`` (slope 1 at 0), smoothly saturating at
    ``+-cap``: logits stay bounded however large the weights grow, and, unlike a hard clip, the
    gradient never drops to zero at a finite threshold. Gemma 2 caps the attention logits at 50
    (use ``logit_softcap=50.0`` of :func:`jaxstab.attention_flax.dot_product_attention`) and the
    final (output) logits at 30 (``softcap(logits, 30.0)`` before the cross-entropy).

    The result keeps ``x``'s dtype; float16/bfloat16 inputs are computed in float32 and rounded
    once. ``+-inf`` maps to ``+-cap``, NaN stays NaN. The output is odd in ``x`` and bounded by
    ``cap`` (rounded to ``x``'s dtype), and monotone up to rounding (XLA's ``tanh`` is not
    monotone to the last bit near saturation).

    Args:
      x: a floating-point array (logits).
      cap: the bound, a Python float or a scalar array; ``> 0`` and finite. May be traced.

    Returns:
      ``cap * tanh(x / cap)``, the shape and dtype of ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.logits import softcap
      >>> softcap(jnp.array([-1e4, -1.0, 0.0, 1.0, 1e4]), 30.0)
      Array([-30.      ,  -0.99963, 0.       ,  0.99963,  30.      ], dtype=float32)

    References:
      Gemma Team, `Gemma 2: Improving Open Language Models at a Practical Size
      <https://arxiv.org/abs/2408.00118>`_, 2024 (logit soft-capping: attention logits at 50.0,
      final logits at 30.0).
    """
    _checks.check_positive_scalar("cap", cap)
    return _softcap(_check_floating("x", x), cap)


def z_loss(
    logits: jax.Array, weight: float | jax.Array = 1e-4, *, where: jax.Array | None = None
) -> jax.Array:
    """PaLM's auxiliary z-loss, ``weight * mean over tokens of logsumexp(logits, axis=-1) ** 2``.

    Cross-entropy only sees differences between logits, so nothing holds the softmax normalizer
    ``log Z = logsumexp(logits)`` in place: the output logits can drift together until ``log Z``
    is far from 0 and the loss diverges -- the output-logit divergence of Wortsman et al., most of
    all with little or no weight decay. The z-loss pulls ``log Z`` towards 0 at a cost the model
    barely notices; add it to the loss::

      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      loss = loss + z_loss(logits)

    ``weight=1e-4`` is PaLM's value (MaxText calls the weight ``z_loss_multiplier``).

    Computed in float32 whatever the logits' dtype (float64 for float64 logits), with a
    max-shifted ``logsumexp`` (``jax.nn.logsumexp``): no ``exp`` of raw logits, so large logits
    neither overflow nor give a non-finite gradient -- the gradient ``2 * weight * log Z *
    softmax(logits) / N`` is finite for every finite logit. The value itself is ``inf`` only where
    the true value lies beyond float32's range (``|log Z|`` over ``1.8e21`` at ``weight=1e-4``).
    A NaN (or ``+inf``) logit in a counted token gives a NaN (``inf``) loss, on purpose: the loss
    shows the bad step (for :func:`jaxstab.guards.skip_anomalies` to skip) instead of hiding it.

    Args:
      logits: floating-point ``(..., vocab)``; every axis but the last indexes a token.
      weight: the multiplier; ``>= 0`` and finite. May be traced.
      where: optional boolean mask of shape ``logits.shape[:-1]``: the mean runs over the tokens
        where it is True (skip padding). Masked-out tokens contribute neither value nor gradient,
        even if their logits are not finite. With no True token the loss is 0.

    Returns:
      A scalar, float32 (float64 for float64 logits).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.logits import z_loss
      >>> logits = jnp.array([[0.0, 0.0], [100.0, 100.0]])  # log Z = log 2 and 100 + log 2
      >>> z_loss(logits, weight=1.0)
      Array(5069.795, dtype=float32)
      >>> z_loss(logits, weight=1.0, where=jnp.array([True, False]))  # log(2) ** 2
      Array(0.480453, dtype=float32)

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022 (the z-loss, weight 1e-4).
      Wortsman et al., `Small-scale proxies for large-scale Transformer training instabilities
      <https://arxiv.org/abs/2309.14322>`_, ICLR 2024 (output-logit divergence; z-loss cures it).
    """
    _checks.check_range("weight", weight, low=0)
    _checks.check_finite("weight", weight)
    logits = _check_floating("logits", logits)
    if logits.ndim < 1:
        raise ValueError("logits must have at least one axis (the vocabulary), got a scalar")
    compute = jnp.promote_types(logits.dtype, jnp.float32)
    x = logits.astype(compute)
    tokens = logits.shape[:-1]
    if where is None:
        count = jnp.asarray(np.prod(tokens, dtype=np.int64), compute)
    else:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}")
        if where.shape != tokens:
            raise ValueError(
                f"where must have the token shape logits.shape[:-1] = {tokens}, got {where.shape}"
            )
        x = jnp.where(where[..., None], x, 0)  # no NaN from padding, in value or gradient
        count = jnp.sum(where, dtype=compute)
    lse = jax.nn.logsumexp(x, axis=-1)
    # weight * sum(lse**2) / count, scaled before squaring: each term is at most the result, so
    # nothing overflows unless the result does.
    a = lse * jnp.sqrt(jnp.asarray(weight, compute) / jnp.maximum(count, 1))
    if where is not None:
        a = jnp.where(where, a, 0)
    return jnp.sum(jnp.square(a))
