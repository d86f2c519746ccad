"""jaxstab.linen.BatchNorm against flax.linen.BatchNorm: training step and inference, jitted.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_batchnorm.py [--quick]``. Prints a markdown
table of median times (after warm-up; variants interleaved round by round, in a shuffled order,
so that they share the machine's noise) and the ratio to flax's default (fast, one-pass
variance). ``flax two-pass`` is flax with ``use_fast_variance=False``: the fair comparison for
accuracy, since flax's default variance cancels at large mean/std and ours does not.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import flax.linen as fnn
import jax
import jax.numpy as jnp

import jaxstab.linen

SHAPE = (128, 16, 16, 64)


def _train_fn(module):
    """One layer of a training step: output, new running statistics, grads of params and x."""

    def step(variables, x, cotangent):
        def forward(params, x):
            return module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )

        y, vjp, updates = jax.vjp(forward, variables["params"], x, has_aux=True)
        return y, updates, vjp(cotangent)

    return jax.jit(step)


def _eval_fn(module):
    return jax.jit(lambda v, x: module.apply(v, x, use_running_average=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
    args = parser.parse_args()
    rounds, warmup = (15, 3) if args.quick else (300, 20)

    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, SHAPE, jnp.float32) * 2.0 + 0.5
    g = jax.random.normal(kg, SHAPE, jnp.float32)
    modules = {
        "flax (default, fast variance)": fnn.BatchNorm(),
        "flax two-pass (use_fast_variance=False)": fnn.BatchNorm(use_fast_variance=False),
        "jaxstab (default, shifted one-pass)": jaxstab.linen.BatchNorm(),
        "jaxstab two-pass (use_fast_variance=False)": jaxstab.linen.BatchNorm(
            use_fast_variance=False
        ),
    }
    variables = {
        k: m.init(jax.random.key(1), x, use_running_average=False) for k, m in modules.items()
    }
    cases = {}
    for name, m in modules.items():
        v = variables[name]
        cases[("train: fwd+bwd", name)] = (_train_fn(m), (v, x, g))
        cases[("eval: fwd", name)] = (_eval_fn(m), (v, x))

    times: dict = {key: [] for key in cases}
    order = list(cases)
    shuffle = random.Random(0).shuffle
    for i in range(warmup + rounds):
        shuffle(order)  # no variant always runs right after the same other one
        for key in order:
            fn, fargs = cases[key]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*fargs))
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)

    print(f"BatchNorm, input {SHAPE} float32, {jax.devices()[0].platform}, median of {rounds}\n")
    print("| mode | variant | median ms | ratio to flax default |")
    print("|---|---|---:|---:|")
    for mode in ("train: fwd+bwd", "eval: fwd"):
        base = statistics.median(times[(mode, "flax (default, fast variance)")])
        for name in modules:
            t = statistics.median(times[(mode, name)])
            print(f"| {mode} | {name} | {t * 1e3:.3f} | {t / base:.3f} |")


if __name__ == "__main__":
    main()
