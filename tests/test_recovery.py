"""spike_recovery: the whole training state, skip and rollback tiers, giving up, errors."""

from __future__ import annotations

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstab
from jaxstab import SpikeRecoveryError, spike_recovery

TX = optax.adam(0.05)
TARGET = jnp.array([0.3, -0.2, 0.1])


def initial_state():
    """A whole training state: params, Adam's state, a running statistic, a counter, a key."""
    params = {"w": jnp.array([1.0, -1.0, 0.5]), "h": jnp.array([0.5, -0.25], jnp.bfloat16)}
    return {
        "params": params,
        "opt": TX.init(params),
        "stats": jnp.zeros(3),  # a running mean of the inputs, as batch norm keeps
        "step": jnp.zeros((), jnp.int32),
        "key": jax.random.key(0),
    }


def train_step(state, bad, lr_scale=None):
    """Noise from the key, a loss computed first (the forward pass), then Adam. A ``bad`` batch
    multiplies the loss by ``1 + bad`` (NaN when ``bad`` is NaN) and enters the statistics."""
    key, sub = jax.random.split(state["key"])
    noise = 0.01 * jax.random.normal(sub, (3,))

    def loss_fn(params):
        w = params["w"] + noise
        sq = jnp.sum((w - TARGET) ** 2) + jnp.sum(params["h"].astype(jnp.float32) ** 2)
        return (1.0 + sq) * (1.0 + bad)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = TX.update(grads, state["opt"], state["params"])
    if lr_scale is not None:
        updates = jax.tree.map(lambda u: u * lr_scale, updates)
    new = {
        "params": optax.apply_updates(state["params"], updates),
        "opt": opt,
        "stats": 0.9 * state["stats"] + 0.1 * (noise + bad),
        "step": state["step"] + 1,
        "key": key,
    }
    return new, loss


@functools.cache
def jitted(recovery, *, wrapped=True):
    chex.clear_trace_counter()

    @chex.assert_max_traces(n=1)
    def step(state, rstate, bad):
        if wrapped:
            return recovery.wrap(train_step, jit=False)(state, rstate, bad)
        new, loss = train_step(state, bad)
        return (*recovery.update(loss, state, new, rstate), loss)

    return jax.jit(step)


def run(recovery, bads, state=None, rstate=None, *, wrapped=True):
    """One step per entry of ``bads`` (0 healthy, > 0 a spike, NaN); returns the final state and
    controller state and, per step, host copies of the state after it and the controller state."""
    state = initial_state() if state is None else state
    rstate = recovery.init(state) if rstate is None else rstate
    history = [(jax.device_get(state), rstate)]
    for bad in bads:
        state, rstate, _ = jitted(recovery, wrapped=wrapped)(state, rstate, jnp.float32(bad))
        history.append((jax.device_get(state), rstate))
    return state, rstate, history


def assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def flags(history, field):
    return [i for i, (_, r) in enumerate(history) if bool(getattr(r, field))]


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrap", "update"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6])
def test_an_outlier_step_is_skipped_and_never_happened(bad, wrapped):
    recovery = spike_recovery(every=5, warmup_steps=10)
    clean = [0.0] * 30
    dirty = [*clean[:20], bad, *clean[20:]]
    s_clean, _, _ = run(recovery, clean, wrapped=wrapped)
    s_dirty, r_dirty, history = run(recovery, dirty, wrapped=wrapped)
    assert flags(history, "skipped") == [21]
    assert flags(history, "rolled_back") == []
    assert int(history[21][1].skip_batches) == 0
    assert_bit_identical(history[21][0], history[20][0])  # params, moments, stats, step, key
    assert_bit_identical(s_dirty, s_clean)
    assert int(r_dirty.skipped_total) == 1 and int(r_dirty.step) == 31


def test_wrap_and_update_agree_bit_for_bit():
    recovery = spike_recovery(every=4, warmup_steps=5, patience=4, alarm_steps=2)
    bads = [0.0] * 12 + [np.nan, 0.0, 0.0, 1e6, 1e6] + [0.0] * 10
    a = run(recovery, bads, wrapped=True)
    b = run(recovery, bads, wrapped=False)
    assert_bit_identical(a[0], b[0])
    assert_bit_identical(a[1]._replace(snapshots=None), b[1]._replace(snapshots=None))
    assert flags(a[2], "rolled_back") == flags(b[2], "rolled_back") == [16]


def test_persistent_trouble_rolls_back_the_whole_state_to_a_snapshot_before_it():
    recovery = spike_recovery(every=10, warmup_steps=10, patience=8, alarm_steps=4)
    bads = [0.0] * 35 + [50.0] * 6 + [0.0] * 5
    _, rstate, history = run(recovery, bads)
    (at,) = flags(history, "rolled_back")
    assert at == 39  # the fourth out-of-range step (each 51x the loss: skipped, not learned)
    lost = int(history[at][1].steps_lost)
    assert at - lost <= at - 8  # a snapshot taken before the window of evidence
    assert_bit_identical(history[at][0], history[at - lost][0])
    assert int(history[at][1].skip_batches) == 20
    assert int(rstate.rollbacks_total) == 1 and not bool(rstate.gave_up)


def test_skips_that_keep_firing_roll_back_params_that_went_bad():
    """Once the parameters are NaN every later step is skipped: skipping cannot help, so the
    persistence test rolls back."""
    recovery = spike_recovery(every=5, warmup_steps=5, patience=6, alarm_steps=3)
    state, rstate, _ = run(recovery, [0.0] * 12)
    state["params"]["w"] = state["params"]["w"].at[0].set(jnp.nan)
    state, rstate, history = run(recovery, [0.0] * 4, state, rstate)
    assert flags(history, "skipped") == [1, 2]
    assert flags(history, "rolled_back") == [3]
    assert bool(jnp.all(jnp.isfinite(state["params"]["w"])))


def give_up_run(on_give_up, n_nan=4):
    """A jitted wrapped step driven into giving up (2 rollbacks allowed); returns the
    controller, the step, the last state and controller state, and the controller states after
    each call."""
    recovery = spike_recovery(
        every=3, warmup_steps=3, patience=2, alarm_steps=2, max_rollbacks=2,
        on_give_up=on_give_up,
    )  # fmt: skip
    step = recovery.wrap(train_step, donate=False)
    state = initial_state()
    rstate = recovery.init(state)
    history = []
    for bad in [0.0] * 6 + [np.nan] * n_nan:
        state, rstate, _ = step(state, rstate, jnp.float32(bad))
        jax.block_until_ready(rstate)  # so that the next call finds the flag computed
        history.append(rstate)
    return recovery, step, state, rstate, history


def test_repeated_rollbacks_double_the_skip_then_give_up():
    recovery, _, _, rstate, history = give_up_run("ignore", n_nan=8)
    skips = [int(r.skip_batches) for r in history if bool(r.rolled_back)]
    assert skips == [20, 40]
    assert bool(rstate.gave_up) and int(rstate.rollbacks_total) == 2
    with pytest.raises(SpikeRecoveryError, match=r"gave up at step \d+: loss nan"):
        recovery.check(rstate)


def test_giving_up_raises_at_the_next_call_with_the_state_intact():
    *_, history = give_up_run("ignore", n_nan=8)
    last = next(i for i, r in enumerate(history) if bool(r.gave_up))
    _, step, state, rstate, _ = give_up_run("raise", n_nan=last - 5)  # stops at the give-up
    assert bool(rstate.gave_up)
    kept = jax.device_get(state)
    with pytest.raises(SpikeRecoveryError, match="after 2 rollbacks within 1000 steps"):
        step(state, rstate, jnp.float32(0.0))
    assert_bit_identical(jax.device_get(state), kept)  # nothing was consumed


def test_giving_up_warns_once_and_stays_frozen():
    *_, frozen, _, _ = give_up_run("ignore", n_nan=8)
    with pytest.warns(RuntimeWarning, match="spike_recovery gave up at step") as record:
        _, step, state, rstate, _ = give_up_run("warn", n_nan=8)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            state, rstate, _ = step(state, rstate, jnp.float32(0.0))
    assert_bit_identical(jax.device_get(state), jax.device_get(frozen))


def test_a_loop_that_ignores_giving_up_can_still_check():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recovery, step, state, rstate, _ = give_up_run("ignore", n_nan=8)
        state, rstate, _ = step(state, rstate, jnp.float32(0.0))
    assert bool(rstate.gave_up)
    with pytest.raises(SpikeRecoveryError):
        recovery.check(rstate)


def test_heavy_tailed_healthy_losses_are_neither_skipped_nor_rolled_back():
    """Log-normal minibatch losses with a drifting level and a 1% mixture of hard batches at
    10-30x the typical loss: ordinary for small batches."""
    recovery = spike_recovery()
    rng = np.random.default_rng(0)
    n = 20_000
    level = np.exp(-3 * np.arange(n) / n)
    hard = np.where(rng.random(n) < 0.01, rng.uniform(10, 30, n), 1.0)
    losses = jnp.asarray(level * np.exp(0.6 * rng.standard_normal(n)) * hard, jnp.float32)
    state = {"w": jnp.zeros(2)}

    def body(rstate, loss):
        _, rstate = recovery.update(loss, state, state, rstate)
        return rstate, (rstate.skipped, rstate.rolled_back)

    rstate, (skipped, rolled) = jax.jit(lambda r: jax.lax.scan(body, r, losses))(
        recovery.init(state)
    )
    assert int(rolled.sum()) == 0
    assert int(skipped.sum()) <= n // 1000
    assert float(jnp.exp(rstate.stats.center)) == pytest.approx(level[-1], rel=0.5)


def drift_run(drift_limit):
    """Log-normal losses (sigma 0.1) that rise for good by 1.3 sigma at step 300: no single
    step is out of range, the CUSUM catches it."""
    recovery = spike_recovery(every=50, drift_limit=drift_limit)
    rng = np.random.default_rng(1)
    y = 0.1 * rng.standard_normal(400) + np.where(np.arange(400) >= 300, 0.13, 0.0)
    losses = jnp.asarray(np.exp(y), jnp.float32)
    state = {"w": jnp.zeros(2)}

    def body(rstate, loss):
        _, rstate = recovery.update(loss, state, state, rstate)
        return rstate, rstate.rolled_back

    _, rolled = jax.lax.scan(body, recovery.init(state), losses)
    return np.flatnonzero(np.asarray(rolled))


def test_a_lasting_rise_that_no_step_shows_rolls_back():
    (at, *_) = drift_run(15.0)
    assert 300 <= at < 340
    assert not any(300 <= t < 340 for t in drift_run(None))


def test_non_positive_losses_are_in_range():
    recovery = spike_recovery(every=5, warmup_steps=3, patience=2, alarm_steps=1)
    state = {"w": jnp.zeros(2)}
    rstate = recovery.init(state)
    for loss in [1.0, 1.1, 0.9, -5.0, 0.0, 1.0]:
        _, rstate = recovery.update(jnp.float32(loss), state, state, rstate)
        assert not bool(rstate.skipped) and not bool(rstate.rolled_back)
    assert int(rstate.stats.samples) == 4


def test_learning_rate_backoff_reaches_the_step_and_reinit_the_restored_state():
    reinit = lambda s: {**s, "opt": TX.init(s["params"])}
    recovery = spike_recovery(
        every=3, warmup_steps=3, patience=1, alarm_steps=1, lr_backoff=0.5, backoff_steps=4,
        reinit=reinit,
    )  # fmt: skip
    seen = []

    def step(state, bad, lr_scale):
        seen.append(lr_scale)
        return train_step(state, bad, lr_scale)

    state = initial_state()
    rstate = recovery.init(state)
    wrapped = recovery.wrap(step, jit=False)  # eagerly: ``seen`` records every call
    scales = []
    for bad in [0.0] * 7 + [np.nan] + [0.0] * 6:
        state, rstate, _ = wrapped(state, rstate, jnp.float32(bad))
        scales.append(float(rstate.lr_scale))
    assert scales == [1.0] * 7 + [0.5] * 4 + [1.0] * 3
    assert len(seen) >= 14
    assert int(state["opt"][0].count) == 6  # fresh moments at the rollback, 6 steps since


def test_learning_rate_backoff_compounds_and_rises_a_notch_at_a_time():
    recovery = spike_recovery(
        every=2, warmup_steps=3, patience=1, alarm_steps=1, lr_backoff=0.5, backoff_steps=3
    )
    state = {"w": jnp.zeros(2)}
    rstate = recovery.init(state)
    scales = []
    for loss in [1.0] * 5 + [np.nan, 1.0, np.nan] + [1.0] * 7:
        _, rstate = recovery.update(jnp.float32(loss), state, state, rstate)
        scales.append(float(rstate.lr_scale))
    assert scales == [1.0] * 5 + [0.5, 0.5, 0.25] + [0.25] * 2 + [0.5] * 3 + [1.0] * 2


class WrapVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_wrap_with_and_without_jit(self):
        recovery = spike_recovery(every=2, warmup_steps=2, patience=4, alarm_steps=2)
        step = self.variant(recovery.wrap(lambda s, x: ({"w": s["w"] + x}, x + 1.0), jit=False))
        state = {"w": jnp.ones(2)}
        rstate = recovery.init(state)
        for x in [1.0, 1.0, 1.0, np.nan, 1.0]:
            state, rstate, _ = step(state, rstate, jnp.float32(x))
        assert int(rstate.skipped_total) == 1
        np.testing.assert_array_equal(state["w"], [5.0, 5.0])


def test_has_aux_returns_the_aux():
    recovery = spike_recovery()
    step = recovery.wrap(lambda s: (s, (jnp.float32(2.0), {"acc": 1})), has_aux=True)
    state = {"w": jnp.ones(2)}
    _, _, (loss, aux) = step(state, recovery.init(state))
    assert float(loss) == 2.0 and int(aux["acc"]) == 1


def test_batch_norm_statistics_are_restored_with_a_flax_train_state():
    flax = pytest.importorskip("flax")
    from flax.training import train_state

    nn = flax.linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(4)(x)
            x = jaxstab.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            return nn.Dense(1)(nn.relu(x))

    class State(train_state.TrainState):
        batch_stats: dict

    net = Net()
    variables = net.init(jax.random.key(0), jnp.ones((8, 3)), train=False)
    state = State.create(
        apply_fn=net.apply, params=variables["params"], tx=optax.adam(1e-2),
        batch_stats=variables["batch_stats"],
    )  # fmt: skip

    def step(state, x):
        def loss_fn(params):
            y, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True,
                mutable=["batch_stats"],
            )  # fmt: skip
            return jnp.mean((y - 1.0) ** 2), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
        return state, loss

    recovery = spike_recovery(every=5, warmup_steps=5)
    wrapped = recovery.wrap(step)
    rstate = recovery.init(state)
    xs = jax.random.normal(jax.random.key(1), (12, 8, 3))
    for i, x in enumerate(xs):
        if i == 9:
            before = jax.device_get(state)
            x = x.at[0, 0].set(jnp.nan)
        state, rstate, _ = wrapped(state, rstate, x)
        if i == 9:
            assert bool(rstate.skipped)
            assert_bit_identical(jax.device_get(state.batch_stats), before.batch_stats)
            assert int(state.step) == int(before.step)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(state.batch_stats))


def test_nnx_model_and_optimizer_state_through_split_and_merge():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.bn = jaxstab.nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
            self.out = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.bn(self.dense(x))))

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def train_step(state, x):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
        loss = jnp.where(jnp.isfinite(jaxstab.global_norm(grads)), loss, jnp.nan)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    recovery = spike_recovery(every=5, warmup_steps=5)
    step = recovery.wrap(train_step)
    rstate = recovery.init(state)
    xs = jax.random.normal(jax.random.key(1), (12, 8, 3))
    for i, x in enumerate(xs):
        if i == 9:
            before = jax.device_get(state)
            x = x.at[0, 0].set(jnp.nan)
        state, rstate, _ = step(state, rstate, x)
        if i == 9:
            assert bool(rstate.skipped)
            assert_bit_identical(jax.device_get(state), before)  # BatchStat, Adam, step count
    model, _ = nnx.merge(graphdef, state)
    assert bool(jnp.all(jnp.isfinite(model.bn.mean[...])))


def test_snapshots_in_host_memory():
    recovery = spike_recovery(
        every=3, warmup_steps=3, patience=1, alarm_steps=1, snapshots="pinned_host"
    )
    state = initial_state()
    try:
        rstate = recovery.init(state)
    except (ValueError, RuntimeError) as e:  # a platform without host memory spaces
        pytest.skip(str(e))
    leaf = jax.tree.leaves(rstate.snapshots)[0]
    assert leaf.sharding.memory_kind == "pinned_host"
    _, rstate, history = run(recovery, [0.0] * 7 + [np.nan], rstate=rstate)
    (at,) = flags(history, "rolled_back")
    assert_bit_identical(history[at][0], history[at - int(history[at][1].steps_lost)][0])


def test_external_snapshots_in_orbax_give_the_same_run(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    from jaxstab.recovery_orbax import OrbaxSnapshots

    kwargs = dict(every=4, warmup_steps=5, patience=4, alarm_steps=2)
    bads = [0.0] * 10 + [np.nan] + [0.0] * 6 + [1e6, np.nan, 1e6] + [0.0] * 5
    raw_key = {**initial_state(), "key": jax.random.PRNGKey(0)}  # orbax saves raw keys
    want, want_r, _ = run(spike_recovery(**kwargs), bads, state=raw_key)
    assert int(want_r.rollbacks_total) == 1
    recovery = spike_recovery(**kwargs, snapshots="external")
    step = recovery.wrap(train_step)
    with ocp.CheckpointManager(tmp_path / "snapshots") as manager:
        snaps = OrbaxSnapshots(manager)
        state = raw_key
        rstate = snaps.init(state, recovery)
        assert jax.tree.leaves(rstate.snapshots)[0].size == 0  # nothing kept on device
        for bad in bads:
            state, rstate, _ = step(state, rstate, jnp.float32(bad))
            state = snaps.after_step(state, rstate)
        manager.wait_until_finished()
        assert set(manager.all_steps()) <= set(np.asarray(rstate.snapshot_step).tolist())
    assert_bit_identical(jax.device_get(state), want)
    assert int(rstate.rollbacks_total) == 1 and int(rstate.steps_lost_total) == int(
        want_r.steps_lost_total
    )


def test_telemetry_reports_the_controller_not_its_snapshots():
    recovery = spike_recovery()
    _, rstate, _ = run(recovery, [0.0])
    keys = set(jaxstab.telemetry(rstate))
    assert keys == {
        f"spike_recovery/{f}"
        for f in (
            "loss", "threshold", "skipped", "skipped_total", "snapshot_taken", "restored_step",
            "rolled_back", "rollbacks_total",
            "skip_batches", "steps_lost", "steps_lost_total", "lr_scale", "gave_up",
        )
    }  # fmt: skip


def test_orbax_round_trip_keeps_snapshots_and_statistics(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    recovery = spike_recovery(every=10, warmup_steps=5, patience=1, alarm_steps=1)
    state, rstate, _ = run(recovery, [0.0] * 24)
    state = {k: v for k, v in state.items() if k != "key"}  # orbax: no typed keys
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ck", {"r": rstate._replace(snapshots=None)})
    ckpt.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"r": rstate._replace(snapshots=None)})
    restored = ckpt.restore(tmp_path / "ck", target)["r"]
    assert_bit_identical(restored, rstate._replace(snapshots=None))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"every": 0}, ValueError, "every"),
        ({"every": 100.5}, TypeError, "every must be an int"),
        ({"keep": 1}, ValueError, "keep"),
        ({"keep": 2.5}, TypeError, "keep"),
        ({"patience": 40}, ValueError, "patience"),
        ({"alarm_steps": 20}, ValueError, "alarm_steps"),
        ({"z_skip": 0.0}, ValueError, "z_skip"),
        ({"z_alarm": 20.0}, ValueError, "z_alarm"),
        ({"drift_limit": 0.0}, ValueError, "drift_limit"),
        ({"drift_slack": -1.0}, ValueError, "drift_slack"),
        ({"decay": 1.0}, ValueError, "decay"),
        ({"warmup_steps": 0}, ValueError, "warmup_steps"),
        ({"max_rollbacks": True}, TypeError, "max_rollbacks"),
        ({"lr_backoff": 0.0}, ValueError, "lr_backoff"),
        ({"lr_backoff": 1.5}, ValueError, "lr_backoff"),
        ({"skip_batches": -1}, ValueError, "skip_batches"),
        ({"on_give_up": "stop"}, ValueError, "on_give_up"),
        ({"reinit": 3}, TypeError, "reinit"),
        ({"snapshots": "disk"}, ValueError, "snapshots"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        spike_recovery(**kwargs)


@pytest.mark.parametrize("shape", [(64,), (1,)])
def test_a_loss_that_is_not_a_scalar_is_named(shape):
    recovery = spike_recovery()
    state = {"w": jnp.ones(2)}
    rstate = recovery.init(state)
    with pytest.raises(ValueError, match=r"loss must be a scalar \(shape \(\)\)"):
        recovery.update(jnp.ones(shape), state, state, rstate)
    with pytest.raises(ValueError, match=r"loss must be a scalar"):
        recovery.wrap(lambda s: (s, jnp.ones(shape)))(state, rstate)


def test_a_state_that_changes_structure_is_named():
    recovery = spike_recovery()
    state = {"w": jnp.ones(2)}
    rstate = recovery.init(state)
    with pytest.raises(ValueError, match=r"tree structure recovery\.init was given"):
        recovery.update(jnp.float32(1), {"v": jnp.ones(2)}, {"v": jnp.ones(2)}, rstate)
    with pytest.raises(ValueError, match="shapes and dtypes"):
        recovery.update(jnp.float32(1), {"w": jnp.ones(3)}, {"w": jnp.ones(3)}, rstate)
    with pytest.raises(ValueError, match="same tree structure"):
        recovery.wrap(lambda s: ({"w": s["w"], "x": 1.0}, jnp.float32(1)))(state, rstate)
    with pytest.raises(TypeError, match=r"return \(new_state, loss\)"):
        recovery.wrap(lambda s: s)(state, rstate)


@pytest.mark.multidevice
def test_snapshots_and_restored_state_keep_their_sharding():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    state = {"w": jax.device_put(jnp.arange(16.0), sharding)}
    recovery = spike_recovery(every=2, warmup_steps=2, patience=1, alarm_steps=1)
    step = recovery.wrap(lambda s, scale: ({"w": s["w"] * 0.9}, scale * jnp.sum(s["w"] ** 2)))
    rstate = jax.jit(recovery.init)(state)
    kept = {}
    for i, scale in enumerate([1.0] * 5 + [np.nan]):
        state, rstate, _ = step(state, rstate, jnp.float32(scale))
        kept[i + 1] = jax.device_get(state)
        assert state["w"].sharding.is_equivalent_to(sharding, 1)
    assert bool(rstate.rolled_back)
    np.testing.assert_array_equal(state["w"], kept[6 - int(rstate.steps_lost)]["w"])
    snap = rstate.snapshots["w"]
    assert snap.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "d")), 2)
