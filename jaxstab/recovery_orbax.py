"""Snapshots of ``spike_recovery`` in an orbax ``CheckpointManager``, for states too large to copy.

With ``spike_recovery(..., snapshots="external")`` the jitted step keeps no copy of the state: it
reports ``snapshot_taken`` when the state it returns should be saved, and ``restored_step`` when a
rollback needs a snapshot back (returning the old state meanwhile). :class:`OrbaxSnapshots` does
both on the host, after each step, with orbax's asynchronous saves.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxstab.recovery import SpikeRecoveryState


class OrbaxSnapshots:
    """Saves and restores the snapshots of ``spike_recovery(snapshots="external")`` with orbax.

    Memory: none on the accelerator; the host reads two scalars of the controller's state per
    step (``snapshot_taken``, ``restored_step``), which waits for that step to finish. Saves are
    asynchronous (orbax writes while training goes on); a restore waits for them.

    Args:
      manager: an ``orbax.checkpoint.CheckpointManager`` of its own (not the run's periodic
        checkpoints), without ``max_to_keep``: snapshots are saved and deleted at the
        controller's pace (at most ``keep`` of them, plus one awaiting its verdict).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, orbax.checkpoint as ocp
      >>> from jaxstab import spike_recovery
      >>> from jaxstab.recovery_orbax import OrbaxSnapshots
      >>> recovery = spike_recovery(every=2, warmup_steps=2, patience=1, alarm_steps=1,
      ...                           snapshots="external")
      >>> step = recovery.wrap(lambda s, x: ({"w": s["w"] + x}, jnp.sum(s["w"]) + x))
      >>> manager = ocp.CheckpointManager(tempfile.mkdtemp())
      >>> state = {"w": jnp.ones(2)}
      >>> snaps = OrbaxSnapshots(manager)
      >>> rstate = snaps.init(state, recovery)
      >>> for x in [1.0, 1.0, 1.0, jnp.nan]:
      ...     state, rstate, loss = step(state, rstate, x)
      ...     state = snaps.after_step(state, rstate)
      >>> int(rstate.restored_step), state["w"].tolist()  # back at the snapshot of step 2
      (2, [3.0, 3.0])
      >>> manager.all_steps()  # the snapshots the controller still holds
      [0, 2]
      >>> manager.close()
    """

    def __init__(self, manager):
        import orbax.checkpoint as ocp  # flax depends on orbax-checkpoint

        if not isinstance(manager, ocp.CheckpointManager):
            raise TypeError(
                f"manager must be an orbax.checkpoint.CheckpointManager, got {manager!r}"
            )
        self._ocp, self.manager = ocp, manager
        self._abstract = self._recovery = None
        self._saved: set[int] = set()

    def _save(self, step: int, state) -> None:
        self.manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
        self._saved.add(step)

    def init(self, state, recovery) -> SpikeRecoveryState:
        """``recovery.init(state)``, with ``state`` saved as snapshot 0."""
        self._abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, state)
        self._recovery = recovery
        self._save(0, state)
        return recovery.init(state)

    def after_step(self, state, rstate: SpikeRecoveryState) -> Any:
        """Saves ``state`` when the step took a snapshot; returns the restored snapshot when it
        rolled back, else ``state``. Raises :class:`jaxstab.SpikeRecoveryError` once the
        controller has given up (the host looks at its flags here anyway)."""
        if self._abstract is None:
            raise ValueError("call OrbaxSnapshots.init(state, recovery) before after_step")
        self._recovery.check(rstate)
        if bool(rstate.snapshot_taken):
            self._save(int(rstate.step), state)
        restored = int(rstate.restored_step)
        if restored >= 0:
            self.manager.wait_until_finished()
            args = self._ocp.args.StandardRestore(self._abstract)
            state = self.manager.restore(restored, args=args)
        dropped = self._saved - set(jax.device_get(rstate.snapshot_step).tolist())
        if dropped:  # invalidated or dropped by a rollback
            self.manager.wait_until_finished()
            for step in sorted(dropped):
                self.manager.delete(step)
            self._saved -= dropped
        return state
