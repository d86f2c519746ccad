"""Shared timing harness: jitted, params-donated optimizer steps, timed interleaved in one process.

These machines are noisy, so absolute times mean little: every variant is timed in the same
process, round-robin (one step of each variant per round), and reported as a ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def make_tree(n_leaves: int = 20, total: int = 10_000_000, seed: int = 0):
    """A float32 ``(params, grads)`` pair of ``n_leaves`` 2-D leaves holding ``total`` elements."""
    per_leaf = total // n_leaves
    cols = 256 if per_leaf >= 256 * 4 else 1
    rng = np.random.default_rng(seed)
    params, grads = {}, {}
    for i in range(n_leaves):
        shape = (per_leaf // cols, cols)
        params[f"layer_{i:04d}"] = jnp.asarray(rng.standard_normal(shape, np.float32) * 0.05)
        grads[f"layer_{i:04d}"] = jnp.asarray(rng.standard_normal(shape, np.float32) * 0.01)
    return params, grads


def jit_step(step: Callable) -> Callable:
    """``step(params, state, grads) -> (params, state)`` jitted with params and state donated."""
    return jax.jit(step, donate_argnums=(0, 1))


def optimizer_step(tx: optax.GradientTransformation) -> Callable:
    """The jitted training-step body: update, apply; params and state donated."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jit_step(step)


def triad_floor() -> Callable:
    """A donated in-place triad ``p <- p + a * g`` over the same tree: the memory-bandwidth floor
    of any step that reads the gradients once and rewrites the parameters."""

    def step(params, state, grads):
        return jax.tree.map(lambda p, g: p + 1e-3 * g, params, grads), state

    return jit_step(step)


def time_steps(
    steps: dict[str, tuple[Callable, Callable]],
    params,
    grads,
    *,
    reps: int = 30,
    warmup: int = 3,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step and compile seconds of each ``name: (step_fn, init_fn)``.

    ``init_fn(params) -> state``. Steps run round-robin, in a new random order every round, so
    that machine noise, and what the previous step left in caches and the allocator, hit all
    variants alike (a fixed order measurably slows whichever step follows a memory-heavy one).
    """
    live, compile_s = {}, {}
    for name, (step, init) in steps.items():
        p = jax.tree.map(jnp.copy, params)
        s = init(p)
        t0 = time.perf_counter()
        compiled = step.lower(p, s, grads).compile()
        compile_s[name] = time.perf_counter() - t0
        for _ in range(warmup):
            p, s = compiled(p, s, grads)
        jax.block_until_ready(p)
        live[name] = [compiled, p, s, []]
    rng = random.Random(0)
    order = list(live.values())
    for _ in range(reps):
        rng.shuffle(order)
        for entry in order:
            compiled, p, s, times = entry
            t0 = time.perf_counter()
            p, s = compiled(p, s, grads)
            jax.block_until_ready((p, s))
            times.append(time.perf_counter() - t0)
            entry[1], entry[2] = p, s
    return {k: statistics.median(v[3]) for k, v in live.items()}, compile_s


def optimizer_steps(variants: dict[str, optax.GradientTransformation]):
    """``time_steps`` input for optax transformations."""
    return {name: (optimizer_step(tx), tx.init) for name, tx in variants.items()}


def quick_from_args(description: str) -> bool:
    """Parses the benchmarks' shared ``--quick`` flag (a short smoke run)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller tree")
    return parser.parse_args().quick


def size_from_args(description: str) -> tuple[int, int]:
    """Parses ``--quick`` (see :func:`quick_from_args`): ``(total params, repetitions)``."""
    return (2_000_000, 8) if quick_from_args(description) else (10_000_000, 40)


def ratio_table(times: dict[str, float], compile_s: dict[str, float], base: str) -> str:
    """``time_steps``' results as a markdown table of ms/step, ratio to ``base`` and compile s."""
    rows = [
        [name, f"{t * 1e3:.2f}", f"{t / times[base]:.2f}x", f"{compile_s[name]:.2f}"]
        for name, t in times.items()
    ]
    return markdown_table(["variant", "ms/step", f"vs {base}", "compile s"], rows)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
