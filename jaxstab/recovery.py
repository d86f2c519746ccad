"""Spike recovery: skip a bad batch, roll the whole training state back when trouble persists.

:func:`spike_recovery` builds a controller that lives inside the jitted training step and owns
nothing of the model: it watches the loss and keeps ``keep`` snapshots of the *whole* training
state, whatever pytree the user names (params, optimizer state, batch-norm statistics, loss
scale, step counters, RNG key). It answers in tiers:

1. an isolated outlier step is **skipped**: every state change the step made is discarded, bit
   for bit, and the data stream goes on (no batch is skipped);
2. trouble that **persists** (``alarm_steps`` of the last ``patience`` steps out of range: the
   loss stays high, or the skip tier keeps firing, as when the parameters themselves went bad)
   is **rolled back** to a snapshot taken before it began, and the loop is told to skip batches
   -- what PaLM's authors did by hand (Chowdhery et al. 2022, section 5.1);
3. repeated rollbacks **give up** loudly.

Detection is robust to heavy tails: it runs on the log of the loss, with a winsorized centre and
a mean-absolute-deviation spread that only accepted steps feed (see :mod:`jaxstab._stats`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxstab import _checks, _inplace, _stats
from jaxstab import _recovery_judge as _judge
from jaxstab._recovery_judge import SpikeRecoveryState

_ON_GIVE_UP = ("raise", "warn", "ignore")
_PLACES = ("device", "pinned_host", "external")
_CHECK_EVERY = 64  # calls of a wrapped step between checks of ``gave_up`` that wait for it


class SpikeRecoveryError(RuntimeError):
    """Raised once the controller has given up (see ``on_give_up`` of :func:`spike_recovery`)."""


class SpikeRecovery(NamedTuple):
    """The controller made by :func:`spike_recovery`: ``init``, ``wrap``, ``update``, ``check``."""

    init: Callable[[Any], SpikeRecoveryState]
    wrap: Callable[..., Callable]
    update: Callable[..., tuple[Any, SpikeRecoveryState]]
    check: Callable[[SpikeRecoveryState], None]


def _stack(tree, keep: int):
    """Every leaf of ``tree`` repeated ``keep`` times along a new leading axis (a fresh buffer)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (keep, *jnp.shape(x))).copy(), tree)


def _like(x, like):
    """``x`` in the memory space of ``like`` (a snapshot kept in host memory comes back)."""
    space = getattr(jax.typeof(like), "memory_space", None)
    return x if getattr(jax.typeof(x), "memory_space", None) == space else jax.device_put(x, space)


def _check_state(state, snapshots) -> None:
    """``state`` must be what ``init`` was given: same structure, shapes and dtypes."""
    want = jax.tree.structure(snapshots)
    if jax.tree.structure(state) != want:
        raise ValueError(
            "state must keep the tree structure recovery.init was given, got\n"
            f"  state: {jax.tree.structure(state)}\n  init:  {want}"
        )
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(snapshots), strict=True):
        if (jnp.shape(x), jnp.result_type(x)) != (s.shape[1:], s.dtype):
            raise ValueError(
                "state must keep the shapes and dtypes recovery.init was given: a leaf of "
                f"shape {jnp.shape(x)} {jnp.result_type(x)} was {s.shape[1:]} {s.dtype}"
            )


def spike_recovery(
    every: int = 100,
    *,
    keep: int = 2,
    z_skip: float = 10.0,
    z_alarm: float = 4.0,
    drift_slack: float = 1.0,
    drift_limit: float | None = 15.0,
    patience: int = 16,
    alarm_steps: int = 6,
    decay: float = 0.99,
    warmup_steps: int = 100,
    skip_batches: int = 20,
    max_rollbacks: int = 3,
    window: int = 1000,
    lr_backoff: float | None = None,
    backoff_steps: int | None = None,
    reinit: Callable[[Any], Any] | None = None,
    on_give_up: str = "raise",
    snapshots: str = "device",
) -> SpikeRecovery:
    """A controller that skips outlier steps and rolls the whole training state back past a spike.

    Wrap the training step, which takes the whole training state and returns the new one with
    the loss; the wrapped step is jitted (state and controller state donated) and takes and
    returns the controller's state too::

      def train_step(state, batch):          # state: any pytree (a TrainState, a dict, ...)
          loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
          return state.apply_gradients(grads=grads), loss

      step = recovery.wrap(train_step)
      rstate = recovery.init(state)
      state, rstate, loss = step(state, rstate, batch)
      # then skip rstate.skip_batches batches of data (0 on an ordinary step)

    ``wrap(train_step, jit=False)`` gives the pure function instead, to call inside a ``jit`` or
    ``lax.scan`` of your own; ``recovery.update(loss, state, new_state, rstate) -> (state,
    rstate)`` does the same from values the step already computed, but is slower (XLA copies the
    state to keep the old one, several times the cost of an Adam update on a CPU), since the
    choice between old and new state cannot be fused into the computation of the new one, as
    ``wrap`` does.

    **The whole state.** ``state`` is any pytree of arrays: params and optimizer state, but also
    batch-norm statistics, a dynamic loss scale, step counters and the RNG key -- a skip or a
    rollback that left any of them behind would be a silent failure. With Flax, a
    ``flax.training.train_state.TrainState`` (with ``batch_stats`` in a subclass or a tuple
    beside it) or the ``nnx.State`` of ``nnx.split((model, optimizer))`` works as it is.

    **Detection.** Each step's loss is judged on the log scale (minibatch losses are skewed and
    heavy-tailed; their logarithm far less so) against a robust centre and spread: winsorized
    EMAs (``decay``) of accepted log-losses and of their absolute deviations, exact over the
    first ``warmup_steps`` finite steps. A step is *out of range* when its loss is non-finite
    or its log lies more than ``z_alarm`` spreads above the centre, and *skipped* when non-finite
    or more than ``z_skip`` spreads above (a loss ``exp(z_skip * spread)`` times the typical one:
    with the defaults and a spread of 0.3, 20x). A lasting rise that no single step shows is
    caught by a CUSUM (Page 1954): ``drift <- max(0, drift + d - drift_slack)``, with ``d`` each
    finite step's log-loss above the centre in spreads (skipped steps too, clipped at
    ``z_alarm``); it exceeds ``drift_limit`` within a few steps of a rise of two spreads or more,
    and in about ``drift_limit / (rise - drift_slack)`` steps of a smaller one. On healthy runs of
    four kinds (``benchmarks/recovery_health.py``) single steps reached 5.7 spreads and the
    CUSUM 7.4. During warm-up only non-finite losses count.
    A loss ``<= 0`` has no logarithm and counts as in range (shift a loss that can be negative).
    Only the loss is judged: to skip a step whose gradients are not finite although its loss is
    (under ``jit`` XLA's ``max`` can turn a NaN into 0 in a ReLU on the way forward but not
    back), make the loss NaN then, before the update:
    ``loss = jnp.where(jnp.isfinite(jaxstab.global_norm(grads)), loss, jnp.nan)``.

    **Tiers.** A skipped step returns the old state, bit for bit, as if it never happened (its
    RNG key and counters too, so a stateful schedule does not advance); within ``patience`` steps
    of a rollback every out-of-range step is skipped (what is left of a burst). A rollback
    happens when
    ``alarm_steps`` of the last ``patience`` steps were out of range, or the CUSUM passes
    ``drift_limit``: trouble that persists, or a skip tier that keeps firing (parameters already
    damaged, a burst of bad data). It restores the newest snapshot taken before the evidence
    began (at least ``patience`` steps old, and older than the CUSUM's rise), else the oldest;
    newer snapshots are dropped. The step reports ``rolled_back``, ``steps_lost`` and
    ``skip_batches``: the loop should skip that many batches, doubled on each rollback before a
    new snapshot is confirmed, so a long burst of bad data is stepped over without its length
    being known. With ``lr_backoff`` each rollback multiplies ``lr_scale`` by it, and (with
    ``backoff_steps``) each ``backoff_steps`` steps without a rollback divide it by it again, up
    to 1: a learning rate that diverges is backed off until it holds, a burst of bad data costs
    a while at a lower rate; ``wrap`` then passes
    ``lr_scale=rstate.lr_scale`` to the step, which should multiply its updates by it. ``reinit``
    (``state -> state``, e.g. fresh optimizer moments) is applied to a restored state.

    **Snapshots.** After every ``every`` accepted steps the new state becomes snapshot ``step``
    in one of ``keep`` slots (an invalid one, else the oldest). A snapshot is confirmed by the
    next step's loss, which is the loss of the snapshot's own parameters; a skipped one
    invalidates it. Where they live (``snapshots``): ``"device"``, beside the state (``keep``
    extra copies of it in accelerator memory); ``"pinned_host"``, in host memory where the
    platform has it (copied over at each snapshot and rollback); ``"external"``, nowhere in the
    graph -- the step reports ``snapshot_taken`` (save the returned state under ``rstate.step``)
    and, on a rollback, returns the old state with ``restored_step`` set (load that snapshot):
    :class:`jaxstab.recovery_orbax.OrbaxSnapshots` does both with an orbax
    ``CheckpointManager``, for a state that does not fit twice in memory.

    **Giving up.** A rollback when ``max_rollbacks`` already happened within ``window`` steps
    sets ``gave_up``: the state is restored to the last good snapshot and stays there. The
    jitted step of ``wrap`` tells the loop without being asked, as ``on_give_up`` says: with
    ``"raise"`` (default) a later call raises :class:`SpikeRecoveryError` (step, loss,
    statistics) before it runs, so the state passed in is still there to save; ``"warn"`` issues
    a ``RuntimeWarning`` once and goes on frozen; ``"ignore"`` does nothing. It looks at the
    flag the previous step returned before each call, without waiting for it (nothing runs on
    the device for this: a host callback in the step would cost more, a fixed 2-3 ms a step on a
    CPU), and waits for it every 64 calls, so it raises at the first call that finds the flag
    computed, within 64 calls of the give-up. Inside your own ``jit`` or ``scan`` (``jit=False``,
    ``update``) look at ``rstate.gave_up`` or call :meth:`SpikeRecovery.check` from the host.

    Everything is in the graph: a whole run works under ``jit`` and ``lax.scan``, snapshots keep
    the sharding of the state, and the controller's state is a ``NamedTuple`` of arrays that
    checkpoints with its snapshots. Cost: on an ordinary step, scalar bookkeeping and two
    ``lax.cond`` (snapshot and rollback; each a host round trip on a GPU); a snapshot step
    copies the state once; a rollback step copies it back.

    Args:
      every: accepted steps between snapshots; an int ``>= 1``.
      keep: snapshots kept; an int ``>= 2`` (one stays confirmed while the newest awaits).
      z_skip: spreads of log-loss above the centre beyond which a step is skipped; ``> 0``.
      z_alarm: spreads above the centre beyond which a step is out of range; ``(0, z_skip]``.
      drift_slack: spreads above the centre the CUSUM forgives each step; ``>= 0``.
      drift_limit: the CUSUM (in spreads) that triggers a rollback; ``> 0``, or None for none.
      patience: the window of the rollback test, in steps; an int in ``[1, 31]``.
      alarm_steps: out-of-range steps within ``patience`` that trigger a rollback; an int in
        ``[1, patience]``.
      decay: EMA decay of the loss statistics after warm-up, in ``[0, 1)``.
      warmup_steps: finite steps that seed the statistics before losses are judged; int ``>= 1``.
      skip_batches: batches to skip after a first rollback, doubled on each repeat; int ``>= 0``.
      max_rollbacks: rollbacks allowed within ``window`` steps; an int ``>= 1``.
      window: the window of ``max_rollbacks``, in steps; an int ``>= 1``.
      lr_backoff: optional factor in ``(0, 1]`` by which each rollback multiplies ``lr_scale``.
      backoff_steps: optional steps without a rollback after which ``lr_scale`` rises one
        notch (divided by ``lr_backoff``, up to 1); an int ``>= 1`` (default: never).
      reinit: optional ``state -> state`` applied to a restored snapshot.
      on_give_up: ``"raise"``, ``"warn"`` or ``"ignore"``, see above.
      snapshots: ``"device"``, ``"pinned_host"`` or ``"external"``, see above.

    Returns:
      A :class:`SpikeRecovery` with ``init(state)``,
      ``wrap(train_step, *, has_aux=False, jit=True, donate=True, **jit_kwargs)`` (with
      ``has_aux`` the step returns ``(new_state, (loss, aux))``), ``update(loss, state,
      new_state, rstate)`` and ``check(rstate)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxstab import spike_recovery
      >>> tx = optax.sgd(0.1)
      >>> recovery = spike_recovery(every=2, warmup_steps=3, patience=4, alarm_steps=2)
      >>> def train_step(state, scale):
      ...     params, opt_state = state
      ...     loss, grads = jax.value_and_grad(lambda p: scale * jnp.sum(p ** 2))(params)
      ...     updates, opt_state = tx.update(grads, opt_state, params)
      ...     return (optax.apply_updates(params, updates), opt_state), loss
      >>> step = recovery.wrap(train_step)
      >>> state = (jnp.ones(3), tx.init(jnp.ones(3)))
      >>> rstate = recovery.init(state)
      >>> for scale in [1.0, 1.0, 1.0, 1.0, jnp.nan, 1.0, 1.0, jnp.nan, jnp.nan, 1.0]:
      ...     state, rstate, loss = step(state, rstate, scale)
      ...     print(bool(rstate.skipped), bool(rstate.rolled_back), int(rstate.skip_batches))
      False False 0
      False False 0
      False False 0
      False False 0
      True False 0
      False False 0
      False False 0
      False True 20
      True False 0
      False False 0
      >>> int(rstate.skipped_total), int(rstate.rollbacks_total), int(rstate.steps_lost_total)
      (2, 1, 6)

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022 (section 5.1, training instability).
    """
    for name, value, low in [
        ("every", every, 1), ("keep", keep, 2), ("patience", patience, 1),
        ("alarm_steps", alarm_steps, 1), ("warmup_steps", warmup_steps, 1),
        ("skip_batches", skip_batches, 0), ("max_rollbacks", max_rollbacks, 1),
        ("window", window, 1),
    ] + ([("backoff_steps", backoff_steps, 1)] if backoff_steps is not None else []):  # fmt: skip
        _checks.check_int(name, value, low=low)
    _checks.check_range("patience", patience, high=31)
    _checks.check_range("alarm_steps", alarm_steps, high=patience)
    _checks.check_range("z_skip", z_skip, low=0, low_open=True)
    _checks.check_range("z_alarm", z_alarm, low=0, high=z_skip, low_open=True)
    _checks.check_range("drift_slack", drift_slack, low=0)
    if drift_limit is not None:
        _checks.check_range("drift_limit", drift_limit, low=0, low_open=True)
    _checks.check_range("decay", decay, low=0, high=1, high_open=True)
    if lr_backoff is not None:
        _checks.check_range("lr_backoff", lr_backoff, low=0, high=1, low_open=True)
    if reinit is not None and not callable(reinit):
        raise TypeError(f"reinit must be a callable state -> state, got {reinit!r}")
    if on_give_up not in _ON_GIVE_UP:
        raise ValueError(f"on_give_up must be one of {_ON_GIVE_UP}, got {on_give_up!r}")
    if snapshots not in _PLACES:
        raise ValueError(f"snapshots must be one of {_PLACES}, got {snapshots!r}")
    external = snapshots == "external"

    settings = _judge.Settings(
        every, keep, z_skip, z_alarm, drift_slack, drift_limit, patience, alarm_steps, decay,
        warmup_steps, skip_batches, max_rollbacks, window, lr_backoff, backoff_steps, external,
    )  # fmt: skip

    def init_fn(state) -> SpikeRecoveryState:
        stacked = _stack(state, 0 if external else keep)  # external: structure only
        if snapshots == "pinned_host":
            stacked = jax.tree.map(
                lambda s: jax.device_put(s, s.sharding.with_memory_kind("pinned_host")), stacked
            )
        return _judge.init(stacked, settings)

    def finish(state, verdict: _judge.Verdict):
        """Snapshot or restore: the chosen state and the controller's next state."""
        rs = verdict.state
        if external:
            return state, rs
        # Taking and restoring exclude each other; writing first lets XLA update the snapshot
        # buffers in place.
        snapshots = jax.lax.cond(
            verdict.take,
            lambda s: jax.tree.map(lambda a, x: a.at[verdict.slot].set(x), s, state),
            lambda s: s,
            rs.snapshots,
        )

        def restore(_):
            restored = jax.tree.map(lambda a, x: _like(a[verdict.target], x), snapshots, state)
            return reinit(restored) if reinit is not None else restored

        state = jax.lax.cond(verdict.rollback, restore, lambda s: s, state)
        return state, rs._replace(snapshots=snapshots)

    def update_fn(loss, state, new_state, rstate: SpikeRecoveryState):
        _check_state(state, rstate.snapshots)
        _checks.check_same_structure("state", state, "new_state", new_state)
        verdict = _judge.judge(loss, rstate, settings)
        chosen = _stats.select(verdict.skip, state, new_state)
        return finish(chosen, verdict)

    def wrap_fn(
        train_step: Callable, *, has_aux: bool = False, jit: bool = True, donate: bool = True,
        **jit_kwargs,
    ) -> Callable:  # fmt: skip
        if not callable(train_step):
            raise TypeError(f"train_step must be a callable, got {train_step!r}")
        step = _pure_step(train_step, has_aux)
        if not jit:
            return step
        compiled = jax.jit(step, donate_argnums=(0, 1) if donate else (), **jit_kwargs)
        calls, warned = [0], [False]

        def guarded(state, rstate: SpikeRecoveryState, *args, **kwargs):
            # Before the call, which may consume (donate) ``rstate``: a look at the previous
            # step's flag that waits for nothing, and one every _CHECK_EVERY calls that waits.
            flag, calls[0] = rstate.gave_up, calls[0] + 1
            look = on_give_up != "ignore" and not warned[0] and isinstance(flag, jax.Array)
            look = look and not isinstance(flag, jax.core.Tracer)
            if look and (calls[0] % _CHECK_EVERY == 0 or flag.is_ready()) and bool(flag):
                if on_give_up == "raise":
                    check_fn(rstate)
                warnings.warn(_give_up_message(rstate), RuntimeWarning, stacklevel=2)
                warned[0] = True
            return compiled(state, rstate, *args, **kwargs)

        return guarded

    def _pure_step(train_step: Callable, has_aux: bool) -> Callable:
        def step(state, rstate: SpikeRecoveryState, *args, **kwargs):
            _check_state(state, rstate.snapshots)
            if lr_backoff is not None:
                kwargs = {**kwargs, "lr_scale": rstate.lr_scale}
            olds = jax.tree.leaves(state)
            verdicts = []

            def keep_old(shapes):
                _checks.check_same_structure("state", state, "the new state", shapes[0])
                rest = len(jax.tree.leaves(shapes)) - len(olds)
                return olds + [None] * rest

            def watch(shapes):
                _judge.check_loss(jax.tree.leaves(shapes[1])[0])
                return len(olds)  # the loss is the first leaf after the state

            def decide(loss):
                verdicts.append(_judge.judge(loss, rstate, settings))
                return verdicts[-1].skip

            def run(state):
                out = train_step(state, *args, **kwargs)
                pair = isinstance(out, tuple) and len(out) == 2
                if not pair or (has_aux and not (isinstance(out[1], tuple) and len(out[1]) == 2)):
                    raise TypeError(
                        "train_step must return (new_state, loss)"
                        + (" with loss a (loss, aux) pair, as has_aux=True says" if has_aux else "")
                    )
                return out if has_aux else (out[0], (out[1],))

            verdict = _inplace.Verdict(decide=decide)
            new_state, out = _inplace.call_keeping(run, (state,), keep_old, verdict, watch)
            state, rstate = finish(new_state, verdicts[-1])
            return state, rstate, out if has_aux else out[0]

        return step

    def _give_up_message(rstate: SpikeRecoveryState) -> str:
        return (
            f"spike_recovery gave up at step {int(rstate.step)}: loss {float(rstate.loss):.6g} "
            f"(typical {float(np.exp(rstate.stats.center)):.6g}) after {max_rollbacks} rollbacks "
            f"within {window} steps ({int(rstate.rollbacks_total)} in all, "
            f"{int(rstate.steps_lost_total)} steps undone); the state is that of the last good "
            "snapshot"
        )

    def check_fn(rstate: SpikeRecoveryState) -> None:
        if bool(rstate.gave_up):
            raise SpikeRecoveryError(_give_up_message(rstate))

    return SpikeRecovery(init_fn, wrap_fn, update_fn, check_fn)
