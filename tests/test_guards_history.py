"""skip_anomalies against norm histories: zero steps, constant warm-ups, level shifts, endless
warm-up, and float64 gradients beyond float32's range."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxstab.guards import skip_anomalies


def grads_with_norm(g):
    """A two-leaf gradient tree whose global norm is ``g``."""
    return {"a": jnp.stack([0.6 * g, 0.0]), "b": jnp.reshape(0.8 * g, (1,))}


@functools.partial(jax.jit, static_argnums=0)
def skipped_steps(tx, norms):
    """Whether each step of ``norms`` was skipped, run under ``lax.scan``."""

    def body(state, g):
        params = grads_with_norm(jnp.ones_like(g))
        _, state = tx.update(grads_with_norm(g), state, params)
        return state, state.skipped

    return jax.lax.scan(body, tx.init(grads_with_norm(1.0)), jnp.asarray(norms, jnp.float32))[1]


def test_zero_gradient_steps_do_not_make_good_steps_look_anomalous():
    """After 200 zero-gradient steps the statistics were (0, 0): the next 76 good steps were
    skipped. Zero steps are no samples now, and warm-up starts with the first real norm."""
    norms = np.r_[np.zeros(200), np.random.default_rng(0).lognormal(0.0, 0.1, 300)]
    skipped = np.asarray(skipped_steps(skip_anomalies(optax.sgd(0.1)), norms))
    assert not skipped.any()
    # A burst of zero steps later on leaves the statistics alone too.
    norms = np.r_[norms[200:250], np.zeros(100), norms[250:]]
    assert not np.asarray(skipped_steps(skip_anomalies(optax.sgd(0.1)), norms)).any()


@pytest.mark.parametrize(
    ("jump", "within", "peak_ratio"), [(2.0, 25, None), (1000.0, 70, None), (1000.0, 70, 3.0)]
)
def test_a_lasting_level_shift_after_a_constant_warmup_is_learned(jump, within, peak_ratio):
    """With equal norms in warm-up the standard deviation was 0 and the z-score of every other
    norm was huge; the docstring's bounds: 2x within 25 steps (z-score alone), 1000x within 70."""
    norms = np.r_[np.ones(30), np.full(300, jump)]
    tx = skip_anomalies(optax.sgd(0.1), peak_ratio=peak_ratio)
    skipped = np.asarray(skipped_steps(tx, norms))
    assert skipped[30] and not skipped[30 + within :].any()
    assert 0 < skipped.sum() <= within


def test_a_norm_within_three_times_the_peak_is_never_skipped_for_its_z_score():
    """After a warm-up of equal norms every other norm has a huge z-score; with the default
    ``peak_ratio=3`` a jump to 2.9x is not skipped, to 3.1x it is."""
    for jump, skips in [(2.9, False), (3.1, True)]:
        norms = np.r_[np.ones(30), np.full(50, jump)]
        assert np.asarray(skipped_steps(skip_anomalies(optax.sgd(0.1)), norms)).any() == skips


@given(
    st.floats(1e-3, 1e3),
    st.lists(st.floats(1.0, 2.9), min_size=30, max_size=200),
    st.sampled_from([0.5, 6.0]),
)
@settings(max_examples=25, deadline=None)
def test_norms_within_a_factor_of_three_are_never_skipped(scale, factors, z_threshold):
    """Each accepted norm lifts the peak to at least itself, so a history whose norms lie within
    a factor 2.9 of each other never exceeds three times the peak, however its z-scores look."""
    tx = skip_anomalies(optax.sgd(0.1), z_threshold=z_threshold, warmup_steps=3)
    assert not np.asarray(skipped_steps(tx, scale * np.asarray(factors))).any()


@pytest.mark.parametrize(("half_life", "skipped"), [(50.0, True), (1e9, False)])
def test_the_peak_forgets_an_old_large_norm(half_life, skipped):
    """A norm of 8 in warm-up, 600 norms of 1, then one of 3.5 (a z-score outlier by then): the
    peak has forgotten the 8 after 12 half-lives of 50 steps, and remembers it at 1e9."""
    norms = np.r_[8.0, np.ones(600), 3.5]
    tx = skip_anomalies(optax.sgd(0.1), peak_half_life=half_life)
    assert np.asarray(skipped_steps(tx, norms))[-1] == skipped


@pytest.mark.parametrize("warmup_steps", [2**31, float("inf")])
def test_endless_warmup_skips_only_non_finite_steps(warmup_steps):
    """These raised OverflowError in the first update; now warm-up never ends."""
    norms = np.r_[np.ones(40), 1e6, np.nan, np.ones(5)]
    tx = skip_anomalies(optax.sgd(0.1), warmup_steps=warmup_steps)
    skipped = np.asarray(skipped_steps(tx, norms))
    np.testing.assert_array_equal(skipped, np.isnan(norms))


def test_float64_gradients_beyond_float32_are_not_skipped_under_x64(enable_x64):
    """Summed in float32, a finite float64 gradient of 1e39 had norm inf and was skipped."""
    with enable_x64(True):
        tx = skip_anomalies(optax.sgd(1.0))
        params = {"w": jnp.zeros(2, jnp.float64)}
        updates, state = jax.jit(tx.update)({"w": jnp.array([1e39, 0.0])}, tx.init(params), params)
        assert not bool(state.skipped)
        np.testing.assert_array_equal(updates["w"], [-1e39, 0.0])
        # the state keeps init's dtypes, so it can be a lax.scan carry
        init = tx.init(params)
        assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, init)


def burst_history(length: int, seed: int = 0):
    """100 healthy norms, a burst of ``length`` norms 10x as large, then 100 healthy ones."""
    healthy = np.random.default_rng(seed).lognormal(0.0, 0.1, 200)
    return np.r_[healthy[:100], 10.0 * healthy[100 : 100 + length], healthy[100:]]


def test_a_sustained_burst_talks_the_default_guard_into_accepting_it():
    """The documented limit: each skipped norm widens the band, so most of a long burst gets
    through."""
    skipped = np.asarray(skipped_steps(skip_anomalies(optax.sgd(0.1)), burst_history(50)))
    assert skipped[100] and skipped[100:150].sum() < 25
    assert not skipped[150:].any()


def test_max_skip_run_holds_the_band_through_a_50_step_burst():
    tx = skip_anomalies(optax.sgd(0.1), max_skip_run=64)
    skipped = np.asarray(skipped_steps(tx, burst_history(50)))
    assert skipped[100:150].all() and not skipped[:100].any() and not skipped[150:].any()


def test_max_skip_run_still_learns_a_lasting_change_of_level():
    """A run of skips longer than ``max_skip_run`` is a new level: learned, ``R`` steps later."""
    norms = np.r_[np.random.default_rng(1).lognormal(0.0, 0.1, 100), np.full(300, 5.0)]
    skipped = np.asarray(skipped_steps(skip_anomalies(optax.sgd(0.1), max_skip_run=64), norms))
    assert skipped[100:165].all()  # held through the run...
    assert not skipped[165 + 40 :].any()  # ...then learned within about 40 steps
    state_run = skip_anomalies(optax.sgd(0.1), max_skip_run=0)
    assert not np.asarray(skipped_steps(state_run, norms))[140:].any()  # 0: learn at once
