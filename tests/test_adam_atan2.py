"""adam_atan2 (Adam-atan2, Everett et al. 2024): a float64 NumPy reference of the paper's update,
the bound and scale invariance (properties), zero gradients, non-finite tensors, dtypes, tracing,
optax wrappers, skip_anomalies, telemetry, lowering and argument errors."""

from __future__ import annotations

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _lowering import conditionals
from _steps import run
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxstab
from jaxstab.optimizers._adam_atan2 import (
    ScaleByAdamAtan2State,
    adam_atan2,
    atan2_nonnegative,
    scale_by_adam_atan2,
)

SHAPES = {"kernel": (5, 4), "bias": (4,), "conv": (2, 3, 2), "scale": ()}
A, B = 1.27, 1.0


def params_tree(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}


def grad_steps(n, seed=0, dtype=jnp.float32, scale=1.0):
    """``n`` gradient trees of standard normal entries times ``scale`` (exact powers of two and
    float64 scales are applied before the cast)."""
    rng = np.random.default_rng(seed)
    steps = [{k: rng.normal(size=s) * scale for k, s in SHAPES.items()} for _ in range(n)]
    return [{k: jnp.asarray(v, dtype) for k, v in g.items()} for g in steps]


def adam_atan2_reference(
    params, steps, *, lr, b1=0.9, b2=0.999, a=A, b=B, weight_decay=1e-4, mask=None
):
    """The paper's update in float64: Adam's moments and bias correction, then
    ``theta -= lr * (a * atan2(m_hat, b * sqrt(v_hat)) + weight_decay * theta)`` (decoupled, as
    optax.adamw). ``lr`` and ``weight_decay`` may be schedules of the 0-based step; ``mask`` a
    dict of bools."""
    p = {k: np.asarray(x, np.float64) for k, x in params.items()}
    m = {k: np.zeros_like(x) for k, x in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    updates = []
    for t, g in enumerate(steps, 1):
        rate = lr(t - 1) if callable(lr) else lr
        wd = weight_decay(t - 1) if callable(weight_decay) else weight_decay
        u = {}
        for k in p:
            gk = np.asarray(g[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            decay = float(wd) * p[k] if mask is None or mask[k] else 0.0
            u[k] = -float(rate) * (a * np.arctan2(m_hat, b * np.sqrt(v_hat)) + decay)
            p[k] = p[k] + u[k]
        updates.append(u)
    return updates


def assert_updates_close(got, want, rtol, atol=0.0):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=atol, err_msg=f"step {i} {k}")


MASK = {"kernel": True, "bias": False, "conv": True, "scale": False}
CONFIGS = {
    "defaults": ({"learning_rate": 1e-2}, {"lr": 1e-2}),
    "no weight decay": (
        {"learning_rate": 1e-2, "weight_decay": 0.0},
        {"lr": 1e-2, "weight_decay": 0.0},
    ),
    "all hyperparameters, masked decay": (
        {
            "learning_rate": 3e-3,
            "b1": 0.8,
            "b2": 0.95,
            "a": 1.0,
            "b": 0.5,
            "weight_decay": 0.3,
            "mask": MASK,
        },
        {"lr": 3e-3, "b1": 0.8, "b2": 0.95, "a": 1.0, "b": 0.5, "weight_decay": 0.3, "mask": MASK},
    ),
    "schedules, callable mask": (
        {
            "learning_rate": optax.linear_schedule(1e-2, 1e-3, 10),
            "weight_decay": optax.linear_schedule(0.5, 0.05, 8),
            "mask": lambda p: {k: k != "bias" for k in p},
        },
        {
            "lr": optax.linear_schedule(1e-2, 1e-3, 10),
            "weight_decay": optax.linear_schedule(0.5, 0.05, 8),
            "mask": {k: k != "bias" for k in SHAPES},
        },
    ),
}


class ReferenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_the_numpy_reference(self):
        for name, (kwargs, ref_kwargs) in CONFIGS.items():
            params, steps = params_tree(1), grad_steps(12, seed=1)
            steps[7]["kernel"] = steps[7]["kernel"] * 50.0  # a spike: the bound at work
            want = adam_atan2_reference(params, steps, **ref_kwargs)
            tx = adam_atan2(**kwargs)
            got, _, state = run(tx, params, steps, self.variant(tx.update))
            # float32 rounds 1 - 0.999 ** t and friends as optax does: ~1e-5 of a ratio, more
            # of a first moment that nearly cancels; atol is 1e-5 of the learning rate
            assert_updates_close(got, want, rtol=2e-5, atol=1e-7)
            assert int(state[0].count) == 12 and float(state[0].nonfinite) == 0.0, name

    @chex.variants(with_jit=True, without_jit=True)
    def test_weight_decay_sits_where_optax_adamw_puts_it(self):
        """Chained by hand the optax way: direction, then add_decayed_weights (mask included),
        then the learning rate."""
        lr, wd = optax.linear_schedule(1e-2, 1e-3, 10), 0.2
        params, steps = params_tree(2), grad_steps(8, seed=2)
        by_hand = optax.chain(
            scale_by_adam_atan2(b2=0.95),
            optax.add_decayed_weights(wd, MASK),
            optax.scale_by_learning_rate(lr),
        )
        want, _, _ = run(by_hand, params, steps)
        tx = adam_atan2(lr, b2=0.95, weight_decay=wd, mask=MASK)
        got, _, _ = run(tx, params, steps, self.variant(tx.update))
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-10)  # XLA's fusion rounds


def test_the_first_step_is_a_atan2_one_b_whatever_the_gradient():
    tx = scale_by_adam_atan2(b=0.5)
    g = {"w": jnp.array([1e-15, -3.0, 7e15, 0.0])}
    u, _ = tx.update(g, tx.init(g))
    want = A * math.atan2(1.0, 0.5)
    np.testing.assert_allclose(u["w"], [want, -want, want, 0.0], rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The vectorized atan2


def _ulps(got, want):
    """``|got - want|`` in float32 units in the last place of ``want`` (float64)."""
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return np.abs(np.asarray(got, np.float64) - want) / ulp


@pytest.mark.parametrize("seed", [0, 1])
def test_atan2_nonnegative_is_within_1_5_ulp_over_the_whole_float32_range(seed):
    """Against float64 NumPy over magnitudes from 1e-30 to 1e30 on either side, both orderings
    of |y| and x, the exact diagonal and ordinary values; XLA's own atan2 is within 1.3 ulp."""
    rng = np.random.default_rng(seed)
    n = 200_000
    y = (rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n)).astype(np.float32)
    x = np.abs(rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n)).astype(np.float32)
    y[:1000], x[:1000] = rng.standard_normal(1000), np.abs(rng.standard_normal(1000))
    y[1000:1100] = x[1000:1100] * rng.choice([-1, 1], 100)  # atan2 = +-pi/4
    got = jax.jit(atan2_nonnegative)(jnp.asarray(y), jnp.asarray(x))
    want = np.arctan2(y.astype(np.float64), x.astype(np.float64))
    normal = np.abs(want) >= np.finfo(np.float32).tiny
    assert normal.mean() > 0.9
    assert _ulps(got, want)[normal].max() <= 1.5
    assert np.all(np.asarray(got)[~normal] == 0)  # results under float32's range flush to 0


def test_atan2_nonnegative_edges():
    y = jnp.array([0.0, -0.0, 1.0, -1.0, 0.0, jnp.inf, -jnp.inf, jnp.nan, 1.0, 3e38, 2e-38])
    x = jnp.array([0.0, 0.0, 0.0, 0.0, 5.0, 1.0, 1e30, 1.0, jnp.nan, 3e38, 2e-38])
    got = np.asarray(atan2_nonnegative(y, x))
    half_pi = np.float32(np.pi / 2)
    want = [0.0, -0.0, half_pi, -half_pi, 0.0, half_pi, -half_pi, np.nan, np.nan]
    np.testing.assert_array_equal(got[:9], np.asarray(want, np.float32))
    np.testing.assert_allclose(got[9:], np.pi / 4, rtol=1e-7)


def test_atan2_nonnegative_in_float64_is_lax_atan2(enable_x64):
    with enable_x64(True):
        y, x = jnp.array([1e-300, -2.0, 7.0]), jnp.array([3e-300, 1.0, 1e200])
        np.testing.assert_array_equal(atan2_nonnegative(y, x), jax.lax.atan2(y, x))


# --------------------------------------------------------------------------------------------
# Properties: the bound, scale invariance


@jax.jit
def _update_trajectory(grads, lr, a, b, b1, b2):
    """The updates of ``adam_atan2`` (no weight decay) over stacked ``grads``, hyperparameters
    traced: one compile for every example."""
    tx = adam_atan2(lr, b1, b2, a=a, b=b, weight_decay=0.0)

    def body(state, g):
        u, state = tx.update({"w": g}, state)
        return state, u["w"]

    _, updates = jax.lax.scan(body, tx.init({"w": grads[0]}), grads)
    return updates


@settings(deadline=None, max_examples=30)
@given(
    hnp.arrays(np.float32, (8, 16), elements=st.floats(-(2.0**50), 2.0**50, width=32)),
    st.floats(1e-5, 1.0),
    st.floats(0.1, 3.0),
    st.floats(1e-3, 10.0),
    st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    st.sampled_from([0.0, 0.9, 0.999, 0.99999]),
)
def test_every_update_is_finite_and_within_lr_a_pi_over_2(grads, lr, a, b, b1, b2):
    updates = np.asarray(_update_trajectory(jnp.asarray(grads), lr, a, b, b1, b2))
    assert np.all(np.isfinite(updates))
    bound = np.float32(lr) * np.float32(a) * np.float32(math.pi / 2)
    assert np.all(np.abs(updates) <= bound * (1 + 1e-6))
    # a zero gradient from the start (zero moments) stays a zero update: atan2(0, 0) = 0
    zero_columns = np.all(grads == 0, axis=0)
    assert np.all(updates[:, zero_columns] == 0)


_MODERATE = st.one_of(
    st.just(0.0),
    st.floats(2.0**-13, 2.0**13, width=32),
    st.floats(-(2.0**13), -(2.0**-13), width=32),
)


@settings(deadline=None, max_examples=30)
@given(
    hnp.arrays(np.float32, (6, 16), elements=_MODERATE),
    st.integers(-30, 30),
    st.sampled_from([0.9, 0.99, 0.999]),
)
def test_scaling_every_gradient_changes_no_update(grads, k, b2):
    """Property: gradients times 2**k (exact in float32 while the squares stay normal) give the
    same updates at every step: no epsilon to break the invariance."""
    plain = _update_trajectory(jnp.asarray(grads), 1e-2, A, B, 0.9, b2)
    scaled = _update_trajectory(jnp.asarray(grads * np.float32(2.0**k)), 1e-2, A, B, 0.9, b2)
    np.testing.assert_allclose(scaled, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", [1e-12, 1e15])
def test_scale_invariance_where_adam_is_not(scale):
    """Gradients times 1e-12 or 1e15 in float32: the same updates as unscaled ones (to float32
    rounding), at every step; optax.adam's eps shrinks its steps at 1e-12 to almost nothing."""
    params = params_tree()
    tx = adam_atan2(1e-2, weight_decay=0.0)
    update = jax.jit(tx.update)
    want, _, _ = run(tx, params, grad_steps(10), update)
    got, _, state = run(tx, params, grad_steps(10, scale=scale), update)
    assert_updates_close(got, want, rtol=2e-5, atol=1e-12)
    assert float(state[0].nonfinite) == 0.0
    if scale < 1:
        adam, _, _ = run(optax.adam(1e-2), params, grad_steps(10, scale=scale))
        assert float(jnp.max(jnp.abs(adam[-1]["kernel"]))) < 1e-3 * 1e-2


def test_scale_invariance_at_1e20_and_1e_minus_20_with_float64(enable_x64):
    """float64 parameters keep float64 moments: 1e-20 and 1e20 gradients step as unit ones."""
    with enable_x64(True):
        params = params_tree(dtype=jnp.float64)
        tx = adam_atan2(1e-2, weight_decay=0.0)
        update = jax.jit(tx.update)
        want, _, _ = run(tx, params, grad_steps(10, dtype=jnp.float64), update)
        assert want[0]["kernel"].dtype == jnp.float64
        for scale in (1e-20, 1e20):
            steps = grad_steps(10, dtype=jnp.float64, scale=scale)
            got, _, state = run(tx, params, steps, update)
            assert_updates_close(got, want, rtol=1e-12, atol=1e-18)
            assert state[0].nu["kernel"].dtype == jnp.float64


def test_float32_gradients_below_the_moment_range_step_by_their_sign():
    """(1 - b2) * g**2 under float32's smallest normal number: the second moment underflows to 0
    and atan2(m, 0) = +-pi/2, a bounded sign step, never NaN. Zeros stay zeros."""
    tx = scale_by_adam_atan2()
    g = {"w": jnp.array([1e-20, -3e-21, 0.0, 2e-19], jnp.float32)}
    state = tx.init(g)
    for _ in range(3):
        u, state = tx.update(g, state)
    bound = A * math.pi / 2
    np.testing.assert_allclose(u["w"], [bound, -bound, 0.0, bound], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Zero gradients, non-finite tensors


def test_zero_gradients_with_zero_moments_give_zero_updates_not_nan():
    params = params_tree()
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = adam_atan2(1e-2, weight_decay=0.0)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(3):
        u, state = update(zeros, state, params)
        chex.assert_trees_all_equal(u, zeros)
    assert int(state[0].count) == 3 and float(state[0].nonfinite) == 0.0
    chex.assert_trees_all_equal(state[0].mu, zeros)
    # with weight decay the step is the decay alone: -lr * wd * param
    tx = adam_atan2(1e-2, weight_decay=0.5)
    u, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    chex.assert_trees_all_close(u, jax.tree.map(lambda p: -5e-3 * p, params), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Dtypes, tracing, wrappers, telemetry


def test_mu_dtype_sets_the_first_moment_dtype_only():
    tx = adam_atan2(1e-2, mu_dtype=jnp.bfloat16)
    _, _, state = run(tx, params_tree(), grad_steps(2))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].mu))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[0].nu))


def test_injected_hyperparameters():
    params, steps = params_tree(), grad_steps(8)
    fixed = {"b2": 0.95, "a": 1.1, "b": 0.8, "weight_decay": 0.1}
    want, _, _ = run(adam_atan2(1e-2, **fixed), params, steps)
    tx = optax.inject_hyperparams(adam_atan2)(learning_rate=1e-2, **fixed)
    update = jax.jit(tx.update)
    got, _, state = run(tx, params, steps, update)
    # injected hyperparameters are float32 arrays, not weakly typed Python floats: 1 - b2 rounds
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)
    assert set(fixed) <= set(state.hyperparams)
    # Changing an injected hyperparameter takes effect without a recompile: a scales the step.
    traces = []

    @jax.jit
    def step(grads, state, params):
        traces.append(1)
        return tx.update(grads, state, params)

    state = tx.init(params)
    state.hyperparams["weight_decay"] = jnp.asarray(0.0, jnp.float32)
    u1, _ = step(steps[0], state, params)
    state.hyperparams["a"] = jnp.asarray(2.2, jnp.float32)
    u2, _ = step(steps[0], state, params)
    chex.assert_trees_all_close(u2, jax.tree.map(lambda x: 2 * x, u1), rtol=1e-6)
    assert len(traces) == 1


def test_multisteps_accumulates_then_steps_as_adam_atan2_on_the_mean():
    params, steps = params_tree(), grad_steps(8)
    means = [jax.tree.map(lambda x, y: (x + y) / 2, *steps[i : i + 2]) for i in range(0, 8, 2)]
    want, _, _ = run(adam_atan2(1e-2), params, means)
    tx = optax.MultiSteps(adam_atan2(1e-2), every_k_schedule=2)
    got, _, state = run(tx, params, steps, jax.jit(tx.update))
    chex.assert_trees_all_close(got[1::2], want, rtol=1e-5, atol=1e-9)
    chex.assert_trees_all_equal(got[0::2], [jax.tree.map(jnp.zeros_like, params)] * 4)
    assert set(jaxstab.telemetry(state)) == {"inner_opt_state/0/scale_by_adam_atan2/nonfinite"}


def test_under_skip_anomalies_a_skipped_step_never_happened_bit_for_bit():
    """The guard skips the whole step (a NaN anywhere, an outlying norm); the inner moments and
    count are left exactly as they were."""
    params, clean = params_tree(), grad_steps(12)
    nan_step = {**clean[0], "conv": clean[0]["conv"].at[0, 1, 1].set(np.nan)}
    dirty = [*clean[:4], nan_step, *clean[4:9], nan_step, *clean[9:]]
    tx = jaxstab.skip_anomalies(adam_atan2(1e-2, weight_decay=0.1), warmup_steps=3)
    update = jax.jit(tx.update)
    _, p_clean, s_clean = run(tx, params, clean, update)
    got, p_dirty, s_dirty = run(tx, params, dirty, update)
    for i in (4, 10):
        chex.assert_trees_all_equal(got[i], jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(p_dirty, p_clean)
    chex.assert_trees_all_equal(s_dirty.inner_state, s_clean.inner_state)
    assert int(s_dirty.skipped_total) == 2 and int(s_dirty.inner_state[0].count) == 12
    tel = jaxstab.telemetry(s_dirty)
    assert float(tel["skip_anomalies/inner_state/0/scale_by_adam_atan2/nonfinite"]) == 0.0
    assert float(tel["skip_anomalies/skipped_total"]) == 2.0


def test_telemetry_counts_the_gated_tensors():
    tx = optax.chain(optax.scale(1.0), adam_atan2(1e-2))
    params = params_tree()
    state = tx.init(params)
    g = {**grad_steps(1)[0], "bias": jnp.full(4, np.nan), "scale": jnp.asarray(np.inf)}
    _, state = tx.update(g, state, params)
    tel = jaxstab.telemetry(state)
    assert set(tel) == {"1/0/scale_by_adam_atan2/nonfinite"}
    assert float(tel["1/0/scale_by_adam_atan2/nonfinite"]) == 2.0
    assert isinstance(state[1][0], ScaleByAdamAtan2State)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_no_conditional_in_the_gpu_and_tpu_lowering(platform):
    params = {**params_tree(), "half": jnp.ones((5, 3), jnp.bfloat16)}
    tx = adam_atan2(1e-3, weight_decay=0.1)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    assert conditionals(step, params, tx.init(params), params, platform=platform) == []


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"b1": 1.0}, "b1"),
        ({"b1": -0.1}, "b1"),
        ({"b2": 1.0}, "b2"),
        ({"a": 0.0}, "a"),
        ({"a": -1.27}, "a"),
        ({"a": float("inf")}, "a"),
        ({"a": float("nan")}, "a"),
        ({"b": 0.0}, "b"),
        ({"b": -1.0}, "b"),
        ({"weight_decay": -1e-4}, "weight_decay"),
    ],
)
def test_bad_hyperparameters_raise_naming_them(kwargs, name):
    for factory in (lambda: adam_atan2(1e-3, **kwargs), lambda: scale_by_adam_atan2(**kwargs)):
        with pytest.raises(ValueError, match=rf"^{name} must be in .*got"):
            factory()


def test_wrong_types_raise_type_errors():
    with pytest.raises(TypeError, match=r"^a must be a real number"):
        adam_atan2(1e-3, a="1.27")
    with pytest.raises(TypeError, match="positional"):
        adam_atan2(1e-3, 0.9, 0.999, 1e-8)  # optax.adamw's eps has no place here


def test_complex_parameters_raise_naming_the_leaf():
    params = {"w": jnp.ones(3), "z": jnp.ones(2, jnp.complex64)}
    with pytest.raises(TypeError, match=r"real parameters .*complex64 at z"):
        adam_atan2(1e-3).init(params)
    tx = scale_by_adam_atan2()
    state = tx.init({"z": jnp.ones(2)})
    with pytest.raises(TypeError, match="real gradients"):
        tx.update({"z": jnp.ones(2, jnp.complex64)}, state)


def test_wrong_trees_and_missing_params_raise():
    tx = adam_atan2(1e-3)
    params = params_tree()
    state = tx.init(params)
    with pytest.raises(ValueError, match="same tree structure"):
        tx.update({"kernel": params["kernel"]}, state, params)
    with pytest.raises(ValueError, match="weight_decay needs the parameters"):
        tx.update(params, state)


# --------------------------------------------------------------------------------------------
# Several devices (run by `make test` with 8 simulated CPU devices)


@pytest.mark.multidevice
def test_shard_map_with_axis_name_matches_single_device(run_steps, run_steps_in_shard_map):
    """Each device holds a shard of every tensor; axis_name makes the finiteness check global, so
    a NaN in one device's shard gates the whole tensor on every device."""
    rng = np.random.default_rng(0)
    params = {
        "a": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(32, 4)), jnp.float32),
    }
    steps = [jax.tree.map(lambda p, i=i: p * (0.5 + 0.1 * i), params) for i in range(5)]
    steps[3] = {**steps[3], "b": steps[3]["b"].at[5, 2].set(np.nan)}  # on the first device only
    tx = lambda **kw: adam_atan2(1e-2, b2=0.95, weight_decay=0.1, **kw)
    want, want_state = run_steps(tx(), params, steps)
    got, tel = run_steps_in_shard_map(tx(axis_name="data"), params, steps)
    for g, w in zip(got, want, strict=True):
        chex.assert_trees_all_close(g, w, rtol=2e-5, atol=1e-8)
    np.testing.assert_array_equal(got[3]["b"], 0.0)
    assert float(tel["0/scale_by_adam_atan2/nonfinite"]) == 0.0  # the last step was clean
    assert float(jaxstab.telemetry(want_state)["0/scale_by_adam_atan2/nonfinite"]) == 0.0
