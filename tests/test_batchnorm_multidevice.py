"""Batch norm across 8 simulated CPU devices: shard_map, pmap groups, jit over sharded input.

Run by ``make test`` in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxstab.linen
from jaxstab import batchnorm as core

pytestmark = pytest.mark.multidevice

N_DEV, PER_DEV, FEATURES = 8, 4, 3


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(1e3, 2.0, (N_DEV * PER_DEV, FEATURES)).astype(np.float32)
    # Unequal valid counts per device: device d keeps its first d % 4 + 1 examples.
    valid = np.arange(PER_DEV)[None, :] <= (np.arange(N_DEV) % 4)[:, None]
    mask = valid.reshape(-1, 1)
    return x, mask


def np_stats(x, mask):
    x64 = np.asarray(x, np.float64)[np.broadcast_to(mask, x.shape)[:, 0]]
    return x64.mean(0), x64.var(0)


def test_shard_map_pools_masked_statistics_exactly(shard, jit_shard_map):
    x, mask = data()
    ref_mean, ref_var = np_stats(x, mask)
    variables = {
        "params": {"scale": jnp.ones(FEATURES), "bias": jnp.zeros(FEATURES)},
        "batch_stats": {"mean": jnp.zeros(FEATURES), "var": jnp.ones(FEATURES)},
    }
    results = {}
    for cls in (jaxstab.linen.BatchNorm, fnn.BatchNorm):
        model = cls(momentum=0.0, use_running_average=False, axis_name="data")

        def step(x, mask, model=model):
            y, upd = model.apply(variables, x, mask=mask, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        run = jit_shard_map(step, in_specs=(P("data"), P("data")), out_specs=(P("data"), P()))
        results[cls] = run(*shard((x, mask)))
    y, stats = results[jaxstab.linen.BatchNorm]
    np.testing.assert_allclose(stats["mean"], ref_mean, rtol=1e-7)
    np.testing.assert_allclose(stats["var"], ref_var, rtol=1e-4)
    valid = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(y)[valid].reshape(-1, FEATURES).std(0), 1.0, rtol=1e-3)
    flax_stats = results[fnn.BatchNorm][1]  # a mean of per-device means: biased
    assert np.max(np.abs(np.asarray(flax_stats["var"]) / ref_var - 1)) > 0.05


def test_shard_map_gradients_equal_global_computation(shard, jit_shard_map):
    x, mask = data()
    stats = core.BatchStats(jnp.zeros(FEATURES), jnp.ones(FEATURES))
    w = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)

    def loss(x, mask, w, axis_name):
        y, _ = core.batch_norm(x, stats, mask=mask, axis_name=axis_name)
        total = jnp.sum(jnp.where(mask, jnp.tanh(y) * w, 0))
        return total if axis_name is None else jax.lax.psum(total, axis_name)

    grad_local = jax.grad(lambda x, m, w: loss(x, m, w, "data"))
    run = jit_shard_map(grad_local, in_specs=(P("data"),) * 3, out_specs=P("data"))
    g = run(*shard((x, mask, w)))
    g_ref = jax.jit(jax.grad(lambda x: loss(x, mask, w, None)))(jnp.asarray(x))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-4)


def test_pmap_axis_index_groups_pool_within_groups():
    x, mask = data()
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    model = jaxstab.linen.BatchNorm(
        momentum=0.0, use_running_average=False, axis_name="d", axis_index_groups=groups
    )
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(jnp.asarray(x[:PER_DEV]))

    def step(x, mask):
        return model.apply(variables, x, mask=mask, mutable=["batch_stats"])[1]["batch_stats"]

    per_device = jax.pmap(step, axis_name="d")(
        x.reshape(N_DEV, PER_DEV, FEATURES), mask.reshape(N_DEV, PER_DEV, 1)
    )
    half = N_DEV * PER_DEV // 2
    for g, sl in enumerate((slice(0, half), slice(half, None))):
        ref_mean, ref_var = np_stats(x[sl], mask[sl])
        for d in groups[g]:
            np.testing.assert_allclose(per_device["mean"][d], ref_mean, rtol=1e-7)
            np.testing.assert_allclose(per_device["var"][d], ref_var, rtol=1e-4)


def test_jit_over_batch_sharded_input_gives_global_statistics(shard):
    """No axis_name under plain jit: XLA's reductions over a sharded batch are global."""
    x, mask = data()
    model = jaxstab.linen.BatchNorm(momentum=0.0, use_running_average=False)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(jnp.asarray(x))
    step = jax.jit(lambda v, x, m: model.apply(v, x, mask=m, mutable=["batch_stats"]))
    y, upd = step(variables, *shard((x, mask)))
    assert len(y.sharding.device_set) == N_DEV  # the output stays sharded
    ref_mean, ref_var = np_stats(x, mask)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], ref_mean, rtol=1e-7)
    np.testing.assert_allclose(upd["batch_stats"]["var"], ref_var, rtol=1e-4)
    y_single, _ = step(variables, jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(y, y_single, rtol=1e-5, atol=1e-5)


def test_ghost_batches_under_jit_give_per_device_statistics(shard):
    """virtual_batch_size = per-device batch: each device's shard is normalized on its own."""
    x, _ = data()
    model = jaxstab.linen.BatchNorm(
        momentum=0.0, use_running_average=False, virtual_batch_size=PER_DEV
    )
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(jnp.asarray(x))
    step = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
    xs = shard(x)
    y, upd = step(variables, xs)
    assert len(y.sharding.device_set) == N_DEV
    chunks = np.asarray(x, np.float64).reshape(N_DEV, PER_DEV, FEATURES)
    mean, var = chunks.mean(1, keepdims=True), chunks.var(1, keepdims=True)
    want = ((chunks - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean.mean(0)[0], rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var.mean(0)[0], rtol=1e-4)
    assert xs.sharding.is_equivalent_to(y.sharding, 2)


@pytest.mark.parametrize("fast", [True, False])
def test_jit_over_an_explicitly_sharded_batch_needs_no_slice_of_it(fast):
    """On a mesh of explicit axes (``jax.make_mesh``'s default in newer jax) the batch axis
    cannot be sliced for the variance shift: the statistics still come out global and right."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:
        pytest.skip("this jax has no explicit mesh axes")
    mesh = jax.make_mesh((N_DEV,), ("batch",), axis_types=(axis_type.Explicit,))
    x, _ = data()
    model = jaxstab.linen.BatchNorm(
        momentum=0.0, use_running_average=False, use_fast_variance=fast
    )
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    xs = jax.device_put(jnp.asarray(x), jax.sharding.NamedSharding(mesh, P("batch")))
    step = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
    y, upd = step(variables, xs)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), x64.mean(0), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), x64.var(0), rtol=1e-4)
    y_single, _ = step(variables, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_single), rtol=1e-5, atol=1e-5)
