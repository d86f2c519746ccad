"""spike_recovery on healthy and corrupted runs of four kinds: what it costs a healthy run, and
what it catches.

Workloads (small batches on purpose: their minibatch losses are skewed and heavy-tailed):

- ``regression``: a 2-layer MLP on scikit-learn's bundled diabetes data, batch 4, MSE;
- ``batchnorm``: an MLP with ``jaxstab.linen.BatchNorm`` on the bundled digits, batch 16,
  cross-entropy; the training state holds ``batch_stats``;
- ``transformer``: the char-level GPT of ``examples/transformer_lm.py`` on the standard library's
  source (AdamW, weight decay 0.1);
- ``rnn``: a char-level GRU on the same text, batch 8, 32 steps.

Each trains with Adam(W) and a warm-up + cosine schedule, the whole training state (params,
optimizer state, batch statistics, step counter) under ``spike_recovery``, inside one
``lax.scan`` per run; the data position advances by ``1 + skip_batches`` each step, so a skip
moves past bad data. Scenarios: ``healthy``; ``nan`` (one batch of NaN inputs); ``burst`` (40
corrupted batches: random labels, targets or tokens); ``lr30`` (the updates x30 from some step on;
the controller runs with ``lr_backoff=0.1``). Each corrupted run is compared with the clean run of
the same length and seed (final held-out loss).

Run: ``PYTHONPATH=. python benchmarks/recovery_health.py [--steps 10000] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import transformer_lm as lm
from sklearn.datasets import load_diabetes, load_digits

import jaxstab
from benchmarks import _harness


class Workload(NamedTuple):
    """A training job: ``init() -> (params, extra)`` (``extra``: model state such as batch
    statistics), ``loss_fn(params, extra, batch, train) -> (loss, extra)``, ``get_batch(key,
    index)``, ``corrupt(batch, key)`` (a corrupted batch), ``evaluate(params, extra)`` (held-out
    loss), the peak learning rate and AdamW's weight decay."""

    init: Callable[[], Any]
    loss_fn: Callable
    get_batch: Callable
    corrupt: Callable
    evaluate: Callable
    rate: float
    weight_decay: float = 0.0


def _schedule(rate: float, steps: int):
    return optax.warmup_cosine_decay_schedule(0.0, rate, max(steps // 20, 1), steps, rate / 20)


def _rows(x, y, batch):
    def get(key, index):
        idx = jax.random.randint(jax.random.fold_in(key, index), (batch,), 0, x.shape[0])
        return x[idx], y[idx]

    return get


class MLP(nn.Module):
    out: int
    batchnorm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = True):
        for _ in range(2):
            x = nn.Dense(128 if self.batchnorm else 64)(x)
            if self.batchnorm:
                x = jaxstab.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(self.out)(x)


def regression() -> Workload:
    x, y = load_diabetes(return_X_y=True)
    x = jnp.asarray((x - x.mean(0)) / x.std(0), jnp.float32)
    y = jnp.asarray((y - y.mean()) / y.std(), jnp.float32)
    train, test = slice(0, 350), slice(350, None)
    model = MLP(1)

    def loss_fn(params, extra, batch, train=True):
        xb, yb = batch
        return jnp.mean((model.apply({"params": params}, xb)[:, 0] - yb) ** 2), extra

    def corrupt(batch, key):
        return batch[0], 10.0 * jax.random.normal(key, batch[1].shape)  # wrong targets

    return Workload(
        lambda: (model.init(jax.random.key(0), x[:1])["params"], {}),
        loss_fn,
        _rows(x[train], y[train], 4),
        corrupt,
        lambda p, e: loss_fn(p, e, (x[test], y[test]))[0],
        3e-3,
    )


def batchnorm() -> Workload:
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y, jnp.int32)
    train, test = slice(0, 1500), slice(1500, None)
    model = MLP(10, batchnorm=True)

    def loss_fn(params, stats, batch, train=True):
        xb, yb = batch
        if train:
            logits, upd = model.apply(
                {"params": params, "batch_stats": stats}, xb, mutable=["batch_stats"]
            )
            stats = upd["batch_stats"]
        else:
            logits = model.apply({"params": params, "batch_stats": stats}, xb, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), stats

    def init():
        v = model.init(jax.random.key(0), x[:2])
        return v["params"], v["batch_stats"]

    def corrupt(batch, key):
        return batch[0], jax.random.randint(key, batch[1].shape, 0, 10)  # random labels

    return Workload(
        init, loss_fn, _rows(x[train], y[train], 16), corrupt,
        lambda p, e: loss_fn(p, e, (x[test], y[test]), train=False)[0], 3e-3,
    )  # fmt: skip


def _text(model, init_tokens, batch: int, rate: float) -> Workload:
    train, val = lm.load_corpus(1_000_000)

    def loss_fn(params, extra, tokens, train=True):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), extra

    def get(key, index):
        return lm.sample_batch(train, jax.random.fold_in(key, index), batch)

    def corrupt(tokens, key):
        return jax.random.randint(key, tokens.shape, 0, 256).astype(tokens.dtype)

    val_batch = lm.sample_batch(val, jax.random.key(123), 64)
    return Workload(
        lambda: (model.init(jax.random.key(0), init_tokens)["params"], {}),
        loss_fn, get, corrupt, lambda p, e: loss_fn(p, e, val_batch)[0], rate,
    )  # fmt: skip


class GRU(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(256, 64)(tokens)
        x = nn.RNN(nn.GRUCell(128))(x)
        return nn.Dense(256)(x)


def transformer() -> Workload:
    return _text(lm.GPT(), jnp.zeros((1, lm.CONTEXT), jnp.int32), lm.BATCH, 3e-3)._replace(
        weight_decay=lm.WEIGHT_DECAY
    )


def rnn() -> Workload:
    return _text(GRU(), jnp.zeros((1, 32), jnp.int32), 8, 3e-3)


WORKLOADS = {"regression": regression, "batchnorm": batchnorm, "transformer": transformer,
             "rnn": rnn}  # fmt: skip


def _poison(batch, poisoned):
    """A NaN batch: float inputs (the first element of a tuple batch) become NaN."""
    if not isinstance(batch, tuple):
        return batch  # tokens: the loss is made NaN instead
    return (jnp.where(poisoned, jnp.nan, batch[0]), *batch[1:])


def make_run(work: Workload, steps: int, recovery):
    """A jitted ``run(seed, events) -> (final state, per-step records, rstate)`` of ``steps``
    steps. ``events = (nan_at, burst_start, burst_stop, lr30_at)``: data positions for the first
    three, a step for the last (-1: never)."""
    tx = optax.adamw(_schedule(work.rate, steps), weight_decay=work.weight_decay)

    def loss_fn(params, extra, batch, poisoned):
        loss, extra = work.loss_fn(params, extra, _poison(batch, poisoned))
        return loss * jnp.where(poisoned, jnp.nan, 1.0), extra

    def train_step(state, batch, poisoned, boost, lr_scale=1.0):
        params, extra, opt_state = state
        (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, extra, batch, poisoned
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * (lr_scale * boost), updates)
        return (optax.apply_updates(params, updates), extra, opt_state), loss

    step = None if recovery is None else recovery.wrap(train_step, jit=False)

    def run(seed, events):
        nan_at, burst_start, burst_stop, lr30_at = events
        key = jax.random.key(seed)
        params, extra = work.init()
        state = (params, extra, tx.init(params))
        rstate = recovery.init(state) if recovery is not None else None

        def body(carry, i):
            state, rstate, index = carry
            batch = work.get_batch(key, index)
            bad = (index >= burst_start) & (index < burst_stop)
            corrupted = work.corrupt(batch, jax.random.fold_in(key, index + 10**8))
            batch = jax.tree.map(lambda b, c: jnp.where(bad, c, b), batch, corrupted)
            boost = jnp.where((lr30_at >= 0) & (i >= lr30_at), 30.0, 1.0)
            if step is None:
                state, loss = train_step(state, batch, index == nan_at, boost)
                skip, rec = 0, (loss, False, False, False)
            else:
                state, rstate, loss = step(state, rstate, batch, index == nan_at, boost)
                skip = rstate.skip_batches
                rec = (loss, rstate.skipped, rstate.rolled_back, rstate.gave_up)
            return (state, rstate, index + 1 + skip), rec

        (state, rstate, _), records = jax.lax.scan(
            body, (state, rstate, jnp.int32(0)), jnp.arange(steps)
        )
        return state, records, rstate

    return jax.jit(run)


SCENARIOS = ("healthy", "nan", "burst", "lr30")
KWARGS = {"every": 100, "lr_backoff": 0.1, "backoff_steps": 500}


def events(scenario: str, steps: int) -> tuple[int, int, int, int]:
    """``(nan_at, burst_start, burst_stop, lr30_at)`` of a scenario; events at mid-run."""
    mid = steps // 2
    return {
        "healthy": (-1, -1, -1, -1),
        "nan": (mid, -1, -1, -1),
        "burst": (-1, mid, mid + 40, -1),
        "lr30": (-1, -1, -1, mid),
    }[scenario]


def finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.inexact))  # fmt: skip


def measure(name: str, steps: int, scenarios, seeds, kwargs: dict, save: str | None = None,
            uncontrolled: bool = True):  # fmt: skip
    """One row per (scenario, seed, controller) of workload ``name``; with ``save``, each
    run's per-step losses go to ``save/{name}_{scenario}_{controller}_{seed}.npy``."""
    work = WORKLOADS[name]()
    variants = {"spike_recovery": jaxstab.spike_recovery(**kwargs)}
    if uncontrolled and set(scenarios) - {"healthy"}:
        variants["none"] = None
    rows = []
    for variant, recovery in variants.items():
        run = make_run(work, steps, recovery)
        clean = {}
        for scenario in ("healthy", *[s for s in scenarios if s != "healthy"]):
            for seed in seeds:
                t0 = time.perf_counter()
                state, (loss, skipped, rolled, gave_up), _ = run(seed, events(scenario, steps))
                jax.block_until_ready(state)
                seconds = time.perf_counter() - t0
                value = float(work.evaluate(state[0], state[1]))
                if scenario == "healthy":
                    clean[seed] = value
                loss = np.asarray(loss)
                if save:
                    os.makedirs(save, exist_ok=True)
                    np.save(os.path.join(save, f"{name}_{scenario}_{variant}_{seed}.npy"), loss)
                rows.append({
                    "workload": name, "scenario": scenario, "controller": variant, "seed": seed,
                    "steps": steps, "skipped": int(np.sum(skipped)),
                    "rollbacks": int(np.sum(rolled)), "gave_up": bool(np.any(gave_up)),
                    "eval": value, "vs_clean": 100 * (value / clean[seed] - 1),
                    "finite": finite(state), "seconds": seconds,
                    "p999_ratio": float(np.nanpercentile(loss, 99.9) / np.nanmedian(loss)),
                })  # fmt: skip
    return rows


def health_parser(description: str) -> argparse.ArgumentParser:
    """The flags every healthy-run script shares: ``--workloads``, ``--steps``, ``--seeds`` and
    ``--quick`` (300 steps; read the run length with :func:`run_steps`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="300 steps (a smoke test)")
    return parser


def run_steps(args: argparse.Namespace) -> int:
    return 300 if args.quick else args.steps


def main(argv=None) -> None:
    parser = health_parser(__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--save-losses", metavar="DIR", help="save per-step losses as .npy")
    parser.add_argument("--controller-only", action="store_true", help="no uncontrolled runs")
    parser.add_argument(
        "--recovery-kwargs", type=json.loads, default=KWARGS,
        help=f"spike_recovery's keyword arguments as JSON (default {json.dumps(KWARGS)})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    steps = run_steps(args)
    kwargs = args.recovery_kwargs
    rows = []
    for name in args.workloads:
        rows += measure(name, steps, args.scenarios, range(args.seeds), kwargs, args.save_losses,
                        uncontrolled=not args.controller_only)  # fmt: skip
    print(f"spike_recovery({', '.join(f'{k}={v}' for k, v in kwargs.items())}), {steps} steps")
    header = ["workload", "scenario", "controller", "skipped", "skipped %", "rollbacks",
              "gave up", "eval loss", "vs clean", "finite", "p99.9/median loss", "s"]  # fmt: skip
    table = [[r["workload"], r["scenario"], r["controller"], str(r["skipped"]),
              f"{100 * r['skipped'] / r['steps']:.2f}%", str(r["rollbacks"]),
              "yes" if r["gave_up"] else "no", f"{r['eval']:.4f}", f"{r['vs_clean']:+.2f}%",
              "yes" if r["finite"] else "no", f"{r['p999_ratio']:.1f}",
              f"{r['seconds']:.0f}"] for r in rows]  # fmt: skip
    print(_harness.markdown_table(header, table))
    return rows


if __name__ == "__main__":
    main()
