"""Spike recovery: cost of ``spike_recovery`` on an Adam step and on a full training step.

Two tables, ratios to the plain step in the same process (jitted, state donated):

- **Adam update** on 10M float32 parameters in 20 leaves (the loss a scalar read from the
  gradients before the update, as a forward pass computes it first): the wrapped step on an
  ordinary step (snapshots far apart: what almost every step costs; target 1.05x); a step that
  takes a snapshot every time (``every=1``: a copy of the state); and the same ordinary step
  through
  ``recovery.update`` (old and new state chosen after the step: what ``wrap``'s in-place
  selection saves).
- **Full training step** (forward, backward, Adam) of a 9M-parameter MLP on a batch of 128:
  what a user pays.

No step is skipped or rolled back. Run: ``PYTHONPATH=. python benchmarks/bench_recovery.py
[--quick]``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import optax

from benchmarks import _harness
from jaxstab.recovery import spike_recovery


def _update_step(tx):
    def train_step(state, grads):
        params, opt_state = state
        loss = 1.0 + jnp.abs(next(iter(grads.values()))[0, 0])  # as a forward pass, before
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return train_step


def _mlp_step(tx):
    def loss_fn(params, batch):
        x, y = batch
        for i in range(len(params) - 1):
            x = jax.nn.relu(x @ params[f"w{i}"])
        logits = x @ params[f"w{len(params) - 1}"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return train_step


def steps_for(tx, train_step):
    """``time_steps`` entries: the plain step and the step under the controller's variants."""

    def plain(params, opt_state, batch):
        return train_step((params, opt_state), batch)[0]

    def under(recovery, *, wrapped=True):
        wrapped_step = recovery.wrap(train_step, jit=False)

        def step(params, state, batch):
            opt_state, rstate = state
            if wrapped:
                (params, opt_state), rstate, _ = wrapped_step((params, opt_state), rstate, batch)
            else:
                new, loss = train_step((params, opt_state), batch)
                (params, opt_state), rstate = recovery.update(
                    loss, (params, opt_state), new, rstate
                )
            return params, (opt_state, rstate)

        def init(params):
            opt_state = tx.init(params)
            return opt_state, recovery.init((params, opt_state))

        return _harness.jit_step(step), init

    return {
        "adam": (_harness.jit_step(plain), tx.init),
        "+ spike_recovery (ordinary step)": under(spike_recovery(10**9)),
        "+ spike_recovery (snapshot step)": under(spike_recovery(1)),
        "+ spike_recovery.update (ordinary step)": under(spike_recovery(10**9), wrapped=False),
    }


def run_update(total: int, reps: int) -> str:
    params, grads = _harness.make_tree(20, total)
    tx = optax.adam(1e-3)
    times, compile_s = _harness.time_steps(
        steps_for(tx, _update_step(tx)), params, grads, reps=reps
    )
    return _harness.ratio_table(times, compile_s, "adam")


def run_full(width: int, reps: int) -> str:
    keys = jax.random.split(jax.random.key(0), 6)
    sizes = [256, width, width, width, 10]
    params = {
        f"w{i}": jax.random.normal(keys[i], (a, b)) / jnp.sqrt(a)
        for i, (a, b) in enumerate(itertools.pairwise(sizes))
    }
    batch = (jax.random.normal(keys[4], (128, 256)), jax.random.randint(keys[5], (128,), 0, 10))
    tx = optax.adam(1e-4)
    steps = steps_for(tx, _mlp_step(tx))
    del steps["+ spike_recovery.update (ordinary step)"]
    times, compile_s = _harness.time_steps(steps, params, batch, reps=reps)
    return _harness.ratio_table(times, compile_s, "adam")


def main() -> None:
    total, reps = _harness.size_from_args(__doc__.splitlines()[0])
    print(f"\n### Spike recovery: Adam update, {total / 1e6:g}M float32 params, 20 leaves")
    print()
    print(run_update(total, reps))
    width = 2048 if total >= 10_000_000 else 512
    print(f"\n### Spike recovery: full training step, MLP 256-{width}x3-10, batch 128")
    print()
    print(run_full(width, max(reps // 2, 4)))


if __name__ == "__main__":
    main()
