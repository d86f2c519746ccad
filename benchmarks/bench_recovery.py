"""Spike recovery: cost of ``spike_recovery`` around an Adam step, jitted and donated.

Rows, as ratios to the plain Adam step in the same process: the wrapped step on an ordinary
step (snapshots far apart: what almost every step costs; target 1.05x), on a step that takes a
snapshot every time (``every=1``: the cost of one snapshot step, a copy of the state), and the
same ordinary step through ``recovery.update`` (old and new state chosen after the step: what the
in-place selection of ``wrap`` saves). The training state is ``(params, adam_state)`` and the
loss a scalar read from the gradients, so no step is skipped or rolled back.

Run: ``PYTHONPATH=. python benchmarks/bench_recovery.py [--quick]``.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from benchmarks import _harness
from jaxstab.recovery import spike_recovery


def _train_step(tx):
    def train_step(state, grads):
        params, opt_state = state
        loss = 1.0 + jnp.abs(next(iter(grads.values()))[0, 0])  # as a forward pass, before
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return train_step


def recovery_step(tx, recovery, *, wrapped: bool = True):
    """``time_steps`` entry: an Adam step under ``recovery`` (``wrap`` or ``update``)."""
    train_step = _train_step(tx)
    wrapped_step = recovery.wrap(train_step)

    def step(params, state, grads):
        opt_state, rstate = state
        if wrapped:
            (params, opt_state), rstate, _ = wrapped_step((params, opt_state), rstate, grads)
        else:
            new, loss = train_step((params, opt_state), grads)
            (params, opt_state), rstate = recovery.update(loss, (params, opt_state), new, rstate)
        return params, (opt_state, rstate)

    def init(params):
        opt_state = tx.init(params)
        return opt_state, recovery.init((params, opt_state))

    return _harness.jit_step(step), init


def run(n_leaves: int, total: int, reps: int) -> str:
    params, grads = _harness.make_tree(n_leaves, total)
    tx = optax.adam(1e-3)
    steps = {
        "adam": (_harness.optimizer_step(tx), tx.init),
        "adam + spike_recovery (ordinary step)": recovery_step(tx, spike_recovery(10**9)),
        "adam + spike_recovery (snapshot step)": recovery_step(tx, spike_recovery(1)),
        "adam + spike_recovery.update (ordinary step)": recovery_step(
            tx, spike_recovery(10**9), wrapped=False
        ),
    }
    times, compile_s = _harness.time_steps(steps, params, grads, reps=reps)
    return _harness.ratio_table(times, compile_s, "adam")


def main() -> None:
    total, reps = _harness.size_from_args(__doc__.splitlines()[0])
    n_leaves = 20
    print(f"\n### Spike recovery, {total / 1e6:g}M float32 params, {n_leaves} leaves")
    print()
    print(run(n_leaves, total, reps))


if __name__ == "__main__":
    main()
