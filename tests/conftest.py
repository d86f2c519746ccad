"""Shared fixtures: an 8-device mesh and jitted, sharded runs on it; float64 across jax versions;
hypothesis's profile (derandomized unless ``HYPOTHESIS_PROFILE=explore``).

`make test` runs the tests marked ``multidevice`` in their own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; without it they skip.
"""

import os

import jax
import jax.numpy as jnp
import pytest
from hypothesis import settings
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxstab

# The same hypothesis examples on every run (a clean clone has no example database): a CI
# failure reproduces and a commit that passed keeps passing. HYPOTHESIS_PROFILE=explore draws
# fresh examples each run, to hunt for new edge cases.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

N_DEVICES = 8
AXIS = "data"
SPLIT = P(AXIS)  # the leading axis split across the devices


def pytest_runtest_setup(item):
    if item.get_closest_marker("multidevice") and jax.device_count() < N_DEVICES:
        pytest.skip(f"needs XLA_FLAGS=--xla_force_host_platform_device_count={N_DEVICES}")


@pytest.fixture(scope="session")
def mesh():
    """A one-axis mesh over the 8 devices, axis name ``"data"``."""
    return jax.make_mesh((N_DEVICES,), (AXIS,))


@pytest.fixture(scope="session")
def shard(mesh):
    """``shard(tree, spec=P("data"))``: the tree on the mesh, each leaf split by ``spec``."""

    def put(tree, spec=SPLIT):
        return jax.device_put(tree, NamedSharding(mesh, spec))

    return put


@pytest.fixture(scope="session")
def jit_shard_map(mesh):
    """``jit_shard_map(f, in_specs, out_specs, **kwargs)``: ``f`` under jit and shard_map."""

    def wrap(f, in_specs, out_specs, **kwargs):
        return jax.jit(
            jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kwargs)
        )

    return wrap


@pytest.fixture(scope="session")
def run_steps():
    """``run_steps(tx, params, grad_steps, put=identity)``: ``(updates per step, last state)``.

    One jitted ``tx.update`` over the steps; ``put`` places params and gradients (e.g. ``shard``).
    """

    def run(tx, params, grad_steps, put=lambda tree: tree):
        state = tx.init(put(params))
        update = jax.jit(tx.update)
        outs = []
        for grads in grad_steps:
            out, state = update(put(grads), state, put(params))
            outs.append(out)
        return outs, state

    return run


@pytest.fixture(scope="session")
def run_steps_in_shard_map(shard, jit_shard_map):
    """``run(tx, params, grad_steps) -> (updates per step, telemetry of the last state)``.

    All steps inside one jitted ``shard_map``, every leaf split along its first axis across the
    devices (``tx`` built with ``axis_name="data"``); the updates come back whole.
    """

    def run(tx, params, grad_steps):
        def steps(params, grads_stacked):
            state = tx.init(params)
            outs = []
            for i in range(len(grad_steps)):
                grads = jax.tree.map(lambda x, i=i: x[:, i], grads_stacked)
                out, state = tx.update(grads, state, params)
                outs.append(out)
            return jax.tree.map(lambda *x: jnp.stack(x, axis=1), *outs), jaxstab.telemetry(state)

        stacked = jax.tree.map(lambda *x: jnp.stack(x, axis=1), *grad_steps)
        mapped = jit_shard_map(steps, (SPLIT, SPLIT), (SPLIT, P()), check_vma=False)
        got, tel = mapped(shard(params), shard(stacked))
        return [jax.tree.map(lambda x, i=i: x[:, i], got) for i in range(len(grad_steps))], tel

    return run


@pytest.fixture(scope="session")
def enable_x64():
    """``with enable_x64(True):`` float64 on, from the jax floor up (``jax.enable_x64``: 0.8+)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64
    from jax.experimental import enable_x64

    return enable_x64
