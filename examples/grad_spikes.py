"""Gradient spikes: a few bad batches (gradients x1000) against adaptive clipping and skipping.

A small MLP learns scikit-learn's digits with SGD + momentum. At three fixed steps the gradient
is multiplied by 1000, as a corrupt batch or a loss spike would do. Unprotected, momentum carries
the spike for dozens of steps and wrecks the weights. Fixed clipping needs a threshold chosen in
advance and touches healthy steps too; the adaptive methods learn the normal gradient norm and
touch (almost) only the spikes.

    python examples/grad_spikes.py --steps 2000
"""

from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import numpy as np
import optax

import jaxstab
from jaxstab.adaptive import adagc, quantile_clip, zscore_clip
from jaxstab.guards import skip_anomalies

try:
    import _common as common
except ImportError:  # imported as examples.grad_spikes
    from examples import _common as common

BATCH, LR, MOMENTUM, SPIKE = 32, 0.05, 0.9, 1e3


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (128, 128):
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10, name="head")(x)


def spike_steps(steps: int) -> list[int]:
    """Three bad batches, a third, half and two thirds of the way through."""
    return [steps // 3, steps // 2, 2 * steps // 3]


def methods():
    sgd = optax.sgd(LR, momentum=MOMENTUM)
    chain = lambda clip: optax.chain(clip, sgd)
    return [
        common.Method("clean (no spikes)", sgd),
        common.Method("none", sgd),
        common.Method("clip_by_global_norm(1)", chain(jaxstab.clip_by_global_norm(1.0))),
        common.Method("zscore_clip", chain(zscore_clip())),
        common.Method("quantile_clip(0.9)", chain(quantile_clip(0.9))),
        common.Method("adagc", chain(adagc())),
        common.Method("skip_anomalies", skip_anomalies(sgd)),
    ]


COLUMNS = [
    ("method", "method", "{}"),
    ("accuracy", "test accuracy", "{:.1%}"),
    ("touched", "steps touched", "{:d}"),
    ("touched_spikes", "spikes caught", "{}"),
    ("max_loss", "max loss", "{:.3g}"),
    ("nonfinite", "non-finite steps", "{:d}"),
]


def run(steps=450, seed=0, out_dir="demo_out", names=None, progress=True) -> dict:
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = common.load_digits(seed)
    model = MLP()
    params = model.init(jax.random.key(seed), x_train[:1])["params"]

    def loss_fn(params, model_state, batch):
        x, y = batch
        return common.cross_entropy(model.apply({"params": params}, x), y), model_state

    spikes = spike_steps(steps)
    bad_batches = np.ones(steps, np.float32)
    bad_batches[spikes] = SPIKE
    clean = np.ones(steps, np.float32)
    grad_scale = lambda name: clean if name.startswith("clean") else bad_batches
    runs = common.train(
        loss_fn, params, common.select(methods(), names),
        common.batch_sampler(x_train, y_train, BATCH), steps=steps, seed=seed + 1,
        grad_scale=grad_scale, desc="gradient spikes", progress=progress,
    )  # fmt: skip
    rows = []
    for name, r in runs.items():
        logits = model.apply({"params": r.params}, x_test)
        caught = "-" if name.startswith("clean") else f"{int(r.touched[spikes].sum())}/3"
        rows.append({
            "method": name, "accuracy": common.accuracy(logits, y_test),
            "touched": int(r.touched.sum()), "touched_spikes": caught,
            "max_loss": common.nanmax(r.loss), "nonfinite": r.nonfinite_steps,
        })  # fmt: skip
    title = f"Gradient spikes: MLP on digits, SGD+momentum, x{SPIKE:g} at steps {spikes}"
    figure = common.plot_runs(runs, title, os.path.join(out_dir, "grad_spikes.png"))
    about = (
        f"{steps} steps of batch {BATCH}, lr {LR}, momentum {MOMENTUM}. Test accuracy on "
        f"{len(y_test)} held-out digits (chance: 10%). Steps touched: clipped or skipped."
    )
    return common.scenario_result("grad_spikes", title, about, rows, COLUMNS, runs, figure, start)


def main():
    common.scenario_main(run, __doc__, steps=2000)


if __name__ == "__main__":
    main()
