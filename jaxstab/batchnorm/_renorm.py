"""Batch Renormalization (Ioffe 2017): correction factors and the paper's clipping ramp."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

Limit = float | Callable[[jax.Array], jax.Array]


def renorm_correction(
    batch_mean: jax.Array,
    batch_var: jax.Array,
    running_mean: jax.Array,
    running_var: jax.Array,
    *,
    epsilon: float,
    r_max: float | jax.Array,
    d_max: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Batch Renormalization's ``(r, d)``, without gradient.

    With ``sigma_B = sqrt(batch_var + epsilon)`` and ``sigma = sqrt(running_var + epsilon)``
    (the running statistics *before* this step's update)::

      r = clip(sigma_B / sigma, 1 / r_max, r_max)
      d = clip((batch_mean - running_mean) / sigma, -d_max, d_max)

    and the training output is ``((x - batch_mean) / sigma_B * r + d) * scale + bias``. With
    ``r_max = 1, d_max = 0`` this is batch norm; unclipped (``inf``) it equals the inference output
    ``(x - running_mean) / sigma * scale + bias``.

    Args:
      batch_mean, batch_var: this batch's statistics.
      running_mean, running_var: the running averages before this step.
      epsilon: added to both variances.
      r_max: ``>= 1``; ``d_max``: ``>= 0`` (``inf`` for no clipping).

    Returns:
      ``(r, d)``, broadcast from the inputs, wrapped in ``stop_gradient``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxstab.batchnorm import renorm_correction
      >>> r, d = renorm_correction(jnp.array([2.0]), jnp.array([16.0]), jnp.array([0.0]),
      ...                          jnp.array([4.0]), epsilon=0.0, r_max=3.0, d_max=0.5)
      >>> r, d
      (Array([2.], dtype=float32), Array([0.5], dtype=float32))

    References:
      Ioffe, `Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
      Models <https://arxiv.org/abs/1702.03275>`_, NeurIPS 2017.
    """
    inv_sigma = lax.rsqrt(running_var + epsilon)
    r = jnp.clip(jnp.sqrt(batch_var + epsilon) * inv_sigma, 1 / r_max, r_max)
    d = jnp.clip((batch_mean - running_mean) * inv_sigma, -d_max, d_max)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def renorm_schedules(
    *,
    warmup_steps: int = 5_000,
    r_max: float = 3.0,
    r_max_steps: int = 40_000,
    d_max: float = 5.0,
    d_max_steps: int = 25_000,
) -> tuple[optax.Schedule, optax.Schedule]:
    """The paper's ramp of Batch Renormalization's clipping limits, as two optax schedules.

    ``r_max = 1, d_max = 0`` (plain batch norm) for ``warmup_steps`` training steps, then both
    relax linearly to reach ``r_max`` at step ``r_max_steps`` and ``d_max`` at ``d_max_steps``
    (Ioffe 2017, section 4: 5k, 40k and 25k steps for a batch of 32 per worker). Pass them as
    ``BatchNorm(renorm=True, r_max=..., d_max=...)``: the module then counts its training steps
    in ``batch_stats['step']``.

    Args:
      warmup_steps: steps of plain batch norm.
      r_max: final ``r_max`` (``>= 1``), reached at ``r_max_steps``.
      r_max_steps: step at which ``r_max`` is reached (``>= warmup_steps``).
      d_max: final ``d_max`` (``>= 0``), reached at ``d_max_steps``.
      d_max_steps: step at which ``d_max`` is reached (``>= warmup_steps``).

    Returns:
      ``(r_max_schedule, d_max_schedule)``, functions of the step count.

    Example:
      >>> from jaxstab.batchnorm import renorm_schedules
      >>> r_max, d_max = renorm_schedules()
      >>> [float(r_max(s)) for s in (0, 5_000, 22_500, 40_000, 90_000)]
      [1.0, 1.0, 2.0, 3.0, 3.0]
      >>> [float(d_max(s)) for s in (0, 5_000, 15_000, 25_000)]
      [0.0, 0.0, 2.5, 5.0]

    References:
      Ioffe, `Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
      Models <https://arxiv.org/abs/1702.03275>`_, NeurIPS 2017.
    """
    if r_max < 1:
        raise ValueError(f"r_max must be >= 1, got {r_max!r}")
    if d_max < 0:
        raise ValueError(f"d_max must be >= 0, got {d_max!r}")
    for name, steps in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
        if not 0 <= warmup_steps <= steps:
            raise ValueError(f"{name} must be >= warmup_steps = {warmup_steps} >= 0, got {steps!r}")
    return (
        optax.linear_schedule(1.0, r_max, max(r_max_steps - warmup_steps, 1), warmup_steps),
        optax.linear_schedule(0.0, d_max, max(d_max_steps - warmup_steps, 1), warmup_steps),
    )
