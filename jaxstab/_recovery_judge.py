"""The decisions of :func:`jaxstab.spike_recovery`: its state, and the verdict on each loss.

Pure functions of the controller's state and one scalar loss (no training state here: the
snapshots ride along untouched): the robust statistics of log-losses, the three tiers (skip,
roll back, give up), which snapshot to restore and when to take one. ``recovery.py`` applies
the verdict to the training state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxstab import _stats
from jaxstab.telemetry import telemetry_state

NEVER = np.iinfo(np.int32).min // 2  # "no rollback yet": older than any window


@telemetry_state(
    "spike_recovery",
    (
        "loss",
        "threshold",
        "skipped",
        "snapshot_taken",
        "restored_step",
        "skipped_total",
        "rolled_back",
        "rollbacks_total",
        "skip_batches",
        "steps_lost",
        "steps_lost_total",
        "lr_scale",
        "gave_up",
    ),
    opaque=("snapshots",),
)
class SpikeRecoveryState(NamedTuple):
    """State of :func:`spike_recovery`: snapshots, loss statistics and this step's telemetry."""

    snapshots: Any  # the training state stacked ``keep`` times on a new axis 0 (0: external)
    snapshot_step: jax.Array  # int32 (keep,), the step each slot holds; -1 when empty or invalid
    confirmed: jax.Array  # bool (keep,), whether the slot's own next step was in range
    pending: jax.Array  # int32, the slot written last step and awaiting its verdict; -1: none
    stats: _stats.RobustLevel  # centre and spread of accepted log-losses
    recent: jax.Array  # int32 bit mask: bit i set when the step i steps ago was out of range
    drift: jax.Array  # float32, the CUSUM of log-losses above the centre, in spreads
    onset: jax.Array  # int32, the step the current rise of ``drift`` began
    step: jax.Array  # int32, calls of the step so far (skipped and undone ones included)
    since_snapshot: jax.Array  # int32, accepted steps since the last snapshot
    rollback_steps: jax.Array  # int32 (max_rollbacks,), steps of the latest rollbacks
    streak: jax.Array  # int32, rollbacks since a snapshot was last confirmed
    backoff_left: jax.Array  # int32, steps until ``lr_scale`` returns to 1 (with backoff_steps)
    loss: jax.Array  # float32, this step's loss
    threshold: jax.Array  # float32, the largest loss that was not skipped (+inf in warm-up)
    skipped: jax.Array  # bool, whether this step's state changes were discarded
    skipped_total: jax.Array  # int32
    snapshot_taken: jax.Array  # bool, whether this step's new state is snapshot ``step``
    restored_step: jax.Array  # int32, the snapshot this step restored (-1 when none)
    rolled_back: jax.Array  # bool, whether this step restored a snapshot
    rollbacks_total: jax.Array  # int32
    skip_batches: jax.Array  # int32, batches the training loop should skip now (0 normally)
    steps_lost: jax.Array  # int32, steps this rollback undid
    steps_lost_total: jax.Array  # int32
    lr_scale: jax.Array  # float32, the factor the step should apply to its updates
    gave_up: jax.Array  # bool, set for good after max_rollbacks within window


class Settings(NamedTuple):
    """The hyperparameters of :func:`jaxstab.spike_recovery` that the verdict reads."""

    every: int
    keep: int
    z_skip: float
    z_alarm: float
    drift_slack: float
    drift_limit: float | None
    patience: int
    alarm_steps: int
    decay: float
    warmup_steps: int
    skip_batches: int
    max_rollbacks: int
    window: int
    lr_backoff: float | None
    backoff_steps: int | None
    external: bool

    @property
    def window_mask(self) -> int:
        return (1 << self.patience) - 1


class Verdict(NamedTuple):
    """What the controller decided from this step's loss, before the state is chosen."""

    skip: jax.Array  # bool: keep the old state
    rollback: jax.Array  # bool: restore a snapshot (also once given up)
    target: jax.Array  # int32: the slot to restore
    take: jax.Array  # bool: snapshot the new state
    slot: jax.Array  # int32: the slot to write
    gives_up: jax.Array  # bool: this step gave up
    state: SpikeRecoveryState  # the controller's next state, but for the snapshots


def check_loss(loss) -> None:
    """``loss`` (an array or its ``ShapeDtypeStruct``) must be a real scalar."""
    shape, dtype = loss.shape, loss.dtype
    if not jnp.issubdtype(dtype, jnp.floating) and not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"loss must be a real scalar, got dtype {dtype}")
    if shape != ():
        raise ValueError(
            f"loss must be a scalar (shape ()), got shape {shape}: reduce it first (e.g. "
            "loss.mean()); spike_recovery judges one loss per step"
        )


def init(snapshots, s: Settings) -> SpikeRecoveryState:
    """The first state, around ``snapshots`` (the training state stacked ``keep`` times)."""
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    zero = lambda dtype: jnp.zeros((), dtype)
    return SpikeRecoveryState(
        snapshots=snapshots,
        snapshot_step=jnp.full((s.keep,), -1, jnp.int32).at[0].set(0),
        confirmed=jnp.zeros((s.keep,), bool).at[0].set(True),
        pending=i32(-1),
        stats=_stats.robust_init(),
        recent=i32(0),
        drift=zero(jnp.float32),
        onset=i32(0),
        step=i32(0),
        since_snapshot=i32(0),
        rollback_steps=jnp.full((s.max_rollbacks,), NEVER, jnp.int32),
        streak=i32(0),
        backoff_left=i32(0),
        loss=zero(jnp.float32),
        threshold=jnp.full((), jnp.inf, jnp.float32),
        skipped=zero(bool),
        skipped_total=i32(0),
        snapshot_taken=zero(bool),
        restored_step=i32(-1),
        rolled_back=zero(bool),
        rollbacks_total=i32(0),
        skip_batches=i32(0),
        steps_lost=i32(0),
        steps_lost_total=i32(0),
        lr_scale=jnp.ones((), jnp.float32),
        gave_up=zero(bool),
    )


def judge(loss, rs: SpikeRecoveryState, s: Settings) -> Verdict:
    """The verdict on this step's loss, and the controller's next state (but snapshots)."""
    loss = jnp.asarray(loss)
    check_loss(loss)
    loss = _stats.as_f32(loss)
    step = rs.step + 1
    finite = jnp.isfinite(loss)
    y = jnp.log(jnp.where(loss > 0, loss, 1.0))  # a loss <= 0 is in range
    y = jnp.where(loss > 0, y, -jnp.inf)
    skip_limit = _stats.robust_limit(rs.stats, s.z_skip, s.warmup_steps)
    alarm_limit = _stats.robust_limit(rs.stats, s.z_alarm, s.warmup_steps)
    out = ~finite | (y > alarm_limit)
    # Within ``patience`` steps of a rollback trouble is known to be near (the rest of a burst
    # of bad data): an out-of-range step is skipped, not only one past z_skip.
    vigilant = rs.rollback_steps[-1] >= step - s.patience
    skip = ~finite | (y > skip_limit) | (vigilant & out)
    recent = ((rs.recent << 1) | out.astype(jnp.int32)) & s.window_mask
    in_range = jax.lax.population_count(recent) < s.alarm_steps
    # CUSUM of every finite log-loss, skipped ones too, clipped to z_alarm spreads (a
    # non-finite one is left to the count above); 0 until warm-up ends.
    spread = _stats.robust_spread(rs.stats)
    d = jnp.clip((y - rs.stats.center) / spread, -s.z_alarm, s.z_alarm)
    drift = jnp.maximum(rs.drift + d - _stats.as_f32(s.drift_slack), 0.0)
    drift = jnp.where(_stats.ready(rs.stats, s.warmup_steps) & finite & (loss > 0), drift,
                      jnp.where(finite, 0.0, rs.drift))  # fmt: skip
    onset = jnp.where((rs.drift == 0) & (drift > 0), step, rs.onset)
    if s.drift_limit is not None:
        in_range &= ~(drift > _stats.as_f32(s.drift_limit))

    in_window = jnp.sum((rs.rollback_steps > step - s.window).astype(jnp.int32))
    gave_up = rs.gave_up | (~in_range & (in_window >= s.max_rollbacks))
    rollback = ~in_range | gave_up
    rolled_back = rollback & ~gave_up
    skip = skip & ~rollback

    # Last step's snapshot holds the state this loss was measured on: judge it.
    is_pending = jnp.arange(s.keep) == rs.pending
    confirmed = rs.confirmed | (is_pending & ~skip & ~rollback)
    snapshot_step = jnp.where(is_pending & (skip | rollback), -1, rs.snapshot_step)
    streak = jnp.where(jnp.any(is_pending) & ~skip & ~rollback, 0, rs.streak)

    valid = confirmed & (snapshot_step >= 0)
    before = jnp.minimum(step - s.patience, jnp.where(drift > 0, onset - 1, step))
    aged = valid & (snapshot_step <= before)
    newest_aged = jnp.argmax(jnp.where(aged, snapshot_step, -2))
    oldest = jnp.argmin(jnp.where(valid, snapshot_step, jnp.iinfo(jnp.int32).max))
    target = jnp.where(jnp.any(aged), newest_aged, oldest)
    target_step = snapshot_step[target]
    accepted = ~skip & ~rollback
    since = jnp.where(rollback, 0, rs.since_snapshot + accepted.astype(jnp.int32))
    take = accepted & (since >= s.every)
    slot = jnp.argmin(snapshot_step)
    is_slot = take & (jnp.arange(s.keep) == slot)
    snapshot_step = jnp.where(rollback & (snapshot_step > target_step), -1, snapshot_step)
    snapshot_step = jnp.where(is_slot, step, snapshot_step)

    # Each rollback lowers lr_scale a notch; each backoff_steps steps without one raise it a
    # notch again, up to 1 (where a rise brings the trouble back, the next rollback lowers it).
    lr_scale, backoff_left = rs.lr_scale, jnp.maximum(rs.backoff_left - 1, 0)
    if s.lr_backoff is not None:
        factor = _stats.as_f32(s.lr_backoff)
        lr_scale = jnp.where(rolled_back, lr_scale * factor, lr_scale)
        if s.backoff_steps is not None:
            up = ~rolled_back & (rs.backoff_left == 1)
            raised = jnp.minimum(lr_scale / factor, 1.0)
            lr_scale = jnp.where(up, jnp.where(raised > 0.999, 1.0, raised), lr_scale)
            low = rolled_back | (up & (lr_scale < 1))
            backoff_left = jnp.where(low, s.backoff_steps, backoff_left)
    steps_lost = jnp.where(rollback & ~rs.gave_up, step - target_step, 0)
    new = SpikeRecoveryState(
        snapshots=rs.snapshots,
        snapshot_step=snapshot_step,
        confirmed=jnp.where(is_slot, False, confirmed),
        pending=jnp.where(take, slot, -1).astype(jnp.int32),
        stats=_stats.robust_update(
            rs.stats,
            y,
            decay=s.decay,
            warmup_steps=s.warmup_steps,
            clip_z=s.z_alarm,
            accept=accepted & (loss > 0),
        ),
        recent=jnp.where(rollback, 0, recent),
        drift=jnp.where(rollback, 0.0, drift),
        onset=onset,
        step=step,
        since_snapshot=jnp.where(take, 0, since),
        rollback_steps=jnp.where(
            rolled_back, jnp.roll(rs.rollback_steps, -1).at[-1].set(step), rs.rollback_steps
        ),
        streak=streak + rolled_back.astype(jnp.int32),
        backoff_left=backoff_left.astype(jnp.int32),
        loss=loss,
        threshold=jnp.exp(skip_limit),
        skipped=skip,
        skipped_total=rs.skipped_total + skip.astype(jnp.int32),
        snapshot_taken=take,
        restored_step=jnp.where(rollback, target_step, -1),
        rolled_back=rolled_back,
        rollbacks_total=rs.rollbacks_total + rolled_back.astype(jnp.int32),
        skip_batches=jnp.where(
            rolled_back, jnp.int32(s.skip_batches) << jnp.minimum(streak, 16), 0
        ).astype(jnp.int32),
        steps_lost=steps_lost,
        steps_lost_total=rs.steps_lost_total + steps_lost,
        lr_scale=lr_scale,
        gave_up=gave_up,
    )
    # Once given up, the controller stays as it was at that step (what ``check`` reports).
    frozen = {k: v for k, v in rs._asdict().items() if k != "snapshots"}
    fresh = {k: getattr(new, k) for k in frozen}
    new = new._replace(**_stats.select(rs.gave_up, frozen, fresh))
    keep_old = skip | rollback if s.external else skip  # external: the host restores
    return Verdict(keep_old, rollback, target, take, slot, gave_up & ~rs.gave_up, new)
