"""Running statistics shared by the adaptive transforms: exactness, NaN immunity, P-square."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxstab import _stats

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
    assert int(final.count) == len(xs)


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
    for field in ("count", "mean", "var"):
        np.testing.assert_array_equal(getattr(trace, field)[kept], getattr(ref, field))
    for i in np.flatnonzero(~(np.isfinite(xs) & accept)):  # state unchanged by a rejected step
        for field in ("count", "mean", "var"):
            np.testing.assert_array_equal(getattr(trace, field)[i], getattr(trace, field)[i - 1])


def test_mean_var_is_float32_whatever_the_input_dtype():
    s = _stats.mean_var_update(
        _stats.mean_var_init(), jnp.float16(3.0), decay=jnp.float16(0.9), warmup_steps=1
    )
    assert s.mean.dtype == s.var.dtype == jnp.float32 and s.count.dtype == jnp.int32


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


def test_p2_accepts_zero_norms():
    state, _ = run_p2(np.array([0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 0.0], np.float32), 0.5)
    est = float(_stats.p2_estimate(state, 0.5))
    assert np.isfinite(est) and 0.0 <= est < 3.0
