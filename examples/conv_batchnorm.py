"""Batch norm in a small conv net: online vs offline statistics, and small batches.

The classic conv + batch-norm model on scikit-learn's 8x8 digits, with ``jaxstab.linen.BatchNorm``
(a drop-in for ``flax.linen.BatchNorm``). Each model is evaluated two ways: online, normalizing
each test batch with its own statistics (as in training), and offline, with the running
statistics (as deployed). With a batch of 4, batch statistics are noisy and the running averages
no longer match what the network saw in training, so offline accuracy suffers. Batch Renorm
(Ioffe 2017) corrects the batch statistics towards the running ones during training; ghost
batches (Hoffer et al. 2017) give a batch of 64 the statistics of groups of 4.

    python examples/conv_batchnorm.py --steps 2000
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import optax

from jaxstab.linen import BatchNorm

try:
    import _common as common
except ImportError:  # imported as examples.conv_batchnorm
    from examples import _common as common

LR, MOMENTUM = 0.02, 0.9


class ConvNet(nn.Module):
    renorm: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        bn = lambda: BatchNorm(
            use_running_average=not train,
            momentum=0.95,
            renorm=self.renorm,
            virtual_batch_size=self.virtual_batch_size,
        )
        x = nn.relu(bn()(nn.Conv(16, (3, 3), use_bias=False)(x)))
        x = nn.relu(bn()(nn.Conv(32, (3, 3), strides=2, use_bias=False)(x)))
        x = nn.relu(bn()(nn.Conv(64, (3, 3), strides=2, use_bias=False)(x)))
        return nn.Dense(10)(x.mean((1, 2)))


class Config(NamedTuple):
    name: str
    batch: int
    renorm: bool = False
    virtual_batch_size: int | None = None


CONFIGS = [
    Config("BatchNorm, batch 64", 64),
    Config("BatchNorm, batch 4", 4),
    Config("Batch Renorm, batch 4", 4, renorm=True),
    Config("ghost batches of 4, batch 64", 64, virtual_batch_size=4),
]

COLUMNS = [
    ("method", "model", "{}"),
    ("online", "online accuracy (batch stats)", "{:.1%}"),
    ("offline", "offline accuracy (running stats)", "{:.1%}"),
    ("nonfinite", "non-finite steps", "{:d}"),
]


def evaluate(model, variables, x, y, batch):
    """Accuracy online (each test batch of ``batch`` normalized by its own statistics) and
    offline (running statistics)."""
    n = x.shape[0] // batch * batch

    @jax.jit
    def logits(variables):
        online = lambda xb: model.apply(variables, xb, train=True, mutable=["batch_stats"])[0]
        xb = x[:n].reshape(-1, batch, *x.shape[1:])
        return jax.lax.map(online, xb).reshape(n, -1), model.apply(variables, x, train=False)

    online, offline = logits(variables)
    return common.accuracy(online, y[:n]), common.accuracy(offline, y)


def run(steps=400, seed=0, out_dir="demo_out", names=None, progress=True) -> dict:
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = common.load_digits(seed, images=True)
    # The variants share their variables (and so their initial values): initialize once.
    variables = jax.jit(ConvNet().init)(jax.random.key(seed), x_train[:2])
    params = variables.pop("params")
    runs, rows = {}, []
    for cfg in common.select(CONFIGS, names):
        model = ConvNet(cfg.renorm, cfg.virtual_batch_size)

        def loss_fn(params, model_state, batch, model=model):
            x, y = batch
            variables = {"params": params, **model_state}
            logits, new_state = model.apply(variables, x, mutable=["batch_stats"])
            return common.cross_entropy(logits, y), new_state

        method = common.Method(cfg.name, optax.sgd(LR, momentum=MOMENTUM))
        sample = common.batch_sampler(x_train, y_train, cfg.batch)
        r = common.train(
            loss_fn, params, [method], sample, model_state=variables, steps=steps,
            seed=seed + 1, desc=f"conv net: {cfg.name}", progress=progress,
        )[cfg.name]  # fmt: skip
        runs[cfg.name] = r
        trained = {"params": r.params, **r.model_state}
        online, offline = evaluate(model, trained, x_test, y_test, cfg.batch)
        rows.append({"method": cfg.name, "online": online, "offline": offline,
                     "nonfinite": r.nonfinite_steps})  # fmt: skip
    title = f"Conv net with batch norm on digits, SGD+momentum lr {LR}, {steps} steps"
    figure = common.plot_runs(runs, title, os.path.join(out_dir, "conv_batchnorm.png"))
    about = (
        f"Test accuracy on {len(y_test)} held-out digits (chance: 10%). Online: test batches of "
        "the training batch size, normalized with their own statistics; offline: the running "
        "statistics. Ghost batches use groups of 4 online too."
    )
    return common.scenario_result(
        "conv_batchnorm", title, about, rows, COLUMNS, runs, figure, start
    )


def main():
    common.scenario_main(run, __doc__, steps=2000)


if __name__ == "__main__":
    main()
