"""Spike recovery: a transformer hit by a burst of corrupted batches, rolled back and resumed.

The char-level GPT of ``transformer_lm.py`` trains on the standard library's source with AdamW.
Midway, a burst of batches of random bytes arrives (a corrupted shard, a broken tokenizer): each
gives a loss far above normal and a gradient that pulls the model toward uniform bytes. Plain
AdamW trains through the burst; ``skip_anomalies`` skips its first steps but is talked into
accepting the rest (each skipped norm widens its band); ``spike_recovery`` rolls back to a
snapshot taken before the burst, bit for bit, tells the data loop to skip batches -- doubling the
skip while the burst goes on, without being told where it ends -- and redoes the steps it lost.
The loop is a plain Python loop over a data iterator, as in a user's trainer. Every run stops when
the optimizer has taken the same number of kept steps.

    python examples/spike_recovery.py                   # 600 steps, burst of 40 at 300, 2 seeds
    python examples/spike_recovery.py --burst-length 20
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common
import matplotlib.pyplot as plt
import transformer_lm as lm
from tqdm.auto import tqdm

import jaxstab

RATE = 3e-3
EVERY = 50  # spike_recovery snapshots; everything else at its defaults
METHODS = ("clean (no burst)", "AdamW", "skip_anomalies(AdamW)", "AdamW + spike_recovery")


def batches(train, seed: int, burst: range) -> Iterator[jax.Array]:
    """The data stream: batch ``i`` is random windows of ``train``, or random bytes for ``i`` in
    ``burst``; the same stream for every method with the same seed."""
    key = jax.random.key(seed + 1000)
    sample = jax.jit(lambda k: lm.sample_batch(train, k))
    noise = jax.jit(lambda k: jax.random.randint(k, (lm.BATCH, lm.CONTEXT + 1), 0, lm.VOCAB))
    i = 0
    while True:
        k = jax.random.fold_in(key, i)
        yield noise(k).astype(train.dtype) if i in burst else sample(k)
        i += 1


def train(method: str, data, *, steps: int, seed: int, burst: range) -> dict:
    """One run of ``method``; returns its curves and figures."""
    train_data, val_data = data
    model = lm.GPT()
    params = model.init(jax.random.key(seed), jnp.zeros((1, lm.CONTEXT), jnp.int32))["params"]
    warmup = max(1, int(lm.WARMUP_FRACTION * steps))
    tx = lm.adamw(optax.warmup_cosine_decay_schedule(0.0, RATE, warmup, steps))
    if method.startswith("skip_anomalies"):
        tx = jaxstab.skip_anomalies(tx)
    recover = method.endswith("spike_recovery")
    recovery = jaxstab.spike_recovery(EVERY)
    state = (params, tx.init(params))  # the whole training state: what a rollback restores

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return common.cross_entropy(logits, tokens[:, 1:])

    def train_step(state, tokens):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def plain(state, rstate, tokens):
        state, loss = train_step(state, tokens)
        return state, rstate, loss

    step = recovery.wrap(train_step) if recover else jax.jit(plain)
    rstate = recovery.init(state)

    stream = batches(train_data, seed, range(0) if method.startswith("clean") else burst)
    losses, skipped_batches = [], 0
    while len(losses) - int(rstate.steps_lost_total) < steps:
        state, rstate, loss = step(state, rstate, next(stream))
        losses.append(float(loss))
        for _ in range(int(rstate.skip_batches)):  # the loop owns the data: skip as told
            next(stream)
            skipped_batches += 1
        recovery.check(rstate)  # raises SpikeRecoveryError if it ever gives up
    val_keys = jax.random.split(jax.random.key(12345), lm.VAL_BATCHES)
    params, opt_state = state
    val = np.mean([float(loss_fn(params, lm.sample_batch(val_data, k))) for k in val_keys])
    skips = jaxstab.telemetry(opt_state).get("skip_anomalies/skipped_total", 0)
    skips += int(rstate.skipped_total) if recover else 0
    return {
        "val_loss": float(val),
        "loss": np.asarray(losses),
        "rollbacks": int(rstate.rollbacks_total),
        "steps_lost": int(rstate.steps_lost_total),
        "skipped_batches": skipped_batches,
        "skipped_steps": int(skips),
    }


COLUMNS = [
    ("method", "method", "{}"),
    ("val_loss", "final val loss", "{:.4f}"),
    ("vs_clean", "vs clean", "{:+.2f}%"),
    ("per_seed", "per seed", "{}"),
    ("rollbacks", "rollbacks", "{:g}"),
    ("steps_lost", "steps redone", "{:g}"),
    ("skipped_batches", "batches skipped", "{:g}"),
    ("skipped_steps", "steps skipped", "{:g}"),
]


def plot(results: dict, burst: range, title: str, path: str) -> str:
    """Training loss per step of each method (first seed), the burst shaded."""
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    for name, runs in results.items():
        loss = runs[0]["loss"]
        ax.plot(common.running_mean(loss, 5), lw=1.0, label=name)
    ax.axvspan(burst.start, burst.stop, color="red", alpha=0.1, label="corrupted batches")
    ax.set(yscale="log", xlabel="step (calls of the training step)", ylabel="training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.set_title(title, fontsize=10)
    return common.save_figure(fig, path)


def run(
    steps: int = 600,
    seed: int = 0,
    out_dir: str = "demo_out",
    names: Sequence[str] | None = None,
    progress: bool = True,
    *,
    seeds: int = 2,
    burst_length: int = 40,
) -> dict:
    start = time.perf_counter()
    names = list(names or METHODS)
    if unknown := sorted(set(names) - set(METHODS)):
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    burst = range(steps // 2, steps // 2 + burst_length)
    data = lm.load_corpus()
    results = {
        name: [
            train(name, data, steps=steps, seed=s, burst=burst) for s in range(seed, seed + seeds)
        ]
        for name in tqdm(names, desc="spike_recovery", disable=not progress, leave=False)
    }
    clean = results.get(METHODS[0])
    rows = []
    for name, runs in results.items():
        row = {"method": name}
        for key, _, _ in COLUMNS[1:]:
            if key not in ("vs_clean", "per_seed"):
                row[key] = float(np.mean([r[key] for r in runs]))
        if clean:  # per seed against the clean run of that seed, then averaged
            gaps = [r["val_loss"] / c["val_loss"] - 1 for r, c in zip(runs, clean, strict=True)]
            row["vs_clean"] = 100 * float(np.mean(gaps))
            row["per_seed"] = ", ".join(f"{100 * g:+.2f}%" for g in gaps)
        rows.append(row)
    title = (
        f"Char-level GPT, AdamW lr {RATE:g}, {steps} kept steps: {burst_length} batches of random "
        f"bytes from step {burst.start} ({seeds} seed{'s' * (seeds > 1)})"
    )
    figure = plot(results, burst, title, os.path.join(out_dir, "spike_recovery.png"))
    about = (
        f"spike_recovery(every={EVERY}) at its defaults (keep 2; log-loss skip at 10 spreads, "
        "rollback on 6 of 16 steps above 4 or a CUSUM past 15; skip 20 batches, doubling); "
        "figures averaged over "
        "seeds; steps skipped: by skip_anomalies or by the controller; vs clean: final "
        "validation loss against the same seed's run without the burst; every run ends after "
        "the same number of kept optimizer steps, so rolled-back steps are redone."
    )
    return common.scenario_result(
        "spike_recovery", title, about, rows, COLUMNS, results, figure, start
    )


def demo(steps: int = 400, seed: int = 0, out_dir: str = "demo_out") -> dict:
    """The ``make demo`` scenario: one seed, a shorter run, a burst of 30."""
    return run(steps, seed, out_dir, progress=False, seeds=1, burst_length=30)


def main(argv=None):
    parser = common.arg_parser(__doc__.split("\n")[0], steps=600)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--burst-length", type=int, default=40)
    args = parser.parse_args(argv)
    result = run(args.steps, args.seed, args.out, args.methods, seeds=args.seeds,
                 burst_length=args.burst_length)  # fmt: skip
    print(result["title"], result["about"], result["table"], f"plot: {result['figure']}",
          f"({result['seconds']:.0f} s)", sep="\n")  # fmt: skip


if __name__ == "__main__":
    main()
