"""skip_anomalies, DynamicLossScale and all_finite."""

from __future__ import annotations

import functools
import re

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
from jaxstab import _inplace
from jaxstab.adaptive import zscore_clip
from jaxstab.guards import DynamicLossScale, all_finite, dynamic_loss_scale, skip_anomalies

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.5, -0.5])}


def grads_with_norm(g):
    """Gradients shaped like PARAMS whose global norm is ``g`` (NaN/Inf propagate)."""
    unit = jax.tree.map(lambda p: p + 0.25, PARAMS)
    norm = optax.tree.norm(unit)
    return jax.tree.map(lambda u: u * (g / norm), unit)


@functools.cache
def jitted_step(tx):
    chex.clear_trace_counter()  # counts are per source: start this transformation's from 0

    @chex.assert_max_traces(n=1)  # every run below also checks that nothing retraces
    def step(params, state, g):
        updates, state = tx.update(grads_with_norm(g), state, params)
        return optax.apply_updates(params, updates), state, updates

    return jax.jit(step)


def train(tx, norms, params=PARAMS, state=None):
    """Runs the norms through ``tx`` with parameter updates; returns params, state, per-step
    (skipped, updates)."""
    state = tx.init(params) if state is None else state
    skipped, updates = [], []
    for g in norms:
        params, state, u = jitted_step(tx)(params, state, jnp.float32(g))
        skipped.append(bool(state.skipped))
        updates.append(u)
    return params, state, np.array(skipped), updates


def healthy(n, seed=0):
    return np.random.default_rng(seed).lognormal(0.0, 0.1, n).astype(np.float32)


INNERS = {
    "adam": lambda: optax.adam(1e-2),
    "chain(clip, adamw)": lambda: optax.chain(
        jaxstab.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)
    ),
    "scheduled sgd": lambda: optax.inject_hyperparams(optax.sgd)(
        learning_rate=optax.linear_schedule(0.1, 0.01, 20), momentum=0.9
    ),
    "jitted adam": lambda: (lambda t: optax.GradientTransformation(t.init, jax.jit(t.update)))(
        optax.adam(1e-2)
    ),
    "zscore_clip+adam": lambda: optax.chain(zscore_clip(warmup_steps=3), optax.adam(1e-2)),
    # Per-unit and per-tensor transforms zero only a non-finite unit or tensor themselves; the
    # guard around them skips the whole step, their state included.
    "chain(adaptive_grad_clip, adam)": lambda: optax.chain(
        jaxstab.adaptive_grad_clip(0.05), optax.adam(1e-2)
    ),
    "chain(adagc, adam)": lambda: optax.chain(jaxstab.adagc(warmup_steps=3), optax.adam(1e-2)),
    "stable_adamw": lambda: jaxstab.stable_adamw(1e-2, weight_decay=0.1),
    "spam": lambda: jaxstab.spam(1e-2, reset_interval=10, warmup_steps=3),
    "adam_atan2": lambda: jaxstab.adam_atan2(1e-2),
}


@pytest.mark.parametrize("inner", list(INNERS))
def test_skipped_steps_never_happened_bit_for_bit(inner):
    norms = healthy(40)
    bad_at, bad = [2, 15, 16, 30, 33], [np.nan, np.inf, 1e6, np.nan, 50.0]
    dirty = norms.copy()
    for i, b in zip(bad_at, bad, strict=True):
        dirty = np.insert(dirty, i, b)
    tx = skip_anomalies(INNERS[inner](), warmup_steps=5, max_norm=1e5)
    p_clean, s_clean, skipped_clean, _ = train(tx, norms)
    p_dirty, s_dirty, skipped_dirty, updates = train(tx, dirty)
    assert not skipped_clean.any()
    np.testing.assert_array_equal(np.flatnonzero(skipped_dirty), bad_at)
    for i in bad_at:
        chex.assert_trees_all_equal(updates[i], jax.tree.map(jnp.zeros_like, PARAMS))
    chex.assert_trees_all_equal(p_dirty, p_clean)
    chex.assert_trees_all_equal(s_dirty.inner_state, s_clean.inner_state)
    assert int(s_dirty.skipped_total) == len(bad_at)


def test_skipped_step_leaves_adam_state_exactly_as_it_was():
    tx = skip_anomalies(optax.adam(1e-2), warmup_steps=2)
    params, state, _, _ = train(tx, [1.0, 1.1, 0.9])
    before = state.inner_state
    for bad in (np.nan, np.inf, -np.inf, 1e4):
        params, state, skipped, _ = train(tx, [bad], params, state)
        assert skipped[0]
        chex.assert_trees_all_equal(state.inner_state, before)
    assert int(state.inner_state[0].count) == 3


def test_no_healthy_step_after_a_nan_or_a_spike_is_skipped():
    norms = healthy(200, seed=1)
    norms[[50, 120]] = np.nan
    norms[[80, 81, 82, 150]] = [40.0, 35.0, 60.0, 1e3]
    _, state, skipped, _ = train(skip_anomalies(optax.sgd(0.1)), norms)
    np.testing.assert_array_equal(np.flatnonzero(skipped), [50, 80, 81, 82, 120, 150])
    # No spike entered the statistics or the peak: both still describe the healthy norms.
    assert float(state.stats.mean) < 1.2 and float(state.peak) < 1.5
    assert float(state.threshold) < 4.5  # three times the peak: the z-score's limit is lower


def test_a_lasting_change_of_level_is_learned_not_skipped_forever():
    norms = np.concatenate([healthy(100), 4.0 * healthy(200, seed=2)])
    _, _, skipped, _ = train(skip_anomalies(optax.sgd(0.1)), norms)
    assert 0 < skipped.sum() <= 40
    assert not skipped[160:].any()


def test_warmup_and_max_norm_and_telemetry():
    tx = optax.chain(
        jaxstab.clip_by_global_norm(10.0), skip_anomalies(optax.sgd(0.1), max_norm=5.0)
    )
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    for g in (1.0, 50.0, 6.0):  # warm-up: only max_norm applies (after the outer clip to 10)
        _, state = update(grads_with_norm(g), state, PARAMS)
    tele = jaxstab.telemetry(state)
    assert {k for k in tele if k.startswith("1/")} == {
        "1/skip_anomalies/skipped",
        "1/skip_anomalies/skipped_total",
        "1/skip_anomalies/grad_norm",
        "1/skip_anomalies/threshold",
    }
    assert (
        bool(tele["1/skip_anomalies/skipped"]) and int(tele["1/skip_anomalies/skipped_total"]) == 2
    )
    assert float(tele["1/skip_anomalies/threshold"]) == 5.0


def test_telemetry_reaches_into_the_inner_state():
    tx = skip_anomalies(optax.chain(zscore_clip(warmup_steps=2), optax.adam(1e-2)))
    _, state, _, _ = train(tx, [1.0, 1.0, 1.0])
    tele = jaxstab.telemetry(state)
    assert "skip_anomalies/skipped" in tele
    assert "skip_anomalies/inner_state/0/zscore_clip/grad_norm" in tele


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_no_jit_agree(self):
        tx = skip_anomalies(INNERS["jitted adam"](), warmup_steps=2)  # with a nested jit
        update = self.variant(tx.update)
        reference = jax.jit(tx.update)
        state = ref_state = tx.init(PARAMS)
        for g in (1.0, 1.1, np.nan, 1.0, 30.0):
            got, state = update(grads_with_norm(jnp.float32(g)), state, PARAMS)
            want, ref_state = reference(grads_with_norm(jnp.float32(g)), ref_state, PARAMS)
            chex.assert_trees_all_close((got, state), (want, ref_state), rtol=1e-6)
        assert int(state.skipped_total) == 2


def test_checkpoint_round_trip_mid_run():
    tx = skip_anomalies(optax.adam(1e-2), warmup_steps=3)
    norms = healthy(16)
    norms[[4, 11]] = [np.nan, 100.0]
    p_full, s_full, _, _ = train(tx, norms)
    params, state, _, _ = train(tx, norms[:8])
    blob = flax.serialization.to_bytes((params, state))
    params, state = flax.serialization.from_bytes((PARAMS, tx.init(PARAMS)), blob)
    params, state, _, _ = train(tx, norms[8:], params, state)
    chex.assert_trees_all_equal((params, state), (p_full, s_full))


def test_multisteps_both_ways():
    inside = optax.MultiSteps(skip_anomalies(optax.adam(1e-2)), every_k_schedule=2)
    outside = skip_anomalies(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2))
    for tx in (inside, outside):
        params, state, update = PARAMS, tx.init(PARAMS), jax.jit(tx.update)
        for g in (1.0, 1.0, np.nan, 1.0, 1.0, 1.0):
            updates, state = update(grads_with_norm(jnp.float32(g)), state, params)
            params = optax.apply_updates(params, updates)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    # outside, the NaN mini-batch never reaches the accumulator: 5 mini-batches, 2 emitted steps
    assert int(state.skipped_total) == 1 and int(state.inner_state.gradient_step) == 2
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.inner_state))


def test_inject_hyperparams():
    tx = optax.inject_hyperparams(skip_anomalies, static_args=("inner",))(
        optax.sgd(0.1), z_threshold=3.0, warmup_steps=2
    )
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    for g in (1.0, 1.1, 0.9, 30.0):
        _, state = update(grads_with_norm(jnp.float32(g)), state, PARAMS)
    assert bool(state.inner_state.skipped)


@pytest.mark.parametrize("jit", [False, True])
def test_extra_args_reach_the_inner_transformation(jit):
    seen = []

    def update_fn(updates, state, params=None, *, value=None, **extra):
        seen.append(value)
        return jax.tree.map(lambda g: g * value, updates), state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
    tx = skip_anomalies(inner)
    update = jax.jit(tx.update) if jit else tx.update
    updates, _ = update(grads_with_norm(1.0), tx.init(PARAMS), PARAMS, value=jnp.float32(3.0))
    assert len(seen) == 1 and seen[0] is not None  # traced once: the fast path
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: 3.0 * g, grads_with_norm(1.0)))


def test_state_leaves_that_share_a_value_or_pass_through():
    """Inner states whose new leaves are one shared value, an input, or a constant."""

    def update_fn(updates, state, params=None):
        total = state[0] + 1.0
        return updates, (total, total, state[2], jnp.float32(7.0), updates["b"])

    inner = optax.GradientTransformation(
        lambda p: (jnp.float32(0.0), jnp.float32(10.0), jnp.float32(5.0), jnp.float32(0.0), p["b"]),
        update_fn,
    )
    tx = skip_anomalies(inner, warmup_steps=1)
    state = tx.init(PARAMS)
    _, state = jax.jit(tx.update)(grads_with_norm(1.0), state)
    before = state.inner_state
    _, state = jax.jit(tx.update)(grads_with_norm(jnp.nan), state)
    assert bool(state.skipped)
    chex.assert_trees_all_equal(state.inner_state, before)


def where_per_leaf(inner):
    """The naive skip: ``where(skip, old, new)`` on every inner-state leaf after the update."""

    def update_fn(updates, state, params=None):
        ok = all_finite(updates)
        new_updates, new_state = inner.update(updates, state, params)
        new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        return jax.tree.map(lambda u: jnp.where(ok, u, 0), new_updates), new_state

    return optax.GradientTransformation(inner.init, update_fn)


def state_copies(tx):
    """The copies of param-sized buffers in the compiled, donated optimizer step of ``tx``."""
    params = {"w": jnp.ones((256, 256)), "v": jnp.ones((128, 64))}

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    return re.findall(r"f32\[(?:256,256|128,64)\]\{[^}]*\} copy\(", hlo.as_text())


def test_optimized_step_copies_no_state_buffer():
    """The skip costs no copy of the donated optimizer state (see guards.py)."""
    assert state_copies(where_per_leaf(optax.adam(1e-3)))  # the check finds the naive skip's
    big_copies = state_copies(skip_anomalies(optax.adam(1e-3)))
    assert not big_copies


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0.5, 2.0, width=32), min_size=12, max_size=12), st.integers(0, 11))
def test_property_a_nan_changes_nothing_but_its_own_step(norms, where):
    norms = np.asarray(norms, np.float32)
    _, clean_state, clean, _ = train(PROPERTY_TX, norms)
    _, dirty_state, dirty, _ = train(PROPERTY_TX, np.insert(norms, where, np.nan))
    np.testing.assert_array_equal(dirty, np.insert(clean, where, True))
    chex.assert_trees_all_equal(dirty_state.stats, clean_state.stats)
    chex.assert_trees_all_equal(dirty_state.inner_state, clean_state.inner_state)


PROPERTY_TX = skip_anomalies(optax.sgd(0.1), warmup_steps=3, z_threshold=6.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"z_threshold": 0.0}, "z_threshold"),
        ({"decay": 1.0}, "decay"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"eps": -1.0}, "eps"),
        ({"peak_ratio": -1.0}, "peak_ratio"),
        ({"peak_half_life": 0.0}, "peak_half_life"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        skip_anomalies(optax.sgd(0.1), **kwargs)


def test_low_precision_gradients_keep_their_dtype():
    dtypes = {"w": jnp.float16, "b": jnp.bfloat16}
    params = {k: p.astype(dtypes[k]) for k, p in PARAMS.items()}
    tx = skip_anomalies(optax.adam(1e-2), warmup_steps=1)
    state, update = tx.init(params), jax.jit(tx.update)
    for g in (1.0, jnp.inf, 1.0):
        grads = {k: x.astype(dtypes[k]) for k, x in grads_with_norm(g).items()}
        updates, state = update(grads, state, params)
        for k, u in updates.items():
            assert u.dtype == dtypes[k] and bool(jnp.all(jnp.isfinite(u)))
    assert int(state.skipped_total) == 1


@pytest.mark.multidevice
def test_axis_name_under_shard_map():
    from jax.sharding import Mesh, PartitionSpec

    n = jax.device_count()
    if n < 2:
        pytest.skip("needs several devices")
    mesh = Mesh(np.array(jax.devices()), ("d",))
    spec = PartitionSpec("d")
    tx, sharded = (
        skip_anomalies(optax.sgd(0.1), warmup_steps=2),
        skip_anomalies(optax.sgd(0.1), warmup_steps=2, axis_name="d"),
    )
    update = jax.jit(
        jax.shard_map(
            lambda g, s: sharded.update(g, s),
            mesh=mesh,
            in_specs=({"w": spec}, PartitionSpec()),
            out_specs=({"w": spec}, PartitionSpec()),
        )
    )
    state, s_state = tx.init({"w": jnp.zeros(4 * n)}), sharded.init({"w": jnp.zeros(4 * n)})
    for scale in (1.0, 1.1, 0.9, 50.0, 1.0):
        grads = {"w": jnp.arange(4.0 * n) * scale}
        want, state = tx.update(grads, state)
        got, s_state = update(grads, s_state)
        chex.assert_trees_all_close(got, want, rtol=1e-6)
        assert bool(s_state.skipped) == bool(state.skipped)
    assert int(s_state.skipped_total) == 1


# --------------------------------------------------------------------------------------------
# Any inner transformation (every optax optimizer and more: test_guards_catalogue.py)


def test_nested_jit_returning_a_constant():
    helper = jax.jit(lambda a: (a + 1, jnp.float32(0)))
    inner = optax.GradientTransformation(
        lambda p: (jnp.float32(5), jnp.float32(5)), lambda u, s, p=None: (u, helper(s[0]))
    )
    tx = skip_anomalies(inner, warmup_steps=1)
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    _, state = update(grads_with_norm(jnp.nan), state)
    assert bool(state.skipped) and tuple(map(float, state.inner_state)) == (5.0, 5.0)
    _, state = update(grads_with_norm(1.0), state)
    assert not bool(state.skipped) and tuple(map(float, state.inner_state)) == (6.0, 0.0)


def test_nested_jit_returning_one_value_into_two_leaves():
    helper = jax.jit(lambda c: (lambda n: (n, n))(c + 1))
    inner = optax.GradientTransformation(
        lambda p: (jnp.int32(0), jnp.int32(100)), lambda u, s, p=None: (u, helper(s[0]))
    )
    tx = skip_anomalies(inner, warmup_steps=1)
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    _, state = update(grads_with_norm(jnp.nan), state)
    assert bool(state.skipped) and tuple(map(int, state.inner_state)) == (0, 100)
    _, state = update(grads_with_norm(1.0), state)
    assert tuple(map(int, state.inner_state)) == (1, 1)


def test_a_skipped_step_zeroes_every_update_leaf():
    """Integer and bool update leaves too, each in its dtype; accepted steps pass them through."""

    def update_fn(updates, state, params=None):
        extra = {"steps": jnp.full(3, state + 1), "flag": jnp.ones(2, bool)}
        return {**updates, **extra}, state + 1

    inner = optax.GradientTransformation(lambda p: jnp.int32(0), update_fn)
    tx = skip_anomalies(inner, warmup_steps=1)
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    updates, state = update(grads_with_norm(1.0), state)
    assert updates["steps"].tolist() == [1, 1, 1] and updates["flag"].all()
    updates, state = update(grads_with_norm(jnp.inf), state)
    dtypes = {"w": jnp.float32, "b": jnp.float32, "steps": jnp.int32, "flag": jnp.bool_}
    assert {k: u.dtype for k, u in updates.items()} == dtypes
    assert not any(np.asarray(u).any() for u in updates.values())
    assert int(state.inner_state) == 1


def test_an_error_of_the_inner_update_is_its_own():
    def update_fn(updates, state, params=None):
        raise ValueError("the inner update's own error")

    tx = skip_anomalies(optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn))
    with pytest.raises(ValueError, match="the inner update's own error"):
        tx.update(grads_with_norm(1.0), tx.init(PARAMS), PARAMS)


def test_python_control_flow_on_values_works_outside_jit():
    """An inner that reads a value as a Python number cannot be traced to a jaxpr: the guard runs
    it as it is (the plain path)."""

    def update_fn(updates, state, params=None):
        lr = 0.1 if float(state) < 2 else 0.01
        return jax.tree.map(lambda g: -lr * g, updates), state + 1

    inner = optax.GradientTransformation(lambda p: jnp.float32(0), update_fn)
    tx = skip_anomalies(inner, warmup_steps=1)
    state = tx.init(PARAMS)
    for g, lr, count in [(1.0, 0.1, 1), (jnp.nan, 0.0, 1), (1.0, 0.1, 2), (1.0, 0.01, 3)]:
        updates, state = tx.update(grads_with_norm(g), state)
        want = jax.tree.map(lambda x, lr=lr: -lr * x, grads_with_norm(1.0))  # 0 when skipped
        chex.assert_trees_all_close(updates, want, rtol=1e-6)
        assert float(state.inner_state) == count


@pytest.mark.parametrize("failure", ["raises", "returns another type"])
def test_the_plain_path_takes_over_when_the_re_evaluation_fails(failure, monkeypatch):
    def failing(jaxpr, *args, **kwargs):
        if failure == "raises":
            raise RuntimeError("cannot re-evaluate")
        return [x.astype(jnp.float16) if jnp.issubdtype(x.dtype, jnp.floating) else x
                for x in eval_selecting(jaxpr, *args, **kwargs)]  # fmt: skip

    norms = [1.0, 1.2, np.nan, 0.9, 1e6, 1.1]
    want = train(skip_anomalies(optax.adam(1e-2), warmup_steps=2, max_norm=1e5), norms)
    eval_selecting = _inplace.eval_selecting
    monkeypatch.setattr(_inplace, "eval_selecting", failing)
    got = train(skip_anomalies(optax.adam(1e-2), warmup_steps=2, max_norm=1e5), norms)
    chex.assert_trees_all_close(got[:3], want[:3], rtol=1e-6)
    assert got[2].tolist() == [False, False, True, False, True, False]


@pytest.mark.multidevice
def test_state_keeps_the_sharding_the_inner_gives_it():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if jax.device_count() < 2:
        pytest.skip("needs several devices")
    sharded = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), PartitionSpec("d"))
    helper = jax.jit(lambda m, g: 0.9 * m + g, out_shardings=sharded)

    def update_fn(updates, state, params=None):
        m = helper(state[0], updates["w"])
        v = jax.lax.with_sharding_constraint(0.5 * state[1] + updates["w"], sharded)
        return {"w": -0.1 * m}, (m, v)

    n = 2 * jax.device_count()
    inner = optax.GradientTransformation(lambda p: (jnp.zeros(n), jnp.zeros(n)), update_fn)
    tx = skip_anomalies(inner, warmup_steps=1)
    grads = {"w": jnp.arange(n, dtype=jnp.float32)}
    want_updates, want_state = jax.jit(inner.update)(grads, inner.init(grads))
    update = jax.jit(tx.update)
    for variant in (update, tx.update):  # jit and no jit
        updates, state = variant(grads, tx.init(grads))
        chex.assert_trees_all_close((updates, state.inner_state), (want_updates, want_state))
        skipped_updates, skipped = variant({"w": grads["w"] * jnp.nan}, state)
        assert bool(skipped.skipped)
        chex.assert_trees_all_equal(skipped.inner_state, state.inner_state)
        for got, want in zip(state.inner_state + skipped.inner_state, want_state * 2, strict=True):
            assert got.sharding.is_equivalent_to(want.sharding, got.ndim), got.sharding
        assert not skipped_updates["w"].any()


# --------------------------------------------------------------------------------------------
# Dynamic loss scaling


def test_loss_scale_grows_every_period_and_shrinks_on_overflow_to_the_floor():
    ls = dynamic_loss_scale(8.0, period=3, factor=2.0, min_scale=2.0)
    adjust = jax.jit(DynamicLossScale.adjust)
    history = []
    for finite in [True] * 7 + [False] * 4 + [True]:
        ls = adjust(ls, jnp.asarray(finite))
        history.append((float(ls.loss_scale), int(ls.counter)))
    assert history == [
        (8.0, 1), (8.0, 2), (16.0, 0), (16.0, 1), (16.0, 2), (32.0, 0), (32.0, 1),
        (16.0, 0), (8.0, 0), (4.0, 0), (2.0, 0), (2.0, 1),
    ]  # fmt: skip


def test_loss_scale_never_grows_to_inf():
    ls = dynamic_loss_scale(2.0**127, period=1)
    ls = ls.adjust(True)
    assert float(ls.loss_scale) == 2.0**127


def test_loss_scale_keeps_its_configuration_through_trees_and_checkpoints():
    ls = dynamic_loss_scale(4.0, period=7, factor=3.0, min_scale=0.5)
    leaves, treedef = jax.tree.flatten(ls)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert float(rebuilt.min_scale) == 0.5 and int(rebuilt.period) == 7
    through_jit = jax.jit(lambda x: x)(ls)
    chex.assert_trees_all_equal(through_jit, ls)
    restored = flax.serialization.from_bytes(
        dynamic_loss_scale(), flax.serialization.to_bytes(ls.adjust(False))
    )
    assert float(restored.min_scale) == 0.5 and float(restored.factor) == 3.0
    assert float(restored.loss_scale) == np.float32(4.0 / 3.0) and int(restored.period) == 7


def test_scale_and_unscale_keep_dtypes():
    ls = dynamic_loss_scale(2.0**10)
    loss = jnp.float16(3.0)
    assert ls.scale(loss).dtype == jnp.float16 and float(ls.scale(loss)) == 3072.0
    grads = {"a": jnp.array([2048.0], jnp.float16), "b": jnp.array([1024.0], jnp.bfloat16)}
    out = ls.unscale(grads)
    assert out["a"].dtype == jnp.float16 and float(out["a"][0]) == 2.0
    assert out["b"].dtype == jnp.bfloat16 and float(out["b"][0]) == 1.0


def test_fp16_recipe_skips_the_overflow_step_and_lowers_the_scale():
    params = {"w": jnp.array([1.0, -2.0], jnp.float16)}
    tx = skip_anomalies(optax.sgd(0.01), warmup_steps=1)

    def loss_fn(p, x):
        return jnp.sum((p["w"] * x) ** 2)

    @jax.jit
    def step(params, opt_state, ls, x):
        grads = ls.unscale(jax.grad(lambda p: ls.scale(loss_fn(p, x)))(params))
        ls = ls.adjust(all_finite(grads))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ls

    opt_state, ls = tx.init(params), dynamic_loss_scale(2.0**10, period=1)
    x = jnp.array([0.01, 0.01], jnp.float16)
    scales, skipped = [], []
    for _ in range(10):
        before = params
        params, opt_state, ls = step(params, opt_state, ls, x)
        scales.append(float(ls.loss_scale))
        skipped.append(bool(opt_state.skipped))
        if skipped[-1]:
            chex.assert_trees_all_equal(params, before)
    assert skipped[0] is False  # small gradients fit at 2**10
    assert True in skipped  # the scale doubled every step until the gradients overflowed...
    first = skipped.index(True)
    assert scales[first] < scales[first - 1]  # ...and then came down
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_scale": 0.0}, "min_scale"),
        ({"initial_scale": 0.5}, "initial_scale"),
        ({"period": 0}, "period"),
        ({"factor": 0.5}, "factor"),
    ],
)
def test_loss_scale_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dynamic_loss_scale(**kwargs)


def test_all_finite():
    assert bool(all_finite({"a": jnp.ones(3), "b": None, "c": jnp.arange(3)}))
    assert not bool(all_finite({"a": jnp.ones(3), "b": jnp.array([jnp.nan], jnp.bfloat16)}))
    assert not bool(all_finite([jnp.array([-jnp.inf])]))
    assert bool(all_finite({}))
    assert bool(jax.jit(all_finite)({"a": jnp.full(2, 6e4, jnp.float16)}))
