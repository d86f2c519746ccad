"""Exploding gradients in a tanh RNN, and gradient clipping stopping them (Pascanu et al. 2013).

The addition problem: each step feeds a value in [0, 1] and a marker; two steps are marked, one
in each half of the sequence, and the target is the mean of the two marked values. The
recurrent weights start at spectral radius 3, far above the edge of chaos at 1, so
backpropagation through 50 steps multiplies the gradient by up to ~3 per step: norms of 1e5 and
more, and plain SGD (lr 0.1) jumps to infinity in a few steps. Clipping bounds each step.

    python examples/exploding_rnn.py --steps 3000
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxstab
from jaxstab.adaptive import zscore_clip
from jaxstab.guards import skip_anomalies

try:
    import _common as common
except ImportError:  # imported as examples.exploding_rnn
    from examples import _common as common

SEQ_LEN, HIDDEN, BATCH, LR = 50, 32, 128, 0.1
CONSTANT_LOSS = 1 / 24  # MSE of always predicting 0.5: the variance of the target
INITIAL_LOSS = 1 / 4 + 1 / 24  # MSE of predicting 0 (the zero-initialised head)


def init_params(key, hidden=HIDDEN, radius=3.0):
    k_in, k_rec = jax.random.split(key)
    w = np.asarray(jax.random.normal(k_rec, (hidden, hidden))) / np.sqrt(hidden)
    w *= radius / np.max(np.abs(np.linalg.eigvals(w)))  # spectral radius exactly `radius`
    return {
        "cell": {
            "input": jax.random.normal(k_in, (2, hidden)) / np.sqrt(2),
            "recurrent": jnp.asarray(w, jnp.float32),
            "bias": jnp.zeros(hidden),
        },
        "head": {"kernel": jnp.zeros((hidden, 1)), "bias": jnp.zeros(1)},
    }


def addition_batch(key, batch=BATCH, seq_len=SEQ_LEN):
    """Inputs ``(batch, seq_len, 2)`` (value, marker) and targets ``(batch,)``."""
    k_val, k_first, k_second = jax.random.split(key, 3)
    values = jax.random.uniform(k_val, (batch, seq_len))
    first = jax.random.randint(k_first, (batch,), 0, seq_len // 2)
    second = jax.random.randint(k_second, (batch,), seq_len // 2, seq_len)
    marks = jax.nn.one_hot(first, seq_len) + jax.nn.one_hot(second, seq_len)
    return jnp.stack([values, marks], -1), jnp.sum(values * marks, 1) / 2


def predict(params, inputs):
    cell = params["cell"]

    def step(h, x_t):
        return jnp.tanh(x_t @ cell["input"] + h @ cell["recurrent"] + cell["bias"]), None

    h0 = jnp.zeros((inputs.shape[0], cell["bias"].shape[0]))
    h, _ = jax.lax.scan(step, h0, jnp.swapaxes(inputs, 0, 1))
    return (h @ params["head"]["kernel"] + params["head"]["bias"])[:, 0]


def loss_fn(params, model_state, batch):
    inputs, targets = batch
    return jnp.mean((predict(params, inputs) - targets) ** 2), model_state


def methods():
    sgd = optax.sgd(LR)
    return [
        common.Method("none", sgd),
        common.Method(
            "optax.clip_by_global_norm(1)",
            optax.chain(optax.clip_by_global_norm(1.0), sgd),
            touched=lambda norm: norm > 1.0,
        ),
        common.Method(
            "jaxstab.clip_by_global_norm(1)", optax.chain(jaxstab.clip_by_global_norm(1.0), sgd)
        ),
        common.Method("zscore_clip(max_norm=1)", optax.chain(zscore_clip(max_norm=1.0), sgd)),
        common.Method("skip_anomalies(max_norm=100)", skip_anomalies(sgd, max_norm=100.0)),
    ]


COLUMNS = [
    ("method", "method", "{}"),
    ("nonfinite", "non-finite steps", "{:d}"),
    ("final_loss", "final loss", "{:.4f}"),
    ("max_grad_norm", "max gradient norm", "{:.3g}"),
    ("touched", "steps clipped/skipped", "{:d}"),
]


def run(steps=600, seed=0, out_dir="demo_out", names=None, progress=True) -> dict:
    start = time.perf_counter()
    params = init_params(jax.random.key(seed))
    sample = lambda key: addition_batch(key)
    runs = common.train(
        loss_fn, params, common.select(methods(), names), sample,
        steps=steps, seed=seed + 1, desc="exploding RNN", progress=progress,
    )  # fmt: skip
    rows = []
    for name, r in runs.items():
        rows.append({
            "method": name, "nonfinite": r.nonfinite_steps,
            "final_loss": float(np.mean(r.loss[-max(1, steps // 10) :])),
            "max_grad_norm": common.nanmax(r.grad_norm),
            "touched": int(r.touched.sum()),
        })  # fmt: skip
    title = f"Exploding RNN: tanh RNN, addition problem (T={SEQ_LEN}), SGD lr {LR}, {steps} steps"
    figure = common.plot_runs(runs, title, os.path.join(out_dir, "exploding_rnn.png"))
    about = (
        f"{HIDDEN} tanh units, recurrent weights at spectral radius 3, batch {BATCH}. Final "
        f"loss: mean MSE over the last 10% of steps (fresh sequences each step); always "
        f"predicting 0.5 scores {CONSTANT_LOSS:.4f}, the untrained model {INITIAL_LOSS:.2f}: "
        "in this many steps the clipped runs stay alive but have not learnt the task yet. "
        "optax's and jaxstab's clip_by_global_norm give the same update up to float rounding, "
        "but training at radius 3 is chaotic, so their runs part ways after a few steps: the "
        "gap between them is noise, not quality. zscore_clip needs a history of normal norms "
        "and here every norm is huge, so its max_norm does the work (the same run as the fixed "
        "clip). skip_anomalies skips nearly every step: finite, but it does not train -- "
        "skipping is for rare bad steps (see the gradient-spike scenario)."
    )
    return common.scenario_result("exploding_rnn", title, about, rows, COLUMNS, runs, figure, start)


def main():
    common.scenario_main(run, __doc__, steps=3000)


if __name__ == "__main__":
    main()
