"""Data-parallel training of the digits conv net with jaxstab BatchNorm and clipping.

The global batch is sharded over all local devices with a ``NamedSharding``; parameters, batch
statistics and optimizer state are replicated. Under ``jit`` XLA's SPMD partitioner inserts every
collective itself: batch statistics and the gradient norm are global without any ``axis_name``
(that keyword is for ``shard_map``/``pmap``, where code sees one device's shard). The loss curve
is the same on 1 device and on 8, for the same global batch.

Try it on 8 simulated CPU devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py

Multi-host: call ``jax.distributed.initialize()`` first on every host; ``jax.devices()`` then
spans all hosts, and each host feeds its own slice of the global batch with
``jax.make_array_from_process_local_data(sharding, local_batch)``.
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import cross_entropy, load_digits
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxstab


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        for features, stride in ((16, 1), (32, 2)):
            x = nn.Conv(features, (3, 3), strides=stride)(x)
            x = jaxstab.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def run(steps: int = 100, seed: int = 0, n_devices: int | None = None, batch_size: int = 64):
    """Trains for ``steps``; returns the per-step losses, clip telemetry and test accuracy."""
    devices = jax.devices()[: n_devices or jax.device_count()]
    if batch_size % len(devices):
        raise ValueError(f"batch_size={batch_size} must be divisible by {len(devices)} devices")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    x_train, y_train, x_test, y_test = load_digits(seed, images=True)
    model = ConvNet()
    variables = model.init(jax.random.key(seed), x_train[:2], train=False)
    tx = optax.chain(jaxstab.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.9))
    state = jax.device_put((variables, tx.init(variables["params"])), replicated)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, y):
        variables, opt_state = state

        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return cross_entropy(logits, y), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        new_state = ({"params": params, "batch_stats": stats}, opt_state)
        return new_state, loss, jaxstab.telemetry(opt_state)

    order = np.random.default_rng(seed).integers(0, len(x_train), (steps, batch_size))
    losses, grad_norms = [], []
    for idx in order:
        x = jax.device_put(x_train[idx], batch_sharding)
        y = jax.device_put(y_train[idx], batch_sharding)
        state, loss, tel = train_step(state, x, y)
        losses.append(float(loss))
        grad_norms.append(float(tel["0/clip_by_global_norm/grad_norm"]))

    logits = model.apply(state[0], x_test, train=False)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    return {"devices": len(devices), "losses": losses, "grad_norms": grad_norms,
            "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    many = run(args.steps, args.seed, None, args.batch_size)
    one = run(args.steps, args.seed, 1, args.batch_size)
    gap = max(abs(a - b) for a, b in zip(many["losses"], one["losses"], strict=True))
    print(f"{many['devices']} devices: final loss {many['losses'][-1]:.4f}, "
          f"test accuracy {many['accuracy']:.3f}, max grad norm {max(many['grad_norms']):.2f}")
    print(f"1 device:  final loss {one['losses'][-1]:.4f}, test accuracy {one['accuracy']:.3f}")
    print(f"largest per-step loss difference between the two runs: {gap:.2e}")


if __name__ == "__main__":
    main()
