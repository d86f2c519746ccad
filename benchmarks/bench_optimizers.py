"""Update-side optimizers: stable_adamw, spam and adam_atan2 against optax.adamw.

Step time on a jitted, params-donated step (10M float32 parameters in 20 leaves), timed
round-robin in one process and reported as a ratio to ``optax.adamw``; targets 1.15x. Compile time
at 640 leaves, a 40-layer transformer-shaped tree (d=64), as a ratio to adamw's; target 1.2x.
``adamw + zscore_clip`` (the update norm clipped by its own z-score) is shown for reference, and
so is the cost of one reduction per tensor feeding a scalar into that tensor's update, the least
any per-tensor statistic costs (compile time as in ``bench_compile``: trace, lower and XLA, the
fastest of two compiles).

Run: ``PYTHONPATH=. python benchmarks/bench_optimizers.py [--quick]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from benchmarks import _harness, bench_compile
from jaxstab.adaptive import zscore_clip
from jaxstab.optimizers import adam_atan2, spam, stable_adamw


def per_tensor_floor() -> optax.GradientTransformation:
    """A reference, not a stabilizer: each tensor's update scaled by a scalar from its own sum of
    squares. Any per-tensor statistic (StableAdamW's RMS, SPAM's finiteness test) needs one
    reduction per tensor and a scalar into its update; this row is what that alone costs."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: g * jax.lax.rsqrt(1 + jnp.sum(g * g)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def variants() -> dict[str, optax.GradientTransformation]:
    return {
        "adamw": optax.adamw(1e-3),
        "stable_adamw": stable_adamw(1e-3),
        "spam": spam(1e-3),
        "spam (count_spikes=True)": spam(1e-3, count_spikes=True),
        "adam_atan2": adam_atan2(1e-3),
        "adamw + zscore_clip (update norm)": optax.chain(optax.adamw(1e-3), zscore_clip()),
        "adamw + a reduction per tensor (reference)": optax.chain(
            per_tensor_floor(), optax.adamw(1e-3)
        ),
    }


def main() -> None:
    total, reps = _harness.size_from_args(__doc__.splitlines()[0])
    n_leaves = 20
    params, grads = _harness.make_tree(n_leaves, total)
    steps = _harness.optimizer_steps(variants())
    times, compile_s = _harness.time_steps(steps, params, grads, reps=reps)
    del params, grads
    # The step table first: compiling at 640 leaves takes minutes where XLA compiles slowly (on
    # a GPU), and a run cut short should still leave the step figures.
    print(f"\n### Update-side stabilizers, {total / 1e6:g}M float32 params, {n_leaves} leaves\n")
    print(_harness.ratio_table(times, compile_s, "adamw"), flush=True)
    big_params = bench_compile.transformer_params(40)
    n_big = len(jax.tree.leaves(big_params))
    fastest = bench_compile.fastest_compiles(
        {name: lambda tx=tx: tx for name, tx in variants().items()}, big_params
    )
    big_s = {name: sum(times[1:]) for name, times in fastest.items()}
    rows = [[name, f"{t:.2f}", f"{t / big_s['adamw']:.2f}x"] for name, t in big_s.items()]
    print(f"\n### Update-side stabilizers: compile at {n_big} leaves\n")
    print(_harness.markdown_table(["variant", "compile s", "vs adamw"], rows))


if __name__ == "__main__":
    main()
