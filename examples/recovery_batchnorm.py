"""Spike recovery with BatchNorm: the whole training state, a NaN batch and a corrupted burst.

The conv + BatchNorm net of ``conv_batchnorm.py`` trains on the digits with a Flax ``TrainState``
that carries ``batch_stats``. One batch of NaN pixels arrives at step 150 and 40 batches with
random labels from step 250. Plain training ends with NaN weights and statistics: chance-level
accuracy. ``spike_recovery`` wraps the step over the *whole* state, so the NaN step is skipped
with its ``batch_stats`` untouched and the burst is rolled back past; the model ends as the
clean run does, evaluated with its running statistics (offline), as deployed. The step makes its
loss NaN when the gradients are not finite: under ``jit`` the NaN image's loss is finite (XLA's
max turns NaN into 0 in the ReLUs) while its gradients are NaN.

    python examples/recovery_batchnorm.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import jaxstab

try:
    import _common as common
    from conv_batchnorm import ConvNet
except ImportError:  # imported as examples.recovery_batchnorm
    from examples import _common as common
    from examples.conv_batchnorm import ConvNet

METHODS = ("clean", "AdamW", "AdamW + spike_recovery")
BATCH, NAN_AT, BURST = 16, 150, range(250, 290)


class TrainState(train_state.TrainState):
    batch_stats: dict


def train(method: str, data, steps: int, seed: int) -> dict:
    x_train, y_train, x_test, y_test = data
    model = ConvNet()
    variables = model.init(jax.random.key(seed), x_train[:2], train=False)
    state = TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=optax.adamw(3e-3),
        batch_stats=variables["batch_stats"],
    )  # fmt: skip

    def train_step(state, x, y):
        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, x, mutable=["batch_stats"]
            )
            return common.cross_entropy(logits, y), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # A loss can be finite while the gradients are not (XLA's max lets a ReLU turn NaN into
        # 0 on the way forward, not back): judge both, before the update.
        loss = jnp.where(jnp.isfinite(jaxstab.global_norm(grads)), loss, jnp.nan)
        return state.apply_gradients(grads=grads, batch_stats=stats), loss

    recovery = jaxstab.spike_recovery(every=25, warmup_steps=50)
    rstate = recovery.init(state)
    if method.endswith("spike_recovery"):
        step = recovery.wrap(train_step)
    else:
        plain = jax.jit(train_step)
        step = lambda state, rstate, x, y: (*plain(state, x, y)[:1], rstate, None)
    sample = jax.jit(common.batch_sampler(x_train, y_train, BATCH))
    key, index = jax.random.key(seed + 1), 0
    for _ in range(steps):
        x, y = sample(jax.random.fold_in(key, index))
        if method != "clean" and index == NAN_AT:
            x = x.at[0].set(jnp.nan)
        if method != "clean" and index in BURST:
            y = jax.random.randint(jax.random.fold_in(key, 10**6 + index), y.shape, 0, 10)
        state, rstate, _ = step(state, rstate, x, y)
        index += 1 + int(rstate.skip_batches)
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x_test,
                         train=False)  # fmt: skip
    finite = all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(state.batch_stats))
    return {
        "method": method,
        "accuracy": common.accuracy(logits, y_test),
        "stats_finite": "yes" if finite else "no",
        "skipped": int(rstate.skipped_total),
        "rollbacks": int(rstate.rollbacks_total),
    }


COLUMNS = [
    ("method", "method", "{}"),
    ("accuracy", "test accuracy (running statistics)", "{:.1%}"),
    ("stats_finite", "batch_stats finite", "{}"),
    ("skipped", "steps skipped", "{:d}"),
    ("rollbacks", "rollbacks", "{:d}"),
]


def run(steps: int = 600, seed: int = 0) -> dict:
    start = time.perf_counter()
    data = common.load_digits(seed, images=True)
    rows = [train(m, data, steps, seed) for m in METHODS]
    return {"rows": rows, "table": common.table(rows, COLUMNS),
            "seconds": time.perf_counter() - start}  # fmt: skip


def main(argv=None):
    parser = common.arg_parser(__doc__.split("\n")[0], steps=600)
    args = parser.parse_args(argv)
    result = run(args.steps, args.seed)
    print(result["table"], f"({result['seconds']:.0f} s)", sep="\n")


if __name__ == "__main__":
    main()
