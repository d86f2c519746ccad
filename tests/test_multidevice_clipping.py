"""Global norms and clipping on 8 simulated CPU devices (run by `make test` in its own process)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jaxstab

pytestmark = pytest.mark.multidevice


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return jax.make_mesh((8,), ("data",))


def tree():
    rng = np.random.default_rng(0)
    return {
        "a": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(8, 4)) * 1e19, jnp.float32),
    }


def test_global_norm_in_shard_map_is_global(mesh):
    grads = tree()
    spec = PartitionSpec("data")

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec,), out_specs=PartitionSpec())
    def norm(g):
        return jaxstab.global_norm(g, axis_name="data")

    sharded = jax.device_put(grads, NamedSharding(mesh, spec))
    np.testing.assert_allclose(norm(sharded), jaxstab.global_norm(grads), rtol=1e-6)


def test_clip_in_shard_map_matches_single_device(mesh):
    grads = tree()
    spec = PartitionSpec("data")
    tx = jaxstab.clip_by_global_norm(1.0, axis_name="data")

    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(spec,), out_specs=(spec, PartitionSpec())
    )
    def clip(g):
        out, state = tx.update(g, tx.init(g))
        return out, state.grad_norm

    out, norm = clip(jax.device_put(grads, NamedSharding(mesh, spec)))
    want, _ = jaxstab.clip_by_global_norm(1.0).update(grads, None)
    chex.assert_trees_all_close(out, want, rtol=1e-5)
    np.testing.assert_allclose(norm, jaxstab.global_norm(grads), rtol=1e-6)


def test_sharded_jit_matches_single_device(mesh):
    grads = tree()
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.device_put(grads, sharding)
    tx = optax.chain(jaxstab.clip_by_global_norm(1.0), optax.adam(1e-3))
    params = jax.device_put(jax.tree.map(jnp.zeros_like, grads), sharding)
    out, _ = jax.jit(tx.update)(sharded, tx.init(params), params)
    want, _ = tx.update(grads, tx.init(grads), grads)
    chex.assert_trees_all_close(out, want, rtol=1e-5)
    assert out["a"].sharding.is_equivalent_to(sharding, 2)
