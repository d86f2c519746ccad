"""How often each guard acts on healthy runs, and what that costs the run.

A guard that fires on an ordinary heavy-tailed minibatch harms the run it is meant to protect.
This trains the four workloads of ``recovery_health.py`` (a batch-4 regression MLP, a batch-16
MLP with ``jaxstab.linen.BatchNorm``, the char-level GPT of ``examples/transformer_lm.py``, a
batch-8 char-level GRU; AdamW with a warm-up + cosine schedule, one ``lax.scan`` per run) with
nothing corrupted, once under plain AdamW and once under each guard at its defaults, and reads
the guard's telemetry at every step:

- ``skip_anomalies(adamw)``: steps skipped (every one is a false alarm here);
- ``zscore_clip``, ``quantile_clip(0.9)``, ``clip_by_global_norm(1)`` before AdamW: steps
  clipped (``quantile_clip`` clips about 10% by construction, a fixed clip whatever exceeds it);
- ``adagc`` before AdamW, ``stable_adamw``: steps where any tensor was scaled down, and the mean
  share of tensors;
- ``spam`` (``count_spikes=True``), and without its moment resets: steps where any gradient
  entry was clipped as a spike.

"margin" is the largest ``grad_norm / threshold`` after the warm-up for the norm-based guards:
below 1 means the guard never acted, and by how much it stayed clear. "vs AdamW" is the final
held-out loss against plain AdamW's on the same seed and data (the mean over seeds, and their
range); the A/A row, AdamW at a rate ``1 + 1e-6`` times as large, is its noise: the two small
models overfit, and a rounding difference moves their held-out loss by several percent.

Run: ``PYTHONPATH=. python benchmarks/guard_health.py [--steps 10000] [--quick]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxstab
from benchmarks import _harness
from benchmarks.recovery_health import (
    WORKLOADS,
    Workload,
    _schedule,
    finite,
    health_parser,
    run_steps,
)


def _adamw(work: Workload, steps: int):
    return optax.adamw(_schedule(work.rate, steps), weight_decay=work.weight_decay)


def _perturbed_adamw(work: Workload, steps: int):
    """AdamW at a rate 1 + 1e-6 times as large: its distance from AdamW is the noise band."""
    rate = _schedule(work.rate, steps)
    return optax.adamw(lambda n: rate(n) * (1 + 1e-6), weight_decay=work.weight_decay)


def _before_adamw(guard: Callable[[], optax.GradientTransformation]):
    return lambda work, steps: optax.chain(guard(), _adamw(work, steps))


def _spam(**kwargs):
    """SPAM at the paper's settings (``kwargs`` overriding them), counting its clipped entries."""
    return lambda work, steps: jaxstab.spam(
        _schedule(work.rate, steps), weight_decay=work.weight_decay, count_spikes=True, **kwargs
    )


#: name -> (``tx(work, steps)``, telemetry field that says the guard acted, threshold field).
GUARDS: dict[str, tuple[Callable, str | None, str | None]] = {
    "adamw": (_adamw, None, None),
    "A/A: adamw, rate x(1 + 1e-6)": (_perturbed_adamw, None, None),
    "skip_anomalies": (
        lambda work, steps: jaxstab.skip_anomalies(_adamw(work, steps)),
        "skipped",
        "threshold",
    ),
    "zscore_clip": (_before_adamw(jaxstab.zscore_clip), "clipped", "threshold"),
    "quantile_clip(0.9)": (_before_adamw(jaxstab.quantile_clip), "clipped", "threshold"),
    "clip_by_global_norm(1)": (
        _before_adamw(lambda: jaxstab.clip_by_global_norm(1.0)),
        "clipped",
        None,
    ),
    "adagc": (_before_adamw(jaxstab.adagc), "clip_fraction", None),
    "stable_adamw": (
        lambda work, steps: jaxstab.stable_adamw(
            _schedule(work.rate, steps), weight_decay=work.weight_decay
        ),
        "clip_fraction",
        None,
    ),
    "spam": (_spam(), "spike_fraction", None),
    "spam(reset_interval=None)": (_spam(reset_interval=None), "spike_fraction", None),
}


#: Guards whose telemetry is a share (of tensors or entries) rather than a flag.
SHARES = ("adagc", "stable_adamw", "spam", "spam(reset_interval=None)")


def _field(opt_state, name: str | None) -> jax.Array:
    """The one telemetry value of ``opt_state`` whose key ends in ``/name`` (0 for ``None``)."""
    if name is None:
        return jnp.zeros((), jnp.float32)
    (value,) = [v for k, v in jaxstab.telemetry(opt_state).items() if k.endswith("/" + name)]
    return jnp.asarray(value, jnp.float32)


def make_run(work: Workload, steps: int, tx: optax.GradientTransformation, acted: str | None,
             threshold: str | None):  # fmt: skip
    """A jitted ``run(seed) -> (params, extra, per-step (acted, grad_norm / threshold,
    grad_norm))`` of ``steps`` healthy steps."""

    def body(carry, i):
        params, extra, opt_state, key = carry
        batch = work.get_batch(key, i)
        grads, extra = jax.grad(work.loss_fn, has_aux=True)(params, extra, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        norm = optax.tree_utils.tree_norm(grads)
        ratio = norm / _field(opt_state, threshold) if threshold else jnp.float32(0)
        record = (_field(opt_state, acted), ratio, norm)
        return (optax.apply_updates(params, updates), extra, opt_state, key), record

    def run(seed):
        params, extra = work.init()
        carry = (params, extra, tx.init(params), jax.random.key(seed))
        (params, extra, _, _), records = jax.lax.scan(body, carry, jnp.arange(steps))
        return params, extra, records

    return jax.jit(run)


def measure(name: str, steps: int, guards, seeds) -> list[dict]:
    """One row per (guard, seed) of workload ``name``'s healthy run."""
    work = WORKLOADS[name]()
    rows, plain = [], {}
    for guard in ("adamw", *[g for g in guards if g != "adamw"]):
        make_tx, acted, threshold = GUARDS[guard]
        run = make_run(work, steps, make_tx(work, steps), acted, threshold)
        for seed in seeds:
            t0 = time.perf_counter()
            params, extra, (act, ratio, norm) = run(seed)
            jax.block_until_ready(params)
            seconds = time.perf_counter() - t0
            value = float(work.evaluate(params, extra))
            plain.setdefault(seed, value)
            act, ratio, norm = np.asarray(act), np.asarray(ratio), np.asarray(norm)
            warm = ratio[min(100, steps // 4) :]  # past every guard's warm-up
            rows.append({
                "workload": name, "guard": guard, "seed": seed, "steps": steps,
                "acted": int(np.sum(act > 0)), "mean_share": float(np.mean(act)),
                "margin": float(np.max(warm)) if threshold and warm.size else float("nan"),
                "norm_p999": float(np.percentile(norm, 99.9) / np.median(norm)),
                "eval": value, "vs_adamw": 100 * (value / plain[seed] - 1),
                "finite": finite((params, extra)), "seconds": seconds,
            })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """One line per (workload, guard), over its seeds: steps acted on (all seeds together), the
    largest margin, the final loss against AdamW's (mean, and the range over seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["guard"] != "adamw":
            groups.setdefault((r["workload"], r["guard"]), []).append(r)
    header = ["workload", "guard", "acted on", "mean share", "margin", "vs AdamW", "finite"]
    body = []
    for (workload, guard), rs in groups.items():
        acted, steps = sum(r["acted"] for r in rs), sum(r["steps"] for r in rs)
        margin = max(r["margin"] for r in rs)
        vs = [r["vs_adamw"] for r in rs]
        spread = f" ({min(vs):+.1f}% to {max(vs):+.1f}%)" if len(vs) > 1 else ""
        body.append([
            workload, guard, f"{acted} ({100 * acted / steps:.2f}%)",
            f"{np.mean([r['mean_share'] for r in rs]):.2g}" if guard in SHARES else "-",
            "-" if np.isnan(margin) else f"{margin:.2f}",
            f"{np.mean(vs):+.2f}%{spread}", "yes" if all(r["finite"] for r in rs) else "no",
        ])  # fmt: skip
    return _harness.markdown_table(header, body)


def main(argv=None) -> list[dict]:
    parser = health_parser(__doc__.splitlines()[0])
    parser.add_argument("--guards", nargs="+", default=list(GUARDS), choices=GUARDS)
    args = parser.parse_args(argv)
    steps = run_steps(args)
    rows = []
    for name in args.workloads:
        rows += measure(name, steps, args.guards, range(args.seeds))
        spread = [r["norm_p999"] for r in rows if r["workload"] == name and r["guard"] == "adamw"]
        print(f"{name}: p99.9 / median gradient norm under AdamW {max(spread):.1f}", flush=True)
    print(f"healthy runs, {steps} steps, guards at their defaults")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
