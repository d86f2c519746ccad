"""Full training step of the example transformer LM: what each cure costs a user, end to end.

The jitted training step (forward, backward, update, apply; params and optimizer state donated)
of the char-level GPT of ``examples/transformer_lm.py``, at the example's size (2 layers, width
64, 4 heads) and a larger one (4 layers, width 192, 12 heads: the example's head width of 16),
both at the example's context (64) and batch (16), with each cure against plain AdamW
(``optax.adamw``, b2 0.95, weight decay 0.1, as in the example; constant learning rate):

- ``clip_by_global_norm(1)``, ``zscore_clip()`` or ``adagc()`` chained before AdamW;
  ``skip_anomalies(AdamW)``; ``stable_adamw`` and ``spam`` (the example's settings);
- ``adam_atan2`` (the example's settings);
- ``qk_clip(100)`` after AdamW, the model recording its attention logits (jaxstab's
  ``attention_fn``, ``mutable=["attention_logits"]``), against the model with Flax's own
  attention, which every other row uses too: what switching qk_clip on costs;
- the example's loss and model options: the z-loss (1e-4) added to the loss; attention logits
  soft-capped at 50 (through jaxstab's ``attention_fn``) and output logits at 30; and the
  combination the learning-rate sweep recommends, ``qk_clip(30)`` with the z-loss;
- ``spike_recovery(every=100)`` around the AdamW step (``recovery.wrap``: jitted, donated), on
  ordinary steps (a pair whose step took a snapshot would be left out; the default run never
  reaches step 100, where the first one is taken);
- A/A: AdamW against a second, separately compiled AdamW -- the noise band.

Tokens are fixed random bytes of the example's batch shape, made once with NumPy, so no data
pipeline is timed.

**Why paired timings.** On a CPU the forward and backward matrix multiplies dominate a step and
the update's cost hides behind them: a cure costs a few percent of the step, less than a shared,
noisy machine drifts over a run (on a GPU the memory-bound update is a larger share of the step:
run it there too). So each round takes, for every cure in a new random order, one AdamW step and
one step of the cure back to back (which first is random too), each waited for
(``jax.block_until_ready``); the two steps of a pair run milliseconds apart under the same load,
and the table gives the median of the per-pair ratios ``cure / AdamW`` with their interquartile
range. The A/A row's range is the noise band: a cure whose median lies inside it costs nothing
this benchmark can see. ``first call s``: compile plus one step.

Run: ``PYTHONPATH=. python benchmarks/bench_train_step.py [--quick] [--rounds N]
[--sizes example large]``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
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

import jaxstab
from benchmarks import _harness
from jaxstab.attention_flax import COLLECTION, max_logits


class Size(NamedTuple):
    layers: int
    width: int
    heads: int


SIZES = {"example": Size(lm.LAYERS, lm.WIDTH, lm.HEADS), "large": Size(4, 192, 12)}
ROUNDS = {"example": 80, "large": 30}  # pairs per cure; the whole run about 4 minutes on 2 CPUs
RATE, BATCHES, WARMUP = 3e-3, 4, 3
AA, RECOVERY = "AdamW (A/A: a second compile)", "spike_recovery(every=100)(AdamW)"
# Rows taken from the example's methods; those in RECORDING train the logit-recording model.
CURES = [
    "AdamW + clip_by_global_norm(1)",
    "AdamW + zscore_clip",
    "AdamW + adagc",
    "skip_anomalies(AdamW)",
    "stable_adamw",
    "spam",
    "adam_atan2",
    "AdamW + qk_clip(100)",
    "AdamW + z-loss(1e-4)",
    "AdamW, soft-capped logits (50 / 30)",
    "AdamW + qk_clip(30) + z-loss(1e-4)",
]
RECORDING = {"AdamW + qk_clip(100)", "AdamW + qk_clip(30) + z-loss(1e-4)"}


def example_model(size: Size, *, record: bool, method: lm.Method = lm.METHODS["AdamW"]):
    """The example's ``GPT`` at ``size`` as ``method`` changes it; with Flax's own attention
    unless ``record`` or the method soft-caps the attention logits (jaxstab's attention)."""
    if method.attention_softcap is not None or record:
        model = method.model()  # jaxstab's attention, soft-capped as the method says
        return model.clone(layers=size.layers, width=size.width, heads=size.heads)
    return lm.GPT(layers=size.layers, width=size.width, heads=size.heads,
                  attention_fn=nn.dot_product_attention)  # fmt: skip


def train_step(model: nn.Module, tx: optax.GradientTransformation, record: bool,
               method: lm.Method = lm.METHODS["AdamW"]) -> Callable:  # fmt: skip
    """``step((params, opt_state), tokens) -> ((params, opt_state), loss)``, as the example's
    (``method.loss``: cross-entropy of the soft-capped logits, plus the z-loss)."""
    tx = optax.with_extra_args_support(tx)

    def loss_fn(params, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if not record:
            return method.loss(model.apply({"params": params}, inputs), targets), {}
        logits, sown = model.apply({"params": params}, inputs, mutable=[COLLECTION])
        return method.loss(logits, targets), {"max_logits": max_logits(sown)}

    def step(state, tokens):
        params, opt_state = state
        (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


class Live:
    """A compiled training step and its own state: ``step(tokens)`` runs one, waits, gives seconds.

    ``ordinary(state)`` says whether the last step was an ordinary one (not a snapshot).
    """

    def __init__(self, call: Callable, state: Any, ordinary: Callable[[Any], bool]):
        self.call, self.state, self.ordinary = call, state, ordinary

    def step(self, tokens) -> float:
        start = time.perf_counter()
        self.state = self.call(self.state, tokens)
        jax.block_until_ready(self.state)
        return time.perf_counter() - start


def init_params(size: Size):
    """The example model's parameters at ``size`` (the same with either attention)."""
    init = jax.jit(example_model(size, record=False).init)
    return init(jax.random.key(0), jnp.zeros((1, lm.CONTEXT), jnp.int32))["params"]


def build(size: Size, params, tx, batches, *, record=False, recovery=None,
          method: lm.Method = lm.METHODS["AdamW"]) -> tuple[Live, float]:  # fmt: skip
    """A warmed-up ``Live`` step of the model at ``size`` from a copy of ``params`` under ``tx``,
    and its first call's seconds.

    With ``recovery`` the step runs under ``recovery.wrap`` (jitted, state donated), else it is
    jitted with params and optimizer state donated, as ``_harness`` jits its steps.
    """
    params = jax.tree.map(jnp.copy, params)
    state = (params, tx.init(params))
    step = train_step(example_model(size, record=record, method=method), tx, record, method)
    if recovery is None:
        jitted = _harness.jit_step(lambda p, s, tokens: step((p, s), tokens)[0])
        live = Live(lambda st, tokens: jitted(*st, tokens), state, lambda st: True)
    else:
        wrapped = recovery.wrap(step)
        live = Live(
            lambda st, tokens: wrapped(*st, tokens)[:2],
            (state, recovery.init(state)),
            lambda st: not bool(st[1].snapshot_taken),
        )
    first_call = live.step(batches[0])
    for i in range(WARMUP):
        live.step(batches[i % len(batches)])
    return live, first_call


def variants(size: Size, batches) -> tuple[Live, dict[str, tuple[Live, float]], float]:
    """The AdamW step, ``{row: (Live, first call s)}`` of the rows, and AdamW's first call s."""
    adamw, params = lm.METHODS["AdamW"].optimizer, init_params(size)
    base, base_first = build(size, params, adamw(RATE), batches)
    rows = {AA: build(size, params, adamw(RATE), batches)}
    for name in CURES:
        method = lm.METHODS[name]
        rows[name] = build(
            size, params, method.optimizer(RATE), batches, record=name in RECORDING, method=method
        )
    recovery = jaxstab.spike_recovery(every=100)
    rows[RECOVERY] = build(size, params, adamw(RATE), batches, recovery=recovery)
    return base, rows, base_first


def paired(base: Live, rows: dict[str, Live], batches, rounds: int, seed: int = 0):
    """``{row: [(AdamW s, cure s), ...]}``: one pair per row and round, rows in random order."""
    rng = random.Random(seed)
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    order = list(rows)
    for r in range(rounds):
        tokens = batches[r % len(batches)]
        rng.shuffle(order)
        for name in order:
            cure = rows[name]
            if rng.random() < 0.5:
                pair = base.step(tokens), cure.step(tokens)
            else:
                cure_s = cure.step(tokens)
                pair = base.step(tokens), cure_s
            if cure.ordinary(cure.state):
                pairs[name].append(pair)
    return pairs


def table_row(name: str, pairs: list[tuple[float, float]], first_call: float) -> list[str]:
    ratios = [cure / base for base, cure in pairs]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return [
        name,
        f"{statistics.median(b for b, _ in pairs) * 1e3:.1f}",
        f"{statistics.median(c for _, c in pairs) * 1e3:.1f}",
        f"{statistics.median(ratios):.3f}x",
        f"{q1:.3f}-{q3:.3f}",
        str(len(pairs)),
        f"{first_call:.1f}",
    ]


def run(size: Size, rounds: int) -> str:
    """One size's markdown table, under a header naming the size, parameters and backend."""
    shape = (BATCHES, lm.BATCH, lm.CONTEXT + 1)
    batches = [jnp.asarray(b) for b in np.random.default_rng(0).integers(0, 256, shape, np.uint8)]
    base, rows, base_first = variants(size, batches)
    pairs = paired(base, {name: live for name, (live, _) in rows.items()}, batches, rounds)
    n_params = sum(x.size for x in jax.tree.leaves(base.state[0]))
    header = ["cure", "AdamW ms", "cure ms", "paired ratio (median)", "ratio IQR", "pairs",
              "first call s"]  # fmt: skip
    table = [table_row(name, pairs[name], first) for name, (_, first) in rows.items()]
    return (
        f"\n### Transformer LM training step, {size.layers} layers, width {size.width}, "
        f"{size.heads} heads, context {lm.CONTEXT}, batch {lm.BATCH}: "
        f"{n_params / 1e6:.2f}M params, {jax.devices()[0].device_kind}\n\n"
        f"AdamW's first call: {base_first:.1f} s; {rounds} rounds of pairs.\n\n"
        + _harness.markdown_table(header, table)
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="example size, 5 rounds (smoke)")
    parser.add_argument("--rounds", type=int, help="pairs per cure (default: 80, large 30)")
    parser.add_argument("--sizes", nargs="+", choices=SIZES, help="default: all (quick: example)")
    args = parser.parse_args(argv)
    for name in args.sizes or (["example"] if args.quick else list(SIZES)):
        rounds = args.rounds or (5 if args.quick else ROUNDS[name])
        print(run(SIZES[name], rounds), flush=True)


if __name__ == "__main__":
    main()
