"""jaxstab.telemetry finds jaxstab states inside optax's combinators."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstab
from jaxstab.telemetry import telemetry_state

PARAMS = {"w": jnp.ones((4,)), "b": jnp.ones((2,))}
GRADS = {"w": jnp.full((4,), 2.0), "b": jnp.zeros((2,))}  # global norm 4


def run_once(tx):
    state = tx.init(PARAMS)
    _, state = jax.jit(tx.update)(GRADS, state, PARAMS)
    return jaxstab.telemetry(state)


def test_chain():
    tel = run_once(optax.chain(jaxstab.clip_by_global_norm(1.0), optax.adam(1e-3)))
    assert set(tel) == {f"0/clip_by_global_norm/{f}" for f in ("grad_norm", "scale", "clipped")}
    np.testing.assert_allclose(tel["0/clip_by_global_norm/grad_norm"], 4.0)
    np.testing.assert_allclose(tel["0/clip_by_global_norm/scale"], 0.25)
    assert bool(tel["0/clip_by_global_norm/clipped"])


def test_two_transforms_in_a_chain_get_distinct_keys():
    tx = optax.chain(
        jaxstab.clip_by_global_norm(10.0), jaxstab.clip_by_global_norm(1.0), optax.sgd(0.1)
    )
    tel = run_once(tx)
    np.testing.assert_allclose(tel["0/clip_by_global_norm/scale"], 1.0)
    np.testing.assert_allclose(tel["1/clip_by_global_norm/scale"], 0.25)


def test_inject_hyperparams():
    tx = optax.inject_hyperparams(jaxstab.clip_by_global_norm)(max_norm=2.0)
    tel = run_once(tx)
    np.testing.assert_allclose(tel["inner_state/clip_by_global_norm/scale"], 0.5)


def test_masked():
    tx = optax.masked(jaxstab.clip_by_global_norm(1.0), {"w": True, "b": False})
    tel = run_once(tx)
    np.testing.assert_allclose(tel["inner_state/clip_by_global_norm/grad_norm"], 4.0)


def test_multi_steps():
    tx = optax.MultiSteps(
        optax.chain(jaxstab.clip_by_global_norm(1.0), optax.sgd(0.1)), every_k_schedule=2
    )
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for _ in range(2):
        _, state = update(GRADS, state, PARAMS)
    tel = jaxstab.telemetry(state)
    np.testing.assert_allclose(tel["inner_opt_state/0/clip_by_global_norm/grad_norm"], 4.0)


def test_empty_when_no_jaxstab_state():
    assert jaxstab.telemetry(optax.adam(1e-3).init(PARAMS)) == {}


def test_jit_returns_the_dict():
    tx = optax.chain(jaxstab.clip_by_global_norm(1.0), optax.sgd(0.1))

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, jaxstab.telemetry(state)

    _, _, tel = step(PARAMS, tx.init(PARAMS), GRADS)
    # An empty or misnamed dict fails here (``all`` of no values would pass).
    assert set(tel) == {f"0/clip_by_global_norm/{f}" for f in ("grad_norm", "scale", "clipped")}
    assert all(isinstance(v, jax.Array) and v.shape == () for v in tel.values())
    np.testing.assert_allclose(tel["0/clip_by_global_norm/grad_norm"], 4.0)
    np.testing.assert_allclose(tel["0/clip_by_global_norm/scale"], 0.25)


def test_registration_checks_fields():
    class State(NamedTuple):
        a: jax.Array

    with pytest.raises(ValueError, match="no fields"):
        telemetry_state("x", ("b",))(State)
