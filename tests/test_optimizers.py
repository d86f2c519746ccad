"""stable_adamw (StableAdamW) and spam (SPAM): parity with optax.adamw, NumPy references of the
papers' algorithms, properties, non-finite steps, dtypes, optax wrappers and checkpoints."""

from __future__ import annotations

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _steps import run
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxstab
from jaxstab.adaptive import zscore_clip
from jaxstab.optimizers import scale_by_spam, scale_by_stable_adam, spam, stable_adamw
from jaxstab.optimizers._spam import _clipped_from_new_moment

SHAPES = {"kernel": (6, 4), "bias": (4,), "scale": ()}


def params_tree(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}


def grad_steps(n, seed=0, spikes=(), dtype=jnp.float32):
    """``n`` gradient trees; ``spikes`` holds ``(step, leaf, factor)``: that leaf times factor."""
    rng = np.random.default_rng(seed)
    steps = [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(n)]
    for step, leaf, factor in spikes:
        steps[step][leaf] = steps[step][leaf] * factor
    return [{k: jnp.asarray(v, dtype) for k, v in g.items()} for g in steps]


def as_complex(real, imag):
    """complex64 trees ``real + 1j * imag`` (one tree or a list of them, leaf by leaf)."""
    return jax.tree.map(lambda a, b: (a + 1j * b).astype(jnp.complex64), real, imag)


@jax.jit
def _stacked(trees):
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


# --------------------------------------------------------------------------------------------
# NumPy references, float64, written from the papers' algorithms


def _reference_moments(params):
    """float64 (complex128 for complex) params, zero first moments, real zero second moments."""
    p = {k: np.asarray(x, np.result_type(np.asarray(x), np.float64)) for k, x in params.items()}
    m = {k: np.zeros_like(x) for k, x in p.items()}
    return p, m, {k: np.zeros(x.shape) for k, x in p.items()}


def stable_adamw_reference(params, steps, *, lr, b1, b2, eps, weight_decay, clip_threshold):
    """StableAdamW (Wortsman et al. 2023, Algorithm 2): updates and per-step max RMS. Complex
    parameters as optax.adamw takes them: the second moment holds ``|g|**2``."""
    p, m, v = _reference_moments(params)
    updates, max_rms = [], []
    for t, g in enumerate(steps, 1):
        u, rms_t = {}, []
        for k in p:
            gk = np.asarray(g[k], p[k].dtype)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * np.abs(gk) ** 2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            rms = math.sqrt(np.mean(np.abs(gk) ** 2 / np.maximum(v_hat, eps**2)))
            eta = lr / max(1.0, rms / clip_threshold)
            u[k] = -eta * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p[k])
            p[k] = p[k] + u[k]
            rms_t.append(rms)
        updates.append(u)
        max_rms.append(max(rms_t))
    return updates, np.array(max_rms)


def spam_reference(
    params, steps, *, lr, b1, b2, eps, weight_decay, theta, delta_t, n_warmup, delay
):
    """SPAM as the authors' PyTorch code runs it, step by step (its counters transcribed), with
    one change: entries whose second moment is still zero are not judged as spikes."""

    def death_rate(step):  # the reference's CosineDecay(0.99, N) at a step
        if step >= n_warmup:
            return 0.0
        return 0.99 * (1 + math.cos(math.pi * step / (n_warmup + 1))) / 2

    p, m, v = _reference_moments(params)
    current_step = n_warmup + 1
    updates, fractions, scales = [], [], []
    for total_step, g in enumerate(steps):
        scale = 1 - death_rate(current_step)
        u, clipped, size = {}, 0, 0
        for k in p:
            gk = np.asarray(g[k], p[k].dtype).copy()
            if (total_step + 1) % delta_t == 0:
                m[k], v[k] = np.zeros_like(m[k]), np.zeros_like(v[k])
            n = total_step + 1
            if n >= delay and n % delta_t >= delay:
                mask = (v[k] > 0) & (np.abs(gk) ** 2 > theta * v[k])
                gk[mask] = np.sign(gk[mask]) * np.sqrt(theta * v[k][mask])  # z / |z| if complex
                clipped += int(mask.sum())
            size += gk.size
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * np.abs(gk) ** 2
            m_hat, v_hat = m[k] / (1 - b1**n), v[k] / (1 - b2**n)
            u[k] = -lr * (scale * m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p[k])
            p[k] = p[k] + u[k]
        current_step += 1
        if (total_step + 2) % delta_t == 0:
            current_step = 0
        updates.append(u)
        fractions.append(clipped / size)
        scales.append(scale)
    return updates, np.array(fractions), np.array(scales)


def assert_updates_close(got, want, rtol, atol=0.0):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=atol, err_msg=f"step {i} {k}")


# --------------------------------------------------------------------------------------------
# Parity with optax.adamw


class ParityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_stable_adamw_without_clipping_is_adamw(self):
        schedule = optax.linear_schedule(1e-2, 1e-3, 10)
        mask = {"kernel": True, "bias": False, "scale": True}
        for kwargs in (
            {"learning_rate": 1e-2},
            {
                "learning_rate": schedule,
                "b1": 0.8,
                "b2": 0.95,
                "eps": 1e-6,
                "eps_root": 1e-9,
                "weight_decay": 0.1,
                "mask": mask,
            },
        ):
            params, steps = params_tree(), grad_steps(12)
            want, _, _ = run(optax.adamw(**kwargs), params, steps)
            tx = stable_adamw(**kwargs, clip_threshold=jnp.inf)
            got, _, state = run(tx, params, steps, self.variant(tx.update))
            chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)
            assert float(state[0].clip_fraction) == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_spam_without_clipping_and_resets_is_adamw(self):
        params, steps = params_tree(), grad_steps(12, spikes=[(8, "kernel", 1e3)])
        kwargs = {"learning_rate": 1e-2, "weight_decay": 0.05, "b2": 0.9}
        want, _, _ = run(optax.adamw(**kwargs), params, steps)
        tx = spam(**kwargs, spike_threshold=None, reset_interval=None)
        got, _, _ = run(tx, params, steps, self.variant(tx.update))
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)

    @chex.variants(with_jit=True, without_jit=True)
    def test_complex_params_match_adamw(self):
        """As optax.adamw: a complex first moment, a real second moment of ``|g|**2``."""
        params = as_complex(params_tree(), params_tree(5))
        steps = as_complex(grad_steps(8), grad_steps(8, seed=5))
        kwargs = {"learning_rate": 1e-2, "weight_decay": 0.1}
        want, _, _ = run(optax.adamw(**kwargs), params, steps)
        for tx in (
            stable_adamw(**kwargs, clip_threshold=jnp.inf),
            spam(**kwargs, spike_threshold=None, reset_interval=None),
        ):
            got, _, state = run(tx, params, steps, self.variant(tx.update))
            chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-8)
            assert all(x.dtype == jnp.complex64 for x in jax.tree.leaves(state[0].mu))
            assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[0].nu))

    def test_adamw_positional_order_is_kept(self):
        args = (
            1e-2,
            0.8,
            0.9,
            1e-6,
            0.0,
            None,
            0.3,
            {"kernel": True, "bias": False, "scale": False},
        )
        params, steps = params_tree(), grad_steps(4)
        want, _, _ = run(optax.adamw(*args), params, steps)
        for tx in (
            stable_adamw(*args, clip_threshold=jnp.inf),
            spam(*args, spike_threshold=None, reset_interval=None),
        ):
            got, _, _ = run(tx, params, steps, jax.jit(tx.update))
            chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------
# StableAdamW


@pytest.mark.parametrize("complex_params", [False, True])
@pytest.mark.parametrize(("b2", "clip_threshold"), [(0.999, 1.0), (0.95, 1.0), (0.99, 2.0)])
def test_stable_adamw_matches_numpy_reference(b2, clip_threshold, complex_params):
    hyper = {"lr": 1e-2, "b1": 0.9, "b2": b2, "eps": 1e-8, "weight_decay": 0.1}
    spikes = [(5, "kernel", 20.0), (6, "bias", 50.0), (15, "scale", 1e3), (20, "kernel", 5.0)]
    params, steps = params_tree(1), grad_steps(30, seed=1, spikes=spikes)
    if complex_params:  # the RMS and the second moment take |g|
        params, steps = as_complex(params, params_tree(11)), as_complex(steps, grad_steps(30, 11))
    want, want_rms = stable_adamw_reference(params, steps, clip_threshold=clip_threshold, **hyper)
    tx = stable_adamw(1e-2, b2=b2, weight_decay=0.1, clip_threshold=clip_threshold)
    update = jax.jit(tx.update)
    state, got, rms = tx.init(params), [], []
    for g in steps:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        got.append(u)
        rms.append(float(state[0].max_rms))
    assert_updates_close(got, want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(rms, want_rms, rtol=1e-5)
    assert np.sum(want_rms > clip_threshold) >= 3  # the reference did clip


def test_stable_adamw_divides_each_tensor_by_its_own_rms():
    """A spike in one tensor shrinks that tensor's step only, weight decay included."""
    params = params_tree()
    quiet = grad_steps(8)
    spiked = [*quiet[:-1], {**quiet[-1], "kernel": quiet[-1]["kernel"] * 30.0}]
    ours, theirs = stable_adamw(1e-2, weight_decay=0.5), optax.adamw(1e-2, weight_decay=0.5)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for g in spiked:  # same params every step: the moments evolve alike, only steps differ
        got, s_ours = ours.update(g, s_ours, params)
        want, s_theirs = theirs.update(g, s_theirs, params)
    ratio = np.asarray(got["kernel"] / want["kernel"])
    np.testing.assert_allclose(ratio, 1.0 / float(s_ours[0].max_rms), rtol=1e-5)
    np.testing.assert_allclose(got["bias"], want["bias"], rtol=1e-6)
    assert float(s_ours[0].max_rms) > 2 and float(s_ours[0].clip_fraction) >= 1 / 3


@settings(deadline=None, max_examples=25)
@given(
    hnp.arrays(np.float32, (6, 3), elements=st.floats(-1e6, 1e6, width=32)),
    st.floats(0.05, 5.0),
    st.integers(1, 4),
)
def test_stable_adam_factor_is_min_one_threshold_over_rms(last, clip_threshold, n_before):
    """Property: the step is Adam's times min(1, c / RMS), the same factor on every entry."""
    grads = [{"w": jnp.full((6, 3), 0.1)}] * n_before + [{"w": jnp.asarray(last)}]
    ours, adam = _stable_vs_adam(_stacked(grads), clip_threshold)
    rms = float(ours[1])
    factor = min(1.0, clip_threshold / rms) if rms > 0 else 1.0
    np.testing.assert_allclose(ours[0], factor * np.asarray(adam), rtol=2e-5, atol=1e-30)
    assert np.all(np.isfinite(ours[0]))


@jax.jit
def _stable_vs_adam(grads, clip_threshold):
    def body(carry, g):
        s_ours, s_adam = carry
        u_ours, s_ours = ours.update(g, s_ours)
        u_adam, s_adam = adam.update(g, s_adam)
        return (s_ours, s_adam), (u_ours["w"], s_ours.max_rms, u_adam["w"])

    ours = scale_by_stable_adam(clip_threshold=clip_threshold)
    adam = optax.scale_by_adam()
    first = jax.tree.map(lambda x: x[0], grads)
    _, (u_ours, rms, u_adam) = jax.lax.scan(body, (ours.init(first), adam.init(first)), grads)
    return (u_ours[-1], rms[-1]), u_adam[-1]


def test_stable_adam_zero_gradients_are_not_a_skipped_step_even_with_eps_zero():
    """0 / max(0, eps**2) in the RMS would be NaN and skip every step: it is 0."""
    tx = scale_by_stable_adam(eps=0.0)
    grads = {"w": jnp.zeros(3), "b": jnp.array([0.5, 1.0])}
    state = tx.init(grads)
    for _ in range(3):
        u, state = tx.update(grads, state)
    assert float(state.nonfinite) == 0.0 and int(state.count) == 3
    np.testing.assert_allclose(u["b"], 1.0, rtol=1e-5)
    assert float(state.max_rms) == pytest.approx(1.0, rel=1e-5)


# --------------------------------------------------------------------------------------------
# SPAM


@pytest.mark.parametrize("complex_params", [False, True])
@pytest.mark.parametrize(("delta_t", "n_warmup", "delay"), [(10, 4, 3), (7, 0, 1), (12, 6, 5)])
def test_spam_matches_reference_code_over_resets(delta_t, n_warmup, delay, complex_params):
    hyper = {"lr": 1e-2, "b1": 0.9, "b2": 0.9, "eps": 1e-8, "weight_decay": 0.1}
    spikes = [
        (4, "kernel", 100.0),
        (13, "bias", 300.0),
        (22, "scale", 1e3),
        (31, "kernel", 50.0),
        (delta_t + 1, "bias", 200.0),
    ]
    params, steps = params_tree(2), grad_steps(40, seed=2, spikes=spikes)
    if complex_params:  # spikes judged and clipped by |g|, keeping the phase
        params, steps = as_complex(params, params_tree(12)), as_complex(steps, grad_steps(40, 12))
    want, fractions, scales = spam_reference(
        params, steps, theta=50.0, delta_t=delta_t, n_warmup=n_warmup, delay=delay, **hyper
    )
    tx = spam(
        1e-2,
        b2=0.9,
        weight_decay=0.1,
        spike_threshold=50.0,
        reset_interval=delta_t,
        warmup_steps=n_warmup,
        spike_delay=delay,
        count_spikes=True,
    )
    update = jax.jit(tx.update)
    state, got, tel = tx.init(params), [], []
    for g in steps:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        got.append(u)
        tel.append((float(state[0].spike_fraction), float(state[0].scale)))
    assert_updates_close(got, want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.array(tel), np.stack([fractions, scales], 1), rtol=1e-5)
    assert np.sum(fractions > 0) >= 3 and np.sum(scales < 1) >= n_warmup  # both did something


def test_spam_clips_a_spike_to_sqrt_theta_v_keeping_its_sign():
    tx = scale_by_spam(
        b1=0.0, b2=0.5, spike_threshold=4.0, reset_interval=None, spike_delay=1, count_spikes=True
    )
    state = tx.init({"w": jnp.zeros(2)})
    _, state = tx.update({"w": jnp.array([1.0, 1.0])}, state)  # v = 0.5
    _, state = tx.update({"w": jnp.array([-100.0, 1.0])}, state)
    # -100 clipped to -sqrt(4 * 0.5): v = 0.5 * 0.5 + 0.5 * 2 = 1.25, m = -sqrt(2)
    np.testing.assert_allclose(state.nu["w"], [1.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(state.mu["w"], [-math.sqrt(2.0), 1.0], rtol=1e-6)
    assert float(state.spike_fraction) == 0.5


def test_spam_clips_a_complex_spike_to_sqrt_theta_v_keeping_its_phase():
    tx = scale_by_spam(b1=0.0, b2=0.5, spike_threshold=4.0, reset_interval=None, spike_delay=1)
    state = tx.init({"w": jnp.zeros(2, jnp.complex64)})
    _, state = tx.update({"w": jnp.array([1j, 1.0], jnp.complex64)}, state)  # v = 0.5
    _, state = tx.update({"w": jnp.array([-60 + 80j, 1j], jnp.complex64)}, state)
    # |-60+80j| = 100, clipped to sqrt(2) with its phase (-0.6+0.8j); v = 0.25 + 0.5 * 2
    assert state.nu["w"].dtype == jnp.float32
    np.testing.assert_allclose(state.nu["w"], [1.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(state.mu["w"], [(-0.6 + 0.8j) * math.sqrt(2.0), 1j], rtol=1e-6)


def test_spam_does_not_freeze_entries_that_had_no_gradient_yet():
    """An entry with a zero second moment is not a spike (the reference code zeroes it)."""
    tx = spam(1e-2, reset_interval=50, spike_delay=3)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for step in range(10):
        g = {"w": jnp.array([1.0, 1.0 if step >= 6 else 0.0])}
        u, state = tx.update(g, state, params)
    assert float(u["w"][1]) < -1e-3 and float(state[0].nu["w"][1]) > 0


def test_spam_warmup_cosine_is_computed_once_whatever_the_number_of_tensors():
    # As plain scalar arithmetic XLA copies the warm-up's cosine into every tensor's update
    # kernel, which multiplied compile time on many-leaf trees.
    def cosines(n_tensors):
        params = {f"w{i}": jnp.ones((4, 3)) for i in range(n_tensors)}
        tx = spam(1e-3)
        step = jax.jit(tx.update).lower(params, tx.init(params), params)
        return step.compile().as_text().count(" cosine(")

    assert cosines(2) == cosines(8) >= 1


def test_spam_reset_zeroes_moments_and_restarts_warmup():
    tx = scale_by_spam(reset_interval=5, warmup_steps=3, spike_threshold=None)
    state = tx.init({"w": jnp.zeros(2)})
    scales = []
    for step in range(1, 11):
        _, state = tx.update({"w": jnp.full(2, float(step))}, state)
        scales.append(float(state.scale))
        if step % 5 == 0:  # a reset step: the moments hold this gradient only
            np.testing.assert_allclose(state.mu["w"], 0.1 * step, rtol=1e-6)
            np.testing.assert_allclose(state.nu["w"], 0.001 * step**2, rtol=1e-6)
    ramp = [1 - 0.99 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(3)]
    np.testing.assert_allclose(scales, [1, 1, 1, 1, *ramp, 1, 1, ramp[0]], rtol=1e-6)
    assert int(state.count) == 10  # the step count (bias correction) is never reset


@settings(deadline=None, max_examples=50)
@given(
    hnp.arrays(np.float32, (64,), elements=st.floats(-1e6, 1e6, width=32)),
    # second moments of 0 or normal floats: in float32's subnormal range (v < 1.2e-38, gradients
    # under 1e-19, far below Adam's eps) the rebuilt value loses precision, as documented
    hnp.arrays(
        np.float32, (64,), elements=st.one_of(st.just(0.0), st.floats(2.0**-100, 1e9, width=32))
    ),
    st.floats(1.5, 1e4),
    st.sampled_from([0.5, 0.9, 0.999]),
)
def test_spam_clipped_gradient_is_recovered_from_the_new_moment(g, v, theta, b2):
    """Property: the first moment's clipped gradient, rebuilt from g and the new second moment
    (so the old one need not be read), equals the direct clip against the old moment."""
    g, v = jnp.asarray(g), jnp.asarray(v)
    spike = (v > 0) & (g * g > theta * v)
    direct = jnp.where(spike, jnp.sign(g) * jnp.sqrt(theta * v), g)
    new_v = (1 - b2) * jnp.where(spike, theta * v, g * g) + b2 * v
    rebuilt = _clipped_from_new_moment(g, new_v, jnp.asarray(True), b2, theta)
    np.testing.assert_allclose(rebuilt, direct, rtol=2e-6, atol=1e-30)


@settings(deadline=None, max_examples=25)
@given(
    hnp.arrays(np.float32, (12, 5), elements=st.floats(-(2.0**50), 2.0**50, width=32)),
    st.floats(1.0, 1e4),
)
def test_spam_updates_stay_finite_and_bounded(grads, theta):
    """Property: every direction is finite and within Adam's bound for any finite gradients;
    a clipped entry's magnitude is sqrt(theta * v) exactly."""
    directions, spikes = _spam_directions(jnp.asarray(grads), theta)
    directions = np.asarray(directions)
    assert np.all(np.isfinite(directions))
    # |m_hat / sqrt(v_hat)| <= (1 - b1) / sqrt(1 - b2) / (1 - b1**t) * sqrt(1 - b2**t) <= 3.17/0.1
    assert np.all(np.abs(directions) <= 32.0)
    assert np.all((np.asarray(spikes) >= 0) & (np.asarray(spikes) <= 1))


@jax.jit
def _spam_directions(grads, theta):
    tx = scale_by_spam(
        spike_threshold=theta, reset_interval=5, warmup_steps=2, spike_delay=2, count_spikes=True
    )

    def body(state, g):
        u, state = tx.update({"w": g}, state)
        return state, (u["w"], state.spike_fraction)

    _, out = jax.lax.scan(body, tx.init({"w": grads[0]}), grads)
    return out


# --------------------------------------------------------------------------------------------
# Both: non-finite steps, dtypes, tracing, wrappers, telemetry, checkpoints, errors

OPTIMIZERS = {
    "stable_adamw": lambda **kw: stable_adamw(1e-2, weight_decay=0.1, **kw),
    "spam": lambda **kw: spam(
        1e-2,
        weight_decay=0.1,
        reset_interval=4,
        warmup_steps=2,
        spike_delay=2,
        spike_threshold=10.0,
        **kw,
    ),
    "adam_atan2": lambda **kw: jaxstab.adam_atan2(1e-2, weight_decay=0.1, **kw),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e20])
def test_a_non_finite_tensor_gets_a_zero_update_and_keeps_its_moments(name, bad):
    """Per tensor: "bias" holds a NaN/Inf (1e20: its square overflows) at step 5; it gets zeros
    and keeps its moments, the other tensors get exactly what a finite "bias" would have given
    them, the count advances, ``nonfinite`` counts 1, and every later update stays finite."""
    tx = OPTIMIZERS[name]()
    params = params_tree()
    clean = grad_steps(8, spikes=[(3, "kernel", 30.0)])
    dirty = [*clean[:5], {**clean[5], "bias": clean[5]["bias"].at[1].set(bad)}, *clean[6:]]
    update = jax.jit(tx.update)
    state = tx.init(params)
    for i, g in enumerate(dirty):
        before = state
        u, state = update(g, state, params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
        assert int(state[0].count) == i + 1
        assert float(state[0].nonfinite) == (i == 5)
        if i == 5:
            want_u, want = update(clean[5], before, params)
            np.testing.assert_array_equal(u["bias"], 0.0)
            for moment in ("mu", "nu"):
                got_m, old_m = getattr(state[0], moment), getattr(before[0], moment)
                want_m = getattr(want[0], moment)
                np.testing.assert_array_equal(got_m["bias"], old_m["bias"])
                chex.assert_trees_all_equal(
                    {k: got_m[k] for k in ("kernel", "scale")},
                    {k: want_m[k] for k in ("kernel", "scale")},
                )
            chex.assert_trees_all_equal(
                {k: u[k] for k in ("kernel", "scale")}, {k: want_u[k] for k in ("kernel", "scale")}
            )
        params = optax.apply_updates(params, u)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_with_no_finite_tensor_never_happened(name):
    tx = OPTIMIZERS[name]()
    params = params_tree()
    clean = grad_steps(6)
    dirty = [*clean[:3], jax.tree.map(lambda g: g.at[...].set(np.nan), clean[3]), *clean[3:]]
    update = jax.jit(tx.update)
    want, _, want_state = run(tx, params, clean, update)
    got, _, got_state = run(tx, params, dirty, update)
    chex.assert_trees_all_equal(got[3], jax.tree.map(jnp.zeros_like, got[3]))
    chex.assert_trees_all_equal([*got[:3], *got[4:]], want)
    chex.assert_trees_all_equal(got_state[0].mu, want_state[0].mu)
    chex.assert_trees_all_equal(got_state[0].nu, want_state[0].nu)
    assert int(got_state[0].count) == int(want_state[0].count)


def test_a_tensor_norm_past_float32_is_gated_by_spam_and_handled_by_stable_adamw():
    # Every square is finite (2.25e38) but the bias's sum of squares is not: SPAM's finiteness
    # test (a sum of squares per tensor) gates that tensor; StableAdamW's ratios stay finite.
    params = params_tree()
    g = {**grad_steps(1)[0], "bias": jnp.full(SHAPES["bias"], 1.5e19)}
    tx = spam(1e-3)
    u, state = jax.jit(tx.update)(g, tx.init(params), params)
    assert float(state[0].nonfinite) == 1.0 and int(state[0].count) == 1
    np.testing.assert_array_equal(u["bias"], 0.0)
    assert all(bool(jnp.all(u[k] != 0)) for k in ("kernel", "scale"))
    tx = stable_adamw(1e-3)
    u, state = jax.jit(tx.update)(g, tx.init(params), params)
    assert float(state[0].nonfinite) == 0.0 and int(state[0].count) == 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    want, _ = optax.adamw(1e-3).update(g, optax.adamw(1e-3).init(params), params)
    chex.assert_trees_all_close(u, want, rtol=1e-6)  # the first step: RMS 1, nothing clipped


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_params_keep_float32_statistics(name, dtype):
    tx = OPTIMIZERS[name]()
    params, steps = params_tree(dtype=dtype), grad_steps(6, dtype=dtype)
    got, new_params, state = run(tx, params, steps, jax.jit(tx.update))
    chex.assert_trees_all_equal_dtypes(got[-1], params)
    chex.assert_trees_all_equal_dtypes(new_params, params)
    for leaf in jax.tree.leaves((state[0].mu, state[0].nu)):
        assert leaf.dtype == jnp.float32
    want, _, _ = run(
        tx, params_tree(), [jax.tree.map(lambda x: x.astype(jnp.float32), g) for g in steps]
    )
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), got[-1]), want[-1], rtol=tol, atol=tol * 1e-2
    )


def test_mu_dtype_sets_the_first_moment_dtype_only():
    tx = stable_adamw(1e-2, mu_dtype=jnp.bfloat16)
    _, _, state = run(tx, params_tree(), grad_steps(2))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].mu))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[0].nu))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_retracing(name):
    tx = OPTIMIZERS[name]()
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, state, params):
        return tx.update(grads, state, params)

    run(tx, params_tree(), grad_steps(6), step)


def test_injected_hyperparameters():
    params, steps = params_tree(), grad_steps(10, spikes=[(6, "kernel", 40.0)])
    for factory, fixed in (
        (stable_adamw, {"b2": 0.95, "clip_threshold": 0.5, "weight_decay": 0.1}),
        (
            spam,
            {
                "b2": 0.95,
                "spike_threshold": 20.0,
                "reset_interval": 4,
                "warmup_steps": 2,
                "spike_delay": 2,
            },
        ),
    ):
        want, _, _ = run(factory(1e-2, **fixed), params, steps)
        tx = optax.inject_hyperparams(factory)(learning_rate=1e-2, **fixed)
        got, _, state = run(tx, params, steps, jax.jit(tx.update))
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)
        assert set(fixed) <= set(state.hyperparams)
    # Changing an injected threshold takes effect without a recompile.
    tx = optax.inject_hyperparams(stable_adamw)(learning_rate=1e-2, clip_threshold=1e9)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for g in steps[:7]:
        _, state = update(g, state, params)
    assert float(state.inner_state[0].clip_fraction) == 0.0
    state.hyperparams["clip_threshold"] = jnp.asarray(0.5)
    _, state = update(steps[7], state, params)
    assert float(state.inner_state[0].clip_fraction) > 0.0


def test_telemetry_through_wrappers():
    params, steps = params_tree(), grad_steps(6, spikes=[(5, "kernel", 40.0)])
    tx = optax.chain(
        optax.clip_by_global_norm(1e3),
        optax.inject_hyperparams(stable_adamw)(learning_rate=1e-2, b2=0.95),
    )
    _, _, state = run(tx, params, steps)
    tel = jaxstab.telemetry(state)
    prefix = "1/inner_state/0/scale_by_stable_adam/"
    assert set(tel) == {prefix + f for f in ("clip_fraction", "max_rms", "nonfinite")}
    assert float(tel[prefix + "clip_fraction"]) > 0 and float(tel[prefix + "max_rms"]) > 1
    _, _, state = run(optax.MultiSteps(spam(1e-2), 2), params, steps)
    assert set(jaxstab.telemetry(state)) == {
        f"inner_opt_state/0/scale_by_spam/{f}" for f in ("spike_fraction", "scale", "nonfinite")
    }


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_orbax_round_trip(name, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = OPTIMIZERS[name]()
    params, steps = params_tree(dtype=jnp.bfloat16), grad_steps(10, dtype=jnp.bfloat16)
    update = jax.jit(tx.update)
    _, _, state = run(tx, params, steps[:5], update)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "state", jax.tree.map(jnp.zeros_like, tx.init(params)))
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    continued = [update(g, restored, params)[0] for g in steps[5:]]
    expected = [update(g, state, params)[0] for g in steps[5:]]
    chex.assert_trees_all_equal(continued, expected)


def test_zscore_clip_after_adamw_clips_the_update_norm_by_its_own_zscore():
    """Issue 12 point 4: ``optax.chain(optax.adamw(...), zscore_clip(...))`` clips the *update*.

    After a few hundred steady steps Adam's second moment lags: a 20x gradient spike moves the
    first moment by 2x its size but the second by little, so the update norm jumps. z-score
    clipping of the update catches it; the steady steps before pass untouched.
    """
    params = params_tree()
    base = grad_steps(1)[0]
    steps = [jax.tree.map(lambda x, i=i: x * (1.0 + 0.05 * math.sin(i)), base) for i in range(300)]
    steps.append({**base, "kernel": 20.0 * base["kernel"]})
    grads = _stacked(steps)
    adamw = optax.adamw(1e-2)
    chained = optax.chain(optax.adamw(1e-2), zscore_clip(2.5, warmup_steps=20))
    want, _ = _scan_updates(adamw, params, grads)
    got, state = _scan_updates(chained, params, grads)
    tel = jaxstab.telemetry(state)
    norms = np.array(
        [
            float(jaxstab.global_norm(jax.tree.map(lambda x, i=i: x[i], want)))
            for i in (298, 299, 300)
        ]
    )
    assert norms[2] > 1.3 * norms[1]  # the spike is in the update, not only the gradient
    assert float(tel["1/zscore_clip/grad_norm"]) == pytest.approx(norms[2], rel=1e-5)
    assert bool(tel["1/zscore_clip/clipped"]) and float(tel["1/zscore_clip/scale"]) < 0.9
    last = jax.tree.map(lambda x: x[-1], got)
    assert float(jaxstab.global_norm(last)) < 1.1 * norms[1]
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[:-1], got), jax.tree.map(lambda x: x[:-1], want), rtol=1e-5
    )


def _scan_updates(tx, params, grads):
    """Updates of ``tx`` at fixed ``params`` over stacked ``grads`` (one compile, ``lax.scan``)."""

    @jax.jit
    def scan(params, grads):
        def body(state, g):
            u, state = tx.update(g, state, params)
            return state, u

        state, updates = jax.lax.scan(body, tx.init(params), grads)
        return updates, state

    return scan(params, grads)


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (stable_adamw, {"b1": 1.0}, "b1"),
        (stable_adamw, {"b2": -0.1}, "b2"),
        (stable_adamw, {"eps": -1.0}, "eps"),
        (stable_adamw, {"weight_decay": -1.0}, "weight_decay"),
        (stable_adamw, {"clip_threshold": 0.0}, "clip_threshold"),
        (stable_adamw, {"clip_threshold": float("nan")}, "clip_threshold"),
        (spam, {"spike_threshold": -5.0}, "spike_threshold"),
        (spam, {"reset_interval": 0}, "reset_interval"),
        (spam, {"warmup_steps": -1}, "warmup_steps"),
        (spam, {"spike_delay": -2}, "spike_delay"),
        (spam, {"eps_root": -1e-3}, "eps_root"),
    ],
)
def test_bad_hyperparameters_raise_naming_them(factory, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be in .*got"):
        factory(1e-3, **kwargs)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_wrong_trees_and_missing_params_raise(name):
    tx = OPTIMIZERS[name]()
    params = params_tree()
    state = tx.init(params)
    with pytest.raises(ValueError, match="same tree structure"):
        tx.update({"kernel": params["kernel"]}, state, params)
    with pytest.raises(ValueError, match="weight_decay needs the parameters"):
        tx.update(params, state)
