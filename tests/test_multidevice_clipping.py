"""Global norms and clipping on 8 simulated CPU devices (run by `make test` in its own process)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxstab

pytestmark = pytest.mark.multidevice


def tree():
    rng = np.random.default_rng(0)
    return {
        "a": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(8, 4)) * 1e19, jnp.float32),
    }


def test_global_norm_in_shard_map_is_global(shard, jit_shard_map):
    grads = tree()
    norm = jit_shard_map(
        lambda g: jaxstab.global_norm(g, axis_name="data"), in_specs=(P("data"),), out_specs=P()
    )
    np.testing.assert_allclose(norm(shard(grads)), jaxstab.global_norm(grads), rtol=1e-6)


def test_clip_in_shard_map_matches_single_device(shard, jit_shard_map):
    grads = tree()
    tx = jaxstab.clip_by_global_norm(1.0, axis_name="data")

    def clip(g):
        out, state = tx.update(g, tx.init(g))
        return out, state.grad_norm

    out, norm = jit_shard_map(clip, in_specs=(P("data"),), out_specs=(P("data"), P()))(
        shard(grads)
    )
    want, _ = jaxstab.clip_by_global_norm(1.0).update(grads, None)
    chex.assert_trees_all_close(out, want, rtol=1e-5)
    np.testing.assert_allclose(norm, jaxstab.global_norm(grads), rtol=1e-6)


def test_sharded_jit_matches_single_device(mesh, shard, run_steps):
    grads = tree()
    tx = optax.chain(jaxstab.clip_by_global_norm(1.0), optax.adam(1e-3))
    params = jax.tree.map(jnp.zeros_like, grads)
    (out,), _ = run_steps(tx, params, [grads], put=shard)
    want, _ = tx.update(grads, tx.init(grads), grads)
    chex.assert_trees_all_close(out, want, rtol=1e-5)
    assert out["a"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
