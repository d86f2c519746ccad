"""normalize_by_global_norm: norm scaling."""

from __future__ import annotations

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxstab
from jaxstab.scaling import normalize_by_global_norm

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}


def global_norm64(tree):
    return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))


_update = jax.jit(lambda target, g: normalize_by_global_norm(target).update(g, None))


@settings(max_examples=25, deadline=None)
@given(
    st.floats(2.0**-10, 2.0**10, width=16),
    st.lists(st.floats(-1e4, 1e4, width=32), min_size=8, max_size=8),
)
def test_property_update_has_the_target_norm_or_is_zero(target, values):
    grads = {"w": jnp.asarray(values[:6], jnp.float32).reshape(3, 2), "b": jnp.asarray(values[6:])}
    updates, state = _update(target, grads)
    norm = global_norm64(grads)
    if norm >= 1e-6:
        np.testing.assert_allclose(global_norm64(updates), target, rtol=1e-5)
    else:
        assert global_norm64(updates) <= target * (1 + 1e-5)
    np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-5, atol=1e-30)


class NormalizeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_gradients_stay_zero_and_non_finite_give_zeros(self):
        tx = normalize_by_global_norm(2.0)
        update = self.variant(tx.update)
        state = tx.init(PARAMS)
        zeros, state = update(jax.tree.map(jnp.zeros_like, PARAMS), state)
        chex.assert_trees_all_equal(zeros, jax.tree.map(jnp.zeros_like, PARAMS))
        assert float(state.scale) == 0.0
        for bad in (jnp.nan, jnp.inf):
            grads = {"w": jnp.ones((3, 2)).at[0, 0].set(bad), "b": jnp.ones(2)}
            out, state = update(grads, state)
            chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, PARAMS))

    @chex.variants(with_jit=True, without_jit=True)
    def test_tiny_norms_are_scaled_by_target_over_eps(self):
        tx = normalize_by_global_norm(1.0, eps=1e-3)
        grads = {"w": jnp.full((3, 2), 1e-6), "b": jnp.zeros(2)}
        out, state = self.variant(tx.update)(grads, tx.init(PARAMS))
        np.testing.assert_allclose(float(state.scale), 1e3, rtol=1e-6)
        np.testing.assert_allclose(out["w"], 1e-3, rtol=1e-5)


def test_complex_gradients_are_normalized_by_their_modulus():
    """1e-12j had norm 0 (the rescue dropped the imaginary part): the update was zeroed."""
    tx = normalize_by_global_norm(1.0, eps=1e-15)
    for value in (1e-12j, 1e20j, 3 + 4j):
        out, state = jax.jit(tx.update)({"w": jnp.array([value], jnp.complex64)}, None)
        np.testing.assert_allclose(out["w"], [value / abs(value)], rtol=1e-6)
        np.testing.assert_allclose(state.grad_norm, abs(value), rtol=1e-6)


def test_float64_gradients_beyond_float32_under_x64(enable_x64):
    """Summed in float32, a float64 1e39 had norm inf (zeroed) and 1e-40 norm 0 (zeroed)."""
    with enable_x64(True):
        tx = normalize_by_global_norm(1.0, eps=1e-300)
        for value in (1e39, 1e-40, 1e-300):
            out, _ = jax.jit(tx.update)({"w": jnp.array([value, 0.0], jnp.float64)}, None)
            np.testing.assert_allclose(out["w"], [1.0, 0.0], rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_gradients_are_normalized_not_overflowed(dtype):
    grads = {"w": jnp.full((4,), 300.0, dtype), "b": jnp.full((2,), 1.0, dtype)}
    out, state = jax.jit(normalize_by_global_norm().update)(grads, None)
    assert out["w"].dtype == dtype and out["b"].dtype == dtype
    np.testing.assert_allclose(global_norm64(out), 1.0, rtol=1e-2)
    np.testing.assert_allclose(state.grad_norm, global_norm64(grads), rtol=1e-5)


def test_chain_with_sgd_moves_by_learning_rate_times_target():
    tx = optax.chain(normalize_by_global_norm(), optax.sgd(0.1))
    grads = {"w": jnp.full((3, 2), 5.0), "b": jnp.ones(2)}
    updates, state = tx.update(grads, tx.init(PARAMS))
    np.testing.assert_allclose(global_norm64(updates), 0.1, rtol=1e-6)
    tele = jaxstab.telemetry(state)
    assert set(tele) == {
        "0/normalize_by_global_norm/grad_norm",
        "0/normalize_by_global_norm/scale",
    }


def test_inject_hyperparams_and_multisteps_and_checkpoint():
    tx = optax.MultiSteps(
        optax.chain(optax.inject_hyperparams(normalize_by_global_norm)(target=2.0), optax.sgd(1.0)),
        every_k_schedule=2,
    )
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    grads = {"w": jnp.full((3, 2), 3.0), "b": jnp.ones(2)}
    _, state = step(grads, state, PARAMS)
    state = flax.serialization.from_bytes(tx.init(PARAMS), flax.serialization.to_bytes(state))
    updates, state = step(grads, state, PARAMS)
    np.testing.assert_allclose(global_norm64(updates), 2.0, rtol=1e-6)


def test_no_retracing():
    tx = normalize_by_global_norm()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, state):
        return tx.update(grads, state)

    state = tx.init(PARAMS)
    for i in range(4):
        _, state = step(jax.tree.map(lambda p, i=i: p * (i + 1.0), PARAMS), state)
    chex.clear_trace_counter()


@pytest.mark.parametrize(("kwargs", "match"), [({"target": -1.0}, "target"), ({"eps": 0.0}, "eps")])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        normalize_by_global_norm(**kwargs)


@pytest.mark.multidevice
def test_axis_name_under_shard_map():
    from jax.sharding import Mesh, PartitionSpec

    n = jax.device_count()
    if n < 2:
        pytest.skip("needs several devices")
    mesh = Mesh(np.array(jax.devices()), ("d",))
    grads = {"w": jnp.arange(4.0 * n)}
    tx = normalize_by_global_norm(axis_name="d")
    update = jax.jit(
        jax.shard_map(
            tx.update,
            mesh=mesh,
            in_specs=({"w": PartitionSpec("d")}, PartitionSpec()),
            out_specs=({"w": PartitionSpec("d")}, PartitionSpec()),
        )
    )
    out, _ = update(grads, tx.init(grads))
    expected, _ = normalize_by_global_norm().update(grads, None)
    chex.assert_trees_all_close(out, expected, rtol=1e-6)
