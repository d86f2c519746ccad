"""Every transform on a sharded 8-device mesh and inside shard_map equals its 1-device result.

Run by `make test` in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import re

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

TRANSFORMS = {
    "clip_by_global_norm": lambda **kw: jaxstab.clip_by_global_norm(1.0, **kw),
    "zscore_clip": lambda **kw: jaxstab.zscore_clip(warmup_steps=2, max_norm=50.0, **kw),
    "quantile_clip": lambda **kw: jaxstab.quantile_clip(0.5, warmup_steps=2, **kw),
    "adagc": lambda **kw: jaxstab.adagc(warmup_steps=2, **kw),
    "normalize_by_global_norm": lambda **kw: jaxstab.normalize_by_global_norm(**kw),
    "skip_anomalies": lambda **kw: jaxstab.skip_anomalies(
        optax.adam(1e-2), warmup_steps=2, z_threshold=3.0, **kw
    ),
}
NO_AXIS_NAME = {"adaptive_grad_clip"}  # unit norms reduce within a leaf: shard-local by design


def params_and_grad_steps(n_steps=5):
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
        "out": {"kernel": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)},
    }
    scales = [1.0, 1.2, 0.9, 40.0, 1.1][:n_steps]  # a spike at step 3
    grads = [jax.tree.map(lambda p, s=s: p * s * 0.5, params) for s in scales]
    return params, grads


@pytest.mark.parametrize("name", [*TRANSFORMS, "adaptive_grad_clip"])
def test_sharded_jit_matches_single_device(mesh, shard, run_steps, name):
    make = TRANSFORMS.get(name, lambda: jaxstab.adaptive_grad_clip(0.05))
    tx = optax.chain(make(), optax.adam(1e-2))
    params, grad_steps = params_and_grad_steps()
    sharding = NamedSharding(mesh, P("data"))
    want, _ = run_steps(tx, params, grad_steps)
    got, state = run_steps(tx, params, grad_steps, put=shard)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-7)
    # Big state follows the params' sharding: nothing param-sized is replicated.
    for leaf in jax.tree.leaves(state):
        if leaf.ndim == 2:
            assert leaf.sharding.is_equivalent_to(sharding, 2), (name, leaf.shape, leaf.sharding)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_shard_map_with_axis_name_matches_single_device(run_steps, run_steps_in_shard_map, name):
    """Each device holds a shard of every leaf; axis_name makes norms and statistics global."""
    params, grad_steps = params_and_grad_steps()
    want, want_state = run_steps(TRANSFORMS[name](), params, grad_steps)
    got, tel = run_steps_in_shard_map(TRANSFORMS[name](axis_name="data"), params, grad_steps)
    for g, w in zip(got, want, strict=True):
        chex.assert_trees_all_close(g, w, rtol=2e-5, atol=1e-7)
    for key, value in jaxstab.telemetry(want_state).items():
        np.testing.assert_allclose(tel[key], value, rtol=2e-5, err_msg=key)


def count_all_reduces(hlo_text: str) -> int:
    """All-reduce instructions outside the rescue branch of the norm (a conditional)."""
    return len(re.findall(r"\ball-reduce(?:-start)?\(", hlo_text))


def test_one_scalar_all_reduce_per_norm_in_shard_map(shard, jit_shard_map):
    """The norm of a sharded 20-leaf tree: one psum of a scalar on the path every step takes."""
    tree = {f"layer_{i}": jnp.ones((64, 16)) for i in range(20)}
    norm = jit_shard_map(
        lambda g: jaxstab.global_norm(g, axis_name="data"), in_specs=(P("data"),), out_specs=P()
    )
    hlo = norm.lower(shard(tree)).compile().as_text()
    main_path = [line for line in hlo.splitlines() if "all-reduce(" in line]
    scalar = [line for line in main_path if re.search(r"= f32\[\] all-reduce\(", line)]
    # One on the common path, one in the rescue branch (runs only on over/underflow).
    assert count_all_reduces(hlo) == 2 and len(scalar) == 2, main_path


def test_qk_clip_with_axis_name_clips_every_replica_by_the_largest_logit_of_all():
    """Data parallel under pmap: each device records its own batch's logits; with ``axis_name``
    every replica clips by the largest over all devices (as one device would on the whole
    batch), so the replicas stay identical. Without it they drift apart."""
    n = jax.device_count()
    rng = np.random.default_rng(0)
    params = {"attn": {r: {"kernel": jnp.asarray(rng.normal(size=(8, 2, 4)), jnp.float32)}
                       for r in ("query", "key")}}
    # per device, per head: head 0 over tau on one device only, head 1 on every device
    logits = np.full((n, 2), 5.0, np.float32)
    logits[0, 0], logits[:, 1] = 40.0, np.linspace(20.0, 60.0, n)
    replicated = jax.tree.map(lambda p: jnp.broadcast_to(p, (n, *p.shape)), params)

    def step(params, max_logits, axis_name):
        tx = jaxstab.qk_clip(10.0, axis_name=axis_name)
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = tx.update(zeros, tx.init(params), params, max_logits={"attn": max_logits})
        return optax.apply_updates(params, updates)

    pooled = jax.pmap(lambda p, s: step(p, s, "batch"), axis_name="batch")(
        replicated, jnp.asarray(logits)
    )
    want = step(params, jnp.asarray(logits.max(axis=0)), None)
    for leaf, single in zip(jax.tree.leaves(pooled), jax.tree.leaves(want), strict=True):
        for device in range(n):
            np.testing.assert_array_equal(leaf[device], single)
    local = jax.pmap(lambda p, s: step(p, s, None), axis_name="batch")(
        replicated, jnp.asarray(logits)
    )
    kernel = local["attn"]["query"]["kernel"]
    assert not np.array_equal(kernel[0], kernel[-1])  # without it, the replicas drift apart
