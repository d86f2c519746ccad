"""Running an optimizer over a list of gradient trees, shared by the optimizers' tests."""

import optax


def run(tx, params, steps, update=None):
    """Applies ``tx`` over ``steps``: (updates per step, final params, final state)."""
    update = update or tx.update
    state, outs = tx.init(params), []
    for g in steps:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, params, state
