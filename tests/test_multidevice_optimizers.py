"""stable_adamw and spam on a sharded 8-device mesh and inside shard_map equal their 1-device run.

Run by `make test` in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxstab
from jaxstab.optimizers import spam, stable_adamw

pytestmark = pytest.mark.multidevice

OPTIMIZERS = {
    "stable_adamw": lambda **kw: stable_adamw(1e-2, b2=0.95, weight_decay=0.1, **kw),
    "spam": lambda **kw: spam(
        1e-2,
        b2=0.9,
        reset_interval=3,
        warmup_steps=2,
        spike_delay=2,
        spike_threshold=20.0,
        count_spikes=True,
        **kw,
    ),
}


def params_and_grad_steps():
    rng = np.random.default_rng(0)
    params = {
        "a": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(32, 4)), jnp.float32),
    }
    scales = [1.0, 1.2, 0.9, 40.0, 1.1, 1.0]  # a spike at step 3
    grads = [
        jax.tree.map(lambda p, s=s, i=i: p * s * (0.5 + 0.1 * i), params)
        for i, s in enumerate(scales)
    ]
    grads[4] = {**grads[4], "b": grads[4]["b"].at[3, 1].multiply(500.0)}  # an entry spike
    return params, grads


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sharded_jit_matches_single_device(mesh, shard, run_steps, name):
    params, grad_steps = params_and_grad_steps()
    sharding = NamedSharding(mesh, P("data"))
    want, want_state = run_steps(OPTIMIZERS[name](), params, grad_steps)
    got, state = run_steps(OPTIMIZERS[name](), params, grad_steps, put=shard)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-8)
    for key, value in jaxstab.telemetry(want_state).items():
        np.testing.assert_allclose(jaxstab.telemetry(state)[key], value, rtol=2e-5, err_msg=key)
    for leaf in jax.tree.leaves(state[0].mu):  # the moments follow the params' sharding
        assert leaf.sharding.is_equivalent_to(sharding, 2)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_shard_map_with_axis_name_matches_single_device(run_steps, run_steps_in_shard_map, name):
    """Each device holds a shard of every tensor; axis_name makes per-tensor RMS, the finiteness
    check and the spike count global."""
    params, grad_steps = params_and_grad_steps()
    want, want_state = run_steps(OPTIMIZERS[name](), params, grad_steps)
    got, tel = run_steps_in_shard_map(OPTIMIZERS[name](axis_name="data"), params, grad_steps)
    for g, w in zip(got, want, strict=True):
        chex.assert_trees_all_close(g, w, rtol=2e-5, atol=1e-8)
    for key, value in jaxstab.telemetry(want_state).items():
        np.testing.assert_allclose(tel[key], value, rtol=2e-5, err_msg=key)
