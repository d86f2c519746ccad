"""Update-side stabilizers: stable_adamw and spam against optax.adamw.

Step time on a jitted, params-donated step (10M float32 parameters in 20 leaves), timed
round-robin in one process and reported as a ratio to ``optax.adamw``; targets 1.15x. Compile time
at 640 leaves, a 40-layer transformer-shaped tree (d=64), as a ratio to adamw's; target 1.2x.
``adamw + zscore_clip`` (the update norm clipped by its own z-score) is shown for reference.

Run: ``PYTHONPATH=. python benchmarks/bench_optimizers.py [--quick]``.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _harness
from jaxstab.adaptive import zscore_clip
from jaxstab.optimizers import spam, stable_adamw


def variants() -> dict[str, optax.GradientTransformation]:
    return {
        "adamw": optax.adamw(1e-3),
        "stable_adamw": stable_adamw(1e-3),
        "spam": spam(1e-3),
        "spam (count_spikes=True)": spam(1e-3, count_spikes=True),
        "adamw + zscore_clip (update norm)": optax.chain(optax.adamw(1e-3), zscore_clip()),
    }


def transformer_tree(n_layers: int = 40, d: int = 64, seed: int = 0):
    """``(params, grads)`` shaped like a pre-LN transformer: per layer q/k/v/o kernels and
    biases, two layer norms (scale, bias), two MLP kernels and biases: 16 leaves a layer."""
    rng = np.random.default_rng(seed)
    shapes = {}
    for name in ("q", "k", "v", "o"):
        shapes[f"{name}/kernel"], shapes[f"{name}/bias"] = (d, d), (d,)
    for name in ("ln1", "ln2"):
        shapes[f"{name}/scale"], shapes[f"{name}/bias"] = (d,), (d,)
    shapes["mlp1/kernel"], shapes["mlp1/bias"] = (d, 4 * d), (4 * d,)
    shapes["mlp2/kernel"], shapes["mlp2/bias"] = (4 * d, d), (d,)
    params, grads = {}, {}
    for layer in range(n_layers):
        for name, shape in shapes.items():
            key = f"layer_{layer:02d}/{name}"
            params[key] = jnp.asarray(rng.standard_normal(shape, np.float32) * 0.05)
            grads[key] = jnp.asarray(rng.standard_normal(shape, np.float32) * 0.01)
    return params, grads


def compile_seconds(tx: optax.GradientTransformation, params, grads) -> float:
    step = _harness.optimizer_step(tx)
    state = tx.init(params)
    t0 = time.perf_counter()
    step.lower(params, state, grads).compile()
    return time.perf_counter() - t0


def main() -> None:
    total, reps = _harness.size_from_args(__doc__.splitlines()[0])
    n_leaves = 20
    params, grads = _harness.make_tree(n_leaves, total)
    times, _ = _harness.time_steps(_harness.optimizer_steps(variants()), params, grads, reps=reps)
    del params, grads
    big_params, big_grads = transformer_tree()
    n_big = len(big_params)
    compile_s = {
        name: compile_seconds(tx, big_params, big_grads) for name, tx in variants().items()
    }
    base, base_c = times["adamw"], compile_s["adamw"]
    rows = [
        [
            name,
            f"{t * 1e3:.2f}",
            f"{t / base:.2f}x",
            f"{compile_s[name]:.2f}",
            f"{compile_s[name] / base_c:.2f}x",
        ]
        for name, t in times.items()
    ]
    print(
        f"\n### Update-side stabilizers: step on {total / 1e6:g}M float32 params in {n_leaves} "
        f"leaves; compile at {n_big} leaves"
    )
    print()
    header = ["variant", "ms/step", "vs adamw", f"compile s ({n_big} leaves)", "vs adamw"]
    print(_harness.markdown_table(header, rows))


if __name__ == "__main__":
    main()
