"""spike_recovery: snapshots, bit-identical rollback, data skipping, escalation, giving up."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstab
from jaxstab import SpikeRecoveryError, spike_recovery

PARAMS = {
    "w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3),
    "h": jnp.array([0.5, -0.25, 0.125], jnp.bfloat16),
    "n": jnp.array([3, 4], jnp.int32),  # an integer leaf rides along untouched
}
# Adam on the float leaves; the integer leaf passes through (zero gradient, masked)
TX = optax.masked(optax.adam(0.05), {"w": True, "h": True, "n": False})
TARGET = {"w": jnp.full((2, 3), 0.3), "h": jnp.full((3,), -0.2)}


def loss_fn(params, bad):
    """1 + a quadratic (a loss that levels off, as real ones do); a ``bad`` batch multiplies it by
    1e3 (a spike), NaN when ``bad`` is NaN."""
    sq = sum(
        jnp.sum((params[k].astype(jnp.float32) - TARGET[k]) ** 2) for k in ("w", "h")
    )
    return (1.0 + sq) * (1.0 + bad * 1e3)


def float_grads(params, bad):
    grads = jax.grad(lambda p: loss_fn({**params, **p}, bad))(
        {k: params[k] for k in ("w", "h")}
    )
    return {**grads, "n": jnp.zeros_like(params["n"])}


@functools.cache
def jitted_step(recovery, grad_norm=False):
    chex.clear_trace_counter()

    @chex.assert_max_traces(n=1)
    def step(params, opt_state, rstate, bad):
        loss = loss_fn(params, bad)
        grads = float_grads(params, bad)
        updates, opt_state = TX.update(grads, opt_state, params)
        norm = optax.tree.norm({k: grads[k] for k in ("w", "h")}) if grad_norm else None
        return recovery.update(loss, params, updates, opt_state, rstate, grad_norm=norm)

    return jax.jit(step)


def run(recovery, bads, *, grad_norm=False):
    """Runs one step per entry of ``bads`` (0 healthy, >0 spike, NaN); returns the final
    (params, opt_state, rstate) and per step the host copies of (params, opt_state) after it and
    the recovery state."""
    params, opt_state = PARAMS, TX.init(PARAMS)
    rstate = recovery.init(params, opt_state)
    history = [(jax.device_get(params), jax.device_get(opt_state), rstate)]
    for bad in bads:
        params, opt_state, rstate = jitted_step(recovery, grad_norm)(
            params, opt_state, rstate, jnp.float32(bad)
        )
        history.append((jax.device_get(params), jax.device_get(opt_state), rstate))
    return params, opt_state, rstate, history


def assert_bit_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def rollbacks(history):
    return [i for i, (_, _, s) in enumerate(history) if bool(s.rolled_back)]


def test_nan_rolls_back_bit_for_bit_to_a_snapshot_before_the_spike():
    recovery = spike_recovery(every=10, warmup_steps=5, min_age=5)
    bads = [0.0] * 47 + [np.nan] + [0.0] * 10
    params, _, rstate, history = run(recovery, bads)
    (at,) = rollbacks(history)
    assert at == 48
    s = history[at][2]
    lost = int(s.steps_lost)
    # snapshots are taken after steps 10, 20, 30, 40; step 40's is 8 steps old (>= min_age)
    assert lost == 8 and int(s.skip_batches) == 20
    assert_bit_identical(history[at][:2], history[at - lost][:2])
    assert history[at][0]["h"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(params["w"]))) and int(rstate.rollbacks_total) == 1


def test_too_recent_snapshot_is_passed_over_for_the_older_one():
    recovery = spike_recovery(every=10, warmup_steps=5, min_age=5)
    bads = [0.0] * 42 + [np.nan]  # step 43: the snapshot of step 40 is only 3 steps old
    *_, history = run(recovery, bads)
    s = history[43][2]
    assert bool(s.rolled_back) and int(s.steps_lost) == 13
    assert_bit_identical(history[43][:2], history[30][:2])
    # the newer snapshot is dropped
    assert 40 not in np.asarray(s.snapshot_step).tolist()


def test_a_snapshot_is_dropped_when_its_own_loss_spikes():
    recovery = spike_recovery(every=10, warmup_steps=5, min_age=0)
    bads = [0.0] * 10 + [np.nan]  # the snapshot of step 10 gets the NaN loss at step 11
    *_, history = run(recovery, bads)
    s = history[11][2]
    assert bool(s.rolled_back)
    assert_bit_identical(history[11][:2], history[0][:2])  # back to the initial state
    assert int(s.steps_lost) == 11


def test_long_healthy_run_never_rolls_back_under_scan():
    recovery = spike_recovery(every=25, warmup_steps=20)
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.normal(0.0, 0.2, 1000), jnp.float32)

    def body(carry, n):
        params, opt_state, rstate = carry
        grads = float_grads(params, 0.0)
        updates, opt_state = TX.update(grads, opt_state, params)
        loss = loss_fn(params, 0.0) * (1.0 + n)  # noisy, converging to 1
        return recovery.update(loss, params, updates, opt_state, rstate), None

    init = (PARAMS, TX.init(PARAMS), recovery.init(PARAMS, TX.init(PARAMS)))
    (_, _, rstate), _ = jax.jit(lambda c: jax.lax.scan(body, c, noise))(init)
    assert int(rstate.rollbacks_total) == 0 and not bool(rstate.gave_up)
    assert int(rstate.step) == 1000
    assert int(jnp.max(rstate.snapshot_step)) == 1000


def scan_run(recovery, n_steps, burst, *, data_len=2000):
    """A training loop under one ``lax.scan`` that owns a data index and skips what it is told:
    batches in ``burst`` (a (start, stop) range of data indices) are corrupted."""

    def body(carry, _):
        params, opt_state, rstate, idx = carry
        bad = ((idx >= burst[0]) & (idx < burst[1])).astype(jnp.float32)
        loss = loss_fn(params, bad)
        updates, opt_state = TX.update(float_grads(params, bad), opt_state, params)
        params, opt_state, rstate = recovery.update(loss, params, updates, opt_state, rstate)
        idx = idx + 1 + rstate.skip_batches
        return (params, opt_state, rstate, idx), (idx, rstate.rolled_back, bad)

    init = (PARAMS, TX.init(PARAMS), recovery.init(PARAMS, TX.init(PARAMS)), jnp.int32(0))
    return jax.jit(lambda c: jax.lax.scan(body, c, None, length=n_steps))(init)


def test_sustained_spike_one_rollback_and_the_loop_skips_the_burst():
    recovery = spike_recovery(every=20, warmup_steps=20, skip_batches=50)
    (params, _, rstate, idx), (idxs, rolled, bad) = scan_run(recovery, 200, (100, 130))
    assert int(rstate.rollbacks_total) == 1
    assert int(np.sum(np.asarray(bad))) == 1  # only the first corrupted batch was ever used
    (at,) = np.flatnonzero(np.asarray(rolled))
    assert int(idxs[at]) == 100 + 1 + 50  # the loop jumped over the rest of the burst
    assert int(idx) == 200 + 50
    assert float(loss_fn(params, 0.0)) < 1.0 + 1e-3


def test_repeated_rollbacks_double_the_skip_until_the_burst_is_passed():
    recovery = spike_recovery(every=20, warmup_steps=20, skip_batches=10, max_rollbacks=5)
    (_, _, rstate, _), (idxs, rolled, bad) = scan_run(recovery, 300, (100, 170))
    at = np.flatnonzero(np.asarray(rolled))
    # first at batch 100, skip 10 -> 111, skip 20 -> 132, skip 40 -> 173: past the burst
    assert [int(idxs[i]) for i in at] == [111, 132, 173]
    assert int(rstate.rollbacks_total) == 3 and not bool(rstate.gave_up)
    assert int(np.sum(np.asarray(bad))) == 3


def test_gives_up_after_max_rollbacks_and_check_names_step_loss_and_statistics():
    recovery = spike_recovery(every=10, warmup_steps=5, max_rollbacks=2, window=100)
    bads = [0.0] * 30 + [np.nan, 0.0, np.nan, 0.0, np.nan] + [0.0] * 5
    params, _, rstate, history = run(recovery, bads)
    assert int(rstate.rollbacks_total) == 2 and bool(rstate.gave_up)
    give_up = 35
    assert bool(history[give_up][2].gave_up) and not bool(history[give_up - 1][2].gave_up)
    # frozen at a good snapshot from then on: finite, and every later step returns the same
    for later in history[give_up + 1 :]:
        assert_bit_identical(later[:2], history[give_up][:2])
        assert_bit_identical(later[2], history[give_up][2])  # the state is frozen too
    assert np.all(np.isfinite(np.asarray(params["w"])))
    with pytest.raises(SpikeRecoveryError, match=r"gave up at step 35: loss nan \(healthy mean"):
        recovery.check(rstate)
    recovery.check(history[give_up - 1][2])  # not given up yet: no error


def test_rollbacks_outside_the_window_do_not_count():
    recovery = spike_recovery(every=5, warmup_steps=5, max_rollbacks=1, window=20)
    bads = [0.0] * 20 + [np.nan] + [0.0] * 30 + [np.nan] + [0.0] * 3
    *_, rstate, _ = run(recovery, bads)
    assert int(rstate.rollbacks_total) == 2 and not bool(rstate.gave_up)


def test_learning_rate_backoff_and_reinit():
    recovery = spike_recovery(
        every=10, warmup_steps=5, min_age=5, lr_backoff=0.25, backoff_steps=3, reinit=TX.init
    )
    bads = [0.0] * 25 + [np.nan] + [0.0] * 5
    *_, history = run(recovery, bads)
    scales = [float(s.lr_scale) for _, _, s in history[26:31]]
    assert scales == [1.0, 0.25, 0.25, 0.25, 1.0]  # the rollback step's own update is dropped
    # the rollback step gives fresh moments (reinit), restored params
    opt_after = history[26][1]
    assert int(opt_after.inner_state[0].count) == 0
    assert_bit_identical(history[26][0], history[20][0])
    # the first step after: the Adam step from fresh moments, a quarter long
    p_before, p_after = history[26][0]["w"], history[27][0]["w"]
    fresh_step = np.abs(np.asarray(p_after) - np.asarray(p_before))
    np.testing.assert_allclose(fresh_step, 0.25 * 0.05, rtol=1e-3)


def test_a_gradient_norm_spike_rolls_back_too():
    recovery = spike_recovery(every=10, warmup_steps=5, z_threshold=4.0)
    # a batch whose loss looks ordinary but whose gradient is 1000x: the loss spikes only later
    bads = [0.0] * 30 + [1.0] + [0.0] * 3
    *_, with_norm = run(recovery, bads, grad_norm=True)
    assert rollbacks(with_norm) == [31]


def test_z_score_and_min_rise_both_needed():
    # the loss statistics are exact after warm-up; a rise under min_rise is no spike
    recovery = spike_recovery(every=100, warmup_steps=3, z_threshold=1.0, min_rise=10.0)
    *_, history = run(recovery, [0.0] * 5 + [0.001] + [0.0] * 2)
    assert rollbacks(history) == []


def test_telemetry_reports_the_controller_not_its_snapshots():
    recovery = spike_recovery(every=3, warmup_steps=2)
    tx = optax.chain(jaxstab.clip_by_global_norm(1.0), optax.sgd(0.1))
    params = {"w": jnp.ones(2)}
    opt_state = tx.init(params)
    rstate = recovery.init(params, opt_state)
    updates, opt_state = tx.update({"w": jnp.ones(2)}, opt_state, params)
    loss = jnp.float32(1.0)
    params, opt_state, rstate = recovery.update(loss, params, updates, opt_state, rstate)
    keys = set(jaxstab.telemetry(rstate))
    assert keys == {
        f"spike_recovery/{f}"
        for f in (
            "loss", "spike", "rolled_back", "rollbacks_total", "skip_batches", "steps_lost",
            "steps_lost_total", "lr_scale", "gave_up",
        )
    }
    assert float(jaxstab.telemetry(rstate)["spike_recovery/loss"]) == 1.0


def test_orbax_round_trip_keeps_snapshots_and_statistics(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    recovery = spike_recovery(every=10, warmup_steps=5, min_age=0)
    bads = [0.0] * 24
    params, opt_state, rstate, _ = run(recovery, bads)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ck", {"p": params, "o": opt_state, "r": rstate})
    ckpt.wait_until_finished()
    target = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, {"p": params, "o": opt_state, "r": rstate}
    )
    restored = ckpt.restore(tmp_path / "ck", target)
    assert_bit_identical(restored["r"], rstate)
    # a NaN after the restore rolls back to the snapshot saved inside the checkpoint
    step = jitted_step(recovery)
    p, o, r = step(restored["p"], restored["o"], restored["r"], jnp.float32(np.nan))
    assert bool(r.rolled_back) and int(r.steps_lost) == 5
    assert_bit_identical((p, o), _read_slot(rstate, 20))


def _read_slot(rstate, step):
    (slot,) = np.flatnonzero(np.asarray(rstate.snapshot_step) == step)
    return jax.tree.map(lambda s: s[slot], rstate.snapshots)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every": 0}, "every"),
        ({"keep": 1}, "keep"),
        ({"keep": 2.5}, "keep"),
        ({"z_threshold": 0.0}, "z_threshold"),
        ({"decay": 1.0}, "decay"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"max_rollbacks": 0}, "max_rollbacks"),
        ({"lr_backoff": 0.0}, "lr_backoff"),
        ({"lr_backoff": 1.5}, "lr_backoff"),
        ({"skip_batches": -1}, "skip_batches"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spike_recovery(**kwargs)


@pytest.mark.multidevice
def test_snapshots_and_restored_params_keep_their_sharding():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    params = {"w": jax.device_put(jnp.arange(16.0), sharding)}
    tx = optax.adam(0.1)
    recovery = spike_recovery(every=2, warmup_steps=2, min_age=0)

    @jax.jit
    def step(params, opt_state, rstate, scale):
        loss, grads = jax.value_and_grad(lambda p: scale * jnp.sum(p["w"] ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return recovery.update(loss, params, updates, opt_state, rstate)

    opt_state = tx.init(params)
    rstate = jax.jit(recovery.init)(params, opt_state)
    kept = {}
    for i, scale in enumerate([1.0] * 5 + [np.nan]):
        params, opt_state, rstate = step(params, opt_state, rstate, jnp.float32(scale))
        kept[i + 1] = jax.device_get(params)
        assert params["w"].sharding.is_equivalent_to(sharding, 1)
    assert bool(rstate.rolled_back)
    lost = int(rstate.steps_lost)
    np.testing.assert_array_equal(params["w"], kept[6 - lost]["w"])
    snap = rstate.snapshots[0]["w"]
    assert snap.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "d")), 2)
