"""A deep residual MLP without normalization: exploding at initialization, and four answers.

16 residual blocks (Dense-ReLU-Dense, width 128, He init) and no normalization: each block adds
a branch as large as its input, so activations double in variance 16 times over and the first
gradients are enormous. SGD + momentum (lr 0.1) on scikit-learn's digits then diverges. Fixed
clipping, adaptive gradient clipping (AGC, the classifier excluded as in the paper) and batch
norm in every block each keep it trainable. ``jaxstab.layer_norms`` shows which layers explode.

    python examples/deep_mlp.py --steps 1500
"""

from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import numpy as np
import optax

import jaxstab
from jaxstab.linen import BatchNorm

try:
    import _common as common
except ImportError:  # imported as examples.deep_mlp
    from examples import _common as common

BLOCKS, WIDTH, BATCH, LR, MOMENTUM = 16, 128, 64, 0.1, 0.9
he = nn.initializers.he_normal()


class Block(nn.Module):
    norm: bool

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda h: BatchNorm(use_running_average=not train)(h) if self.norm else h
        h = nn.relu(bn(nn.Dense(x.shape[-1], kernel_init=he)(x)))
        return x + bn(nn.Dense(x.shape[-1], kernel_init=he)(h))


class ResMLP(nn.Module):
    norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(WIDTH, kernel_init=he, name="stem")(x)
        for _ in range(BLOCKS):
            x = Block(self.norm)(x, train)
        return nn.Dense(10, name="head")(x)


def methods():
    sgd = optax.sgd(LR, momentum=MOMENTUM)
    agc = jaxstab.adaptive_grad_clip(0.01, exclude="head")
    return [
        common.Method("none", sgd),
        common.Method("clip_by_global_norm(1)", optax.chain(jaxstab.clip_by_global_norm(1.0), sgd)),
        common.Method("adaptive_grad_clip(0.01)", optax.chain(agc, sgd)),
        common.Method("BatchNorm in each block", sgd),  # the model changes, not the optimizer
    ]


COLUMNS = [
    ("method", "method", "{}"),
    ("accuracy", "test accuracy", "{:.1%}"),
    ("grad_norm0", "gradient norm at step 0", "{:.3g}"),
    ("max_grad_norm", "max gradient norm", "{:.3g}"),
    ("nonfinite", "non-finite steps", "{:d}"),
]


def run(steps=300, seed=0, out_dir="demo_out", names=None, progress=True) -> dict:
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = common.load_digits(seed)
    sample = common.batch_sampler(x_train, y_train, BATCH)
    chosen = common.select(methods(), names)
    runs, predict = {}, {}
    for norm in (False, True):
        group = [m for m in chosen if (m.name.startswith("BatchNorm")) == norm]
        if not group:
            continue
        model = ResMLP(norm=norm)
        predict[norm] = jax.jit(lambda variables, x, model=model: model.apply(variables, x, False))
        variables = jax.jit(model.init)(jax.random.key(seed), x_train[:2])
        params = variables.pop("params")
        model_state = variables  # {"batch_stats": ...} with batch norm, else {}

        def loss_fn(params, model_state, batch, model=model):
            x, y = batch
            variables = {"params": params, **model_state}
            if not model_state:
                return common.cross_entropy(model.apply(variables, x), y), model_state
            logits, new_state = model.apply(variables, x, mutable=list(model_state))
            return common.cross_entropy(logits, y), new_state

        # log_layers: jaxstab.layer_norms(grads) at every step, inside the compiled loop
        runs |= common.train(
            loss_fn, params, group, sample, model_state=model_state, steps=steps,
            seed=seed + 1, log_layers=True, desc="deep residual MLP" + " (BN)" * norm,
            progress=progress,
        )  # fmt: skip
    rows = []
    for m in chosen:
        r, norm = runs[m.name], m.name.startswith("BatchNorm")
        variables = {"params": r.params, **r.model_state}
        logits = predict[norm](variables, x_test)
        rows.append({
            "method": m.name, "accuracy": common.accuracy(logits, y_test),
            "grad_norm0": float(r.grad_norm[0]), "max_grad_norm": common.nanmax(r.grad_norm),
            "nonfinite": r.nonfinite_steps,
        })  # fmt: skip

    def layer_bars(ax):  # which layer explodes: per-layer gradient norms at step 0
        layers = ["stem", *(f"Block_{i}/Dense_{j}" for i in range(BLOCKS) for j in (0, 1)), "head"]
        shown = {"no normalization": "none", "with BatchNorm": "BatchNorm in each block"}
        shown = {label: runs[name].layers for label, name in shown.items() if name in runs}
        for k, (label, norms) in enumerate(shown.items()):
            x = np.arange(len(layers)) + (0.4 * k - 0.2) * (len(shown) - 1)
            ax.bar(x, [norms[name][0] for name in layers], width=0.4, label=label)
        ax.set(yscale="log", xlabel=f"layer (0 = stem, 1-{2 * BLOCKS} blocks, last = head)")
        ax.set(ylabel="gradient norm at step 0", title="jaxstab.layer_norms at step 0")
        ax.legend(fontsize=8)

    title = f"Deep residual MLP ({BLOCKS} blocks, no normalization), SGD+momentum lr {LR}"
    path = os.path.join(out_dir, "deep_mlp.png")
    figure = common.plot_runs(runs, title, path, extra=layer_bars)
    about = (
        f"{steps} steps of batch {BATCH} on digits; test accuracy on {len(y_test)} held-out "
        "digits (chance: 10%), the BatchNorm model evaluated with its running statistics."
    )
    return common.scenario_result("deep_mlp", title, about, rows, COLUMNS, runs, figure, start)


def main():
    common.scenario_main(run, __doc__, steps=1500)


if __name__ == "__main__":
    main()
