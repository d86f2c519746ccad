"""Compile time: each transform in a jitted, donated optimizer step over a transformer-shaped tree.

The tree is ``N`` unscanned transformer layers of width 64, each with 16 leaves: q/k/v/o kernels
and biases, two layer norms (scale, bias), two MLP kernels and biases. Every row times
``jax.jit(step, donate_argnums=(0, 1)).lower(...).compile()`` of ``update`` + ``apply_updates``
on a fresh jit, split into tracing to a jaxpr ("trace s"), lowering to StableHLO ("lower s") and
XLA's compile ("XLA s"), the fastest of two compiles taken round-robin; "eqns" is the length of
the step's jaxpr. Ratios are to optax's
``clip_by_global_norm`` + Adam (AGC rows: to optax's ``adaptive_grad_clip`` + SGD).

Run: ``PYTHONPATH=. python benchmarks/bench_compile.py [--quick]`` (``--quick``: 12 layers only).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import jaxstab
from benchmarks import _harness

WIDTH = 64
CLIP_ADAM, AGC_SGD = "optax clip_by_global_norm+adam", "optax adaptive_grad_clip+sgd"

# name: (transformation factory, name of the row it is compared with)
VARIANTS = {
    "adam": (lambda: optax.adam(1e-3), CLIP_ADAM),
    CLIP_ADAM: (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), CLIP_ADAM),
    "jaxstab clip_by_global_norm+adam": (
        lambda: optax.chain(jaxstab.clip_by_global_norm(1.0), optax.adam(1e-3)), CLIP_ADAM),
    "zscore_clip+adam": (lambda: optax.chain(jaxstab.zscore_clip(), optax.adam(1e-3)), CLIP_ADAM),
    "quantile_clip+adam": (
        lambda: optax.chain(jaxstab.quantile_clip(), optax.adam(1e-3)), CLIP_ADAM),
    "adagc+adam": (lambda: optax.chain(jaxstab.adagc(), optax.adam(1e-3)), CLIP_ADAM),
    "normalize_by_global_norm+adam": (
        lambda: optax.chain(jaxstab.normalize_by_global_norm(), optax.adam(1e-3)), CLIP_ADAM),
    "skip_anomalies(adam)": (lambda: jaxstab.skip_anomalies(optax.adam(1e-3)), CLIP_ADAM),
    AGC_SGD: (lambda: optax.chain(optax.adaptive_grad_clip(0.01), optax.sgd(1e-3)), AGC_SGD),
    "jaxstab adaptive_grad_clip+sgd": (
        lambda: optax.chain(jaxstab.adaptive_grad_clip(0.01), optax.sgd(1e-3)), AGC_SGD),
}  # fmt: skip


def transformer_params(n_layers: int, d: int = WIDTH) -> dict:
    """Abstract float32 parameters of ``n_layers`` transformer layers, 16 leaves each."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    layer = {
        "attn": {n: {"kernel": f32(d, d), "bias": f32(d)} for n in ("q", "k", "v", "o")},
        "ln1": {"scale": f32(d), "bias": f32(d)},
        "ln2": {"scale": f32(d), "bias": f32(d)},
        "mlp_in": {"kernel": f32(d, 4 * d), "bias": f32(4 * d)},
        "mlp_out": {"kernel": f32(4 * d, d), "bias": f32(d)},
    }
    return {f"layer_{i:02d}": layer for i in range(n_layers)}


def compile_times(tx: optax.GradientTransformation, params) -> tuple[int, float, float, float]:
    """``(jaxpr eqns, trace s, lower s, XLA compile s)`` of a fresh jitted, donated step."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.eval_shape(tx.init, params)
    t0 = time.perf_counter()
    traced = jax.jit(step, donate_argnums=(0, 1)).trace(params, state, params)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    return len(traced.jaxpr.eqns), t1 - t0, t2 - t1, time.perf_counter() - t2


def fastest_compiles(variants: dict, params, rounds: int = 2) -> dict:
    """``compile_times`` of each ``name: factory``, the fastest of ``rounds`` fresh compiles taken
    round-robin (noise on a shared machine only ever adds time)."""
    best = {}
    for _ in range(rounds):
        for name, make in variants.items():
            times = compile_times(make(), params)
            if name not in best or sum(times[1:]) < sum(best[name][1:]):
                best[name] = times
    return best


def run(n_layers: int) -> str:
    params = transformer_params(n_layers)
    measured = fastest_compiles({name: make for name, (make, _) in VARIANTS.items()}, params)
    total = {name: sum(times[1:]) for name, times in measured.items()}
    rows = [
        [name, str(eqns), f"{trace_s:.2f}", f"{lower_s:.2f}", f"{xla_s:.2f}", f"{total[name]:.2f}",
         f"{total[name] / total[VARIANTS[name][1]]:.2f}x"]
        for name, (eqns, trace_s, lower_s, xla_s) in measured.items()
    ]  # fmt: skip
    header = ["variant", "eqns", "trace s", "lower s", "XLA s", "compile s", "vs optax baseline"]
    return _harness.markdown_table(header, rows)


def main() -> None:
    quick = _harness.quick_from_args(__doc__.splitlines()[0])
    for n_layers in (12,) if quick else (12, 40):
        print(f"\n### Compile time, {n_layers} layers ({16 * n_layers} leaves), d={WIDTH}\n")
        print(run(n_layers), flush=True)


if __name__ == "__main__":
    main()
