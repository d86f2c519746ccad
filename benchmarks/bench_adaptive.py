"""Adaptive clipping and skip guards: cost against Adam on a jitted, params-donated step.

Each variant is reported as a ratio to plain Adam, timed round-robin in one process. Targets on a
2-core CPU: zscore_clip, quantile_clip and skip_anomalies at most 1.3x Adam. Two obvious ways to
write a skip guard are kept for reference: ``jnp.where(skip, old, new)`` on every inner-state leaf
(what ``optax.apply_if_finite`` does), and ``lax.cond`` between the inner update and the old state.
With donated state both make XLA copy the optimizer state every step; ``skip_anomalies`` does not
(see ``jaxstab/guards.py``).

Run: ``PYTHONPATH=. python benchmarks/bench_adaptive.py [--quick]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from benchmarks import _harness
from jaxstab import _norms
from jaxstab.adaptive import adagc, quantile_clip, zscore_clip
from jaxstab.guards import skip_anomalies
from jaxstab.scaling import normalize_by_global_norm


def where_skip(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Skip non-finite steps by selecting every state leaf (reference only)."""

    def update_fn(updates, state, params=None):
        finite = jnp.isfinite(_norms.global_norm(updates))
        new_updates, new_state = inner.update(updates, state, params)
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        return _norms.scale_tree(new_updates, finite.astype(jnp.float32)), new_state

    return optax.GradientTransformation(inner.init, update_fn)


def cond_skip(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Skip non-finite steps with ``lax.cond`` (reference only)."""

    def update_fn(updates, state, params=None):
        finite = jnp.isfinite(_norms.global_norm(updates))

        def take(_):
            return inner.update(updates, state, params)

        def skip(_):
            return jax.tree.map(jnp.zeros_like, updates), state

        return jax.lax.cond(finite, take, skip, None)

    return optax.GradientTransformation(inner.init, update_fn)


def variants() -> dict[str, optax.GradientTransformation]:
    adam = lambda: optax.adam(1e-3)
    return {
        "adam": adam(),
        "zscore_clip+adam": optax.chain(zscore_clip(), adam()),
        "quantile_clip+adam": optax.chain(quantile_clip(), adam()),
        "adagc+adam": optax.chain(adagc(), adam()),
        "normalize_by_global_norm+adam": optax.chain(normalize_by_global_norm(), adam()),
        "skip_anomalies(adam)": skip_anomalies(adam()),
        "naive skip: where per leaf": where_skip(adam()),
        "naive skip: lax.cond": cond_skip(adam()),
    }


def run(n_leaves: int, total: int, reps: int) -> str:
    params, grads = _harness.make_tree(n_leaves, total)
    steps = _harness.optimizer_steps(variants())
    times, compile_s = _harness.time_steps(steps, params, grads, reps=reps)
    return _harness.ratio_table(times, compile_s, "adam")


def main() -> None:
    total, reps = _harness.size_from_args(__doc__.splitlines()[0])
    n_leaves = 20
    print(f"\n### Adaptive clipping and guards, {total / 1e6:g}M float32 params, {n_leaves} leaves")
    print()
    print(run(n_leaves, total, reps))


if __name__ == "__main__":
    main()
