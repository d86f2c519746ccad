"""Clipping cost: jaxstab vs optax on a jitted, params-donated optimizer step.

Each variant is reported as a ratio to the same optimizer without clipping, and to its
memory-bandwidth floor: the time of a donated in-place triad (read g and p, write p: three
param-sized arrays) scaled by the number of param-sized arrays the variant must move at the
least (SGD 3; Adam 7: g, p, mu, nu read, p, mu, nu written; a global norm reads g once more;
unit-wise norms read g and p once more).

Run: ``PYTHONPATH=. python benchmarks/bench_clip.py [--quick]``.
"""

from __future__ import annotations

import optax

import jaxstab
from benchmarks import _harness

# name: (transformation factory, baseline name, param-sized arrays moved at the least)
VARIANTS = {
    "SGD": (lambda: optax.sgd(1e-3), "SGD", 3),
    "Adam": (lambda: optax.adam(1e-3), "Adam", 7),
    "optax clip+SGD": (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-3)), "SGD", 4),
    "optax clip+Adam": (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), "Adam", 8),
    "jaxstab clip+SGD": (
        lambda: optax.chain(jaxstab.clip_by_global_norm(1.0), optax.sgd(1e-3)), "SGD", 4),
    "jaxstab clip+Adam": (
        lambda: optax.chain(jaxstab.clip_by_global_norm(1.0), optax.adam(1e-3)), "Adam", 8),
    "optax AGC+SGD": (
        lambda: optax.chain(optax.adaptive_grad_clip(0.01), optax.sgd(1e-3)), "SGD", 5),
    "jaxstab AGC+SGD": (
        lambda: optax.chain(jaxstab.adaptive_grad_clip(0.01), optax.sgd(1e-3)), "SGD", 5),
}


def run(n_leaves: int, total: int, reps: int, names=tuple(VARIANTS)) -> str:
    params, grads = _harness.make_tree(n_leaves, total)
    steps = _harness.optimizer_steps({k: VARIANTS[k][0]() for k in names})
    steps["floor (triad)"] = (_harness.triad_floor(), lambda p: ())
    times, compile_s = _harness.time_steps(steps, params, grads, reps=reps)
    floor = times["floor (triad)"]
    rows = []
    for name in names:
        _, base, arrays = VARIANTS[name]
        t = times[name]
        rows.append([
            name,
            f"{t * 1e3:.2f}",
            f"{t / times[base]:.2f}x",
            f"{t / (floor * arrays / 3):.2f}x",
            f"{compile_s[name]:.2f}",
        ])
    rows.append(["floor (triad)", f"{floor * 1e3:.2f}", "", "1.00x", ""])
    header = ["variant", "ms/step", "vs unclipped", "vs floor", "compile s"]
    return _harness.markdown_table(header, rows)


def main() -> None:
    total, reps = _harness.size_from_args(__doc__.splitlines()[0])
    print(f"\n### Clipping step, {total / 1e6:g}M float32 params in 20 leaves\n", flush=True)
    print(run(20, total, reps), flush=True)
    # Many leaves. AGC is left out here: at 2000 leaves its step compiles in about a minute
    # (optax's in about half that); bench_compile shows compile time against the leaf count.
    names = [k for k in VARIANTS if "AGC" not in k]
    print(f"\n### Clipping step, {total / 5e6:g}M float32 params in 2000 leaves\n", flush=True)
    print(run(2000, total // 5, max(reps // 4, 4), names), flush=True)


if __name__ == "__main__":
    main()
