"""Spike recovery: cost of ``spike_recovery`` around an Adam step, jitted and donated.

Rows, as ratios to the plain Adam step in the same process: the controller on an ordinary step
(snapshots far apart: what almost every step costs; target 1.05x), and on a step that takes a
snapshot every time (``every=1``: the cost of one snapshot step, a copy of params and Adam's
state). The loss is a constant, so no rollback happens.

Run: ``PYTHONPATH=. python benchmarks/bench_recovery.py [--quick]``.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from benchmarks import _harness
from jaxstab.recovery import spike_recovery


def recovery_step(tx, recovery):
    """``time_steps`` entry: an Adam step finished by ``recovery.update``."""

    def step(params, state, grads):
        opt_state, rstate = state
        updates, opt_state = tx.update(grads, opt_state, params)
        params, opt_state, rstate = recovery.update(
            jnp.float32(1.0), params, updates, opt_state, rstate
        )
        return params, (opt_state, rstate)

    def init(params):
        opt_state = tx.init(params)
        return opt_state, recovery.init(params, opt_state)

    return _harness.jit_step(step), init


def run(n_leaves: int, total: int, reps: int) -> str:
    params, grads = _harness.make_tree(n_leaves, total)
    tx = optax.adam(1e-3)
    steps = {
        "adam": (_harness.optimizer_step(tx), tx.init),
        "adam + spike_recovery (ordinary step)": recovery_step(tx, spike_recovery(10**9)),
        "adam + spike_recovery (snapshot step)": recovery_step(tx, spike_recovery(1)),
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
