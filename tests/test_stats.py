"""Running statistics shared by the adaptive transforms: exactness, NaN immunity, P-square."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxstab
from jaxstab import _checks, _stats

finite_floats = st.floats(0.0009765625, 1024.0, width=32)  # 2**-10 .. 2**10


PAD = 24  # sequences are padded to one length (rejected samples) so each test compiles once


@jax.jit
def _scan_mean_var(xs, accept, decay, warmup_steps):
    def body(s, x_a):
        x, a = x_a
        s = _stats.mean_var_update(s, x, decay=decay, warmup_steps=warmup_steps, accept=a)
        return s, s

    return jax.lax.scan(body, _stats.mean_var_init(), (xs, accept))


def run_mean_var(xs, *, decay, warmup_steps, accept=None):
    n = len(xs)
    accept = np.ones(n, bool) if accept is None else np.asarray(accept, bool)
    xs = np.pad(np.asarray(xs, np.float32), (0, PAD - n))
    accept = np.pad(accept, (0, PAD - n))
    final, trace = _scan_mean_var(xs, accept, decay, warmup_steps)
    return final, jax.tree.map(lambda t: t[:n], trace)


@settings(max_examples=25, deadline=None)
@given(st.lists(finite_floats, min_size=1, max_size=12), st.integers(0, 12))
def test_warmup_gives_exact_mean_and_population_variance(xs, warmup):
    final, _ = run_mean_var(xs, decay=0.9, warmup_steps=warmup)
    n = max(warmup, 1)
    seed = np.asarray(xs[:n], np.float64)
    if len(xs) <= n:
        np.testing.assert_allclose(final.mean, seed.mean(), rtol=1e-5)
        np.testing.assert_allclose(final.var, seed.var(), rtol=1e-3, atol=1e-5 * seed.mean() ** 2)
    assert int(final.samples) == len(xs)


@settings(max_examples=25, deadline=None)
@given(st.lists(finite_floats, min_size=4, max_size=20), st.floats(0.0, 0.99))
def test_ema_after_warmup_matches_numpy(xs, decay):
    final, _ = run_mean_var(xs, decay=decay, warmup_steps=3)
    mu, var = np.mean(xs[:3], dtype=np.float64), np.var(xs[:3], dtype=np.float64)
    for x in xs[3:]:
        mu = decay * mu + (1 - decay) * x
        var = decay * var + (1 - decay) * (x - mu) ** 2
    np.testing.assert_allclose(final.mean, mu, rtol=1e-4)
    np.testing.assert_allclose(final.var, var, rtol=1e-3, atol=1e-6 * mu**2)


def test_mean_var_ignores_non_finite_and_rejected_samples_bit_for_bit():
    xs = np.array([1.0, 2.0, np.nan, 3.0, np.inf, 4.0, -np.inf, 5.0, 6.0], np.float32)
    accept = np.array([1, 1, 1, 1, 1, 0, 1, 1, 1], bool)
    _, trace = run_mean_var(xs, decay=0.9, warmup_steps=2, accept=accept)
    clean = xs[np.isfinite(xs) & accept]
    _, ref = run_mean_var(clean, decay=0.9, warmup_steps=2)
    kept = np.flatnonzero(np.isfinite(xs) & accept)
    for field in ("samples", "mean", "var"):
        np.testing.assert_array_equal(getattr(trace, field)[kept], getattr(ref, field))
    for i in np.flatnonzero(~(np.isfinite(xs) & accept)):  # state unchanged by a rejected step
        for field in ("samples", "mean", "var"):
            np.testing.assert_array_equal(getattr(trace, field)[i], getattr(trace, field)[i - 1])


def test_mean_var_is_float32_whatever_the_input_dtype():
    s = _stats.mean_var_update(
        _stats.mean_var_init(), jnp.float16(3.0), decay=jnp.float16(0.9), warmup_steps=1
    )
    assert s.mean.dtype == s.var.dtype == jnp.float32 and s.samples.dtype == jnp.int32


# --------------------------------------------------------------------------------------------
# P-square


@jax.jit
def _scan_p2(xs, accept, p):
    def body(s, x_a):
        est = _stats.p2_estimate(s, p)
        return _stats.p2_update(s, x_a[0], p, accept=x_a[1]), est

    return jax.lax.scan(body, _stats.p2_init(), (xs, accept))


def run_p2(xs, p):
    n = len(xs)
    pad = PAD - n if n < PAD else 0  # short sequences share one compilation
    xs = np.pad(np.asarray(xs, np.float32), (0, pad))
    state, est = _scan_p2(xs, np.arange(n + pad) < n, p)
    return state, est[:n]


@settings(max_examples=20, deadline=None)
@given(st.lists(finite_floats, min_size=1, max_size=4), st.floats(0.01, 0.99))
def test_p2_is_exact_on_the_log_scale_before_five_samples(xs, p):
    state, _ = run_p2(xs, p)
    expected = np.exp(np.quantile(np.log(np.asarray(xs, np.float32)), p))
    np.testing.assert_allclose(_stats.p2_estimate(state, p), expected, rtol=1e-4)


def test_p2_estimate_is_inf_before_any_sample():
    assert _stats.p2_estimate(_stats.p2_init(), 0.9) == jnp.inf


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("dist", ["lognormal", "exponential", "uniform", "pareto"])
def test_p2_tracks_the_exact_quantile(dist, p):
    rng = np.random.default_rng(1)
    xs = {
        "lognormal": lambda: rng.lognormal(0.0, 1.0, 3000),
        "exponential": lambda: rng.exponential(1.0, 3000),
        "uniform": lambda: rng.uniform(0.0, 1.0, 3000),
        "pareto": lambda: rng.pareto(1.5, 3000),
    }[dist]().astype(np.float32)
    state, estimates = run_p2(xs, p)
    rank = np.mean(xs <= float(_stats.p2_estimate(state, p)))
    assert abs(rank - p) < 0.01
    clipped = np.mean(xs[1000:] > np.asarray(estimates)[1000:])
    assert abs(clipped - (1 - p)) < 0.015


def test_p2_ignores_non_finite_samples_and_shrugs_off_a_huge_spike():
    xs = np.random.default_rng(0).lognormal(0.0, 1.0, 2000).astype(np.float32)
    base, _ = run_p2(xs, 0.9)
    dirty = np.insert(xs, [100, 700], [np.nan, np.inf])
    poisoned, _ = run_p2(dirty, 0.9)
    jax.tree.map(np.testing.assert_array_equal, base, poisoned)
    spiked = xs.copy()
    spiked[500] = 1e30
    spike_state, _ = run_p2(spiked, 0.9)
    est, ref = float(_stats.p2_estimate(spike_state, 0.9)), float(_stats.p2_estimate(base, 0.9))
    assert abs(est / ref - 1) < 0.03


def test_p2_state_is_sixteen_numbers_whatever_the_run_length():
    short, _ = run_p2(np.ones(3), 0.5)
    long, _ = run_p2(np.random.default_rng(0).uniform(size=5000), 0.5)
    for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(long), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert sum(x.size for x in jax.tree.leaves(long)) == 16


def test_p2_ignores_zero_norms():
    """A step with no gradient is not a sample: 200 of them pulled the quantile to 1e-38."""
    xs = np.array([0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 0.0, 4.0, 5.0, 6.0], np.float32)
    state, _ = run_p2(xs, 0.5)
    ref, _ = run_p2(xs[xs != 0], 0.5)
    jax.tree.map(np.testing.assert_array_equal, state, ref)
    assert int(state.samples) == 6


# --------------------------------------------------------------------------------------------
# The decayed peak


@given(
    st.lists(st.floats(0.0, 1e6, allow_subnormal=False), min_size=1, max_size=40),
    st.floats(0.5, 1e4),
)
@settings(max_examples=30, deadline=None)
def test_peak_is_the_largest_sample_weighted_by_its_age(xs, half_life):
    """``peak == max_i x_i * 0.5 ** (age_i / half_life)``, ages counted in nonzero samples."""
    peak = jnp.zeros((), jnp.float32)
    for x in xs:
        peak = _stats.peak_update(peak, x, half_life)
    xs = np.asarray(xs, np.float32)  # a sample that rounds to float32's 0 is no sample
    kept = xs[xs != 0].astype(np.float64)
    ages = np.arange(len(kept))[::-1]
    want = float(np.max(kept * 0.5 ** (ages / half_life))) if len(kept) else 0.0
    np.testing.assert_allclose(float(peak), want, rtol=1e-4 * (1 + len(xs)))


def test_peak_ignores_rejected_non_finite_and_zero_samples_bit_for_bit():
    peak = _stats.peak_update(jnp.zeros((), jnp.float32), 3.0, 10.0)
    for x, accept in [(np.nan, True), (np.inf, True), (0.0, True), (100.0, False)]:
        np.testing.assert_array_equal(_stats.peak_update(peak, x, 10.0, accept=accept), peak)
    halved = _stats.peak_update(peak, 1.0, 10.0)
    for _ in range(9):
        halved = _stats.peak_update(halved, 1.0, 10.0)
    np.testing.assert_allclose(halved, 1.5, rtol=1e-5)  # ten samples: one half-life


# --------------------------------------------------------------------------------------------
# Level shifts: the spread floor and z_limit


def test_mean_var_ignores_zero_samples_bit_for_bit():
    xs = np.array([0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 5.0], np.float32)
    final, _ = run_mean_var(xs, decay=0.9, warmup_steps=2)
    ref, _ = run_mean_var(xs[xs != 0], decay=0.9, warmup_steps=2)
    jax.tree.map(np.testing.assert_array_equal, final, ref)


def test_spread_is_at_least_one_percent_of_the_mean():
    constant, _ = run_mean_var(np.full(5, 4.0), decay=0.9, warmup_steps=5)
    assert float(_stats.std(constant)) == 0.0
    np.testing.assert_allclose(_stats.spread(constant), 0.04, rtol=1e-6)
    limit = _stats.z_limit(constant, 2.0, 0.0, warmup_steps=5)
    np.testing.assert_allclose(limit, 4.08, rtol=1e-6)
    assert _stats.z_limit(constant, 2.0, 0.0, warmup_steps=6) == jnp.inf  # still warming up
    spread_out, _ = run_mean_var(np.array([1.0, 3.0]), decay=0.9, warmup_steps=2)
    np.testing.assert_allclose(_stats.spread(spread_out), 1.0)  # the floor does not bind


def test_samples_learned_as_the_limit_lift_a_constant_history():
    """Fed ``min(x, z_limit)``, a lasting jump from a constant level is learned geometrically."""

    @jax.jit
    def learn(stats, x):
        def body(s, x):
            limit = _stats.z_limit(s, 2.5, 1e-6, 25)
            s = _stats.mean_var_update(s, jnp.minimum(x, limit), decay=0.97, warmup_steps=25)
            return s, x > limit

        return jax.lax.scan(body, stats, x)

    stats, _ = run_mean_var(np.ones(24), decay=0.97, warmup_steps=24)
    stats = _stats.mean_var_update(stats, 1.0, decay=0.97, warmup_steps=25)
    _, over = learn(stats, jnp.full(200, 1000.0, jnp.float32))
    assert np.flatnonzero(over).max() < 160  # zscore_clip's documented bound


# --------------------------------------------------------------------------------------------
# Step counts


@pytest.mark.parametrize(
    ("n", "want"),
    [
        (25, 25),
        (25.0, 25),
        (np.int64(2**31), 2**31 - 1),
        (2**40, 2**31 - 1),
        (float("inf"), 2**31 - 1),
        (jnp.asarray(7), 7),
        (jnp.asarray(jnp.inf), 2**31 - 1),
        (jnp.asarray(3e9), 2**31 - 1),
    ],
)
def test_step_count_saturates_instead_of_overflowing(n, want):
    got = _stats.step_count(n)
    assert got.dtype == jnp.int32 and int(got) == want


# --------------------------------------------------------------------------------------------
# Hyperparameter checks (shared by every factory, BatchNorm included)


@pytest.mark.parametrize("value", [None, "2.5", 1 + 2j, [1.0, None], [1.0, [2.0]], object()])
def test_check_range_names_a_non_numeric_value(value):
    with pytest.raises(TypeError, match=r"lr must be a real number in \(0, 1\], got "):
        _checks.check_range("lr", value, low=0, high=1, low_open=True)


def test_non_numeric_hyperparameters_of_the_public_factories():
    """These raised numpy's "ufunc 'isfinite' not supported for the input types"."""
    with pytest.raises(TypeError, match="max_norm must be a real number"):
        jaxstab.clip_by_global_norm(None)
    with pytest.raises(TypeError, match="clipping must be a real number"):
        jaxstab.adaptive_grad_clip(None)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        jaxstab.linen.BatchNorm(momentum=None).init(
            jax.random.key(0), jnp.ones((2, 3)), use_running_average=False
        )
    jaxstab.zscore_clip(max_norm=None)  # optional: None means off
