"""Keeping a step's old state in place: ``select(skip, old, new)`` where each new value is computed.

Shared by ``skip_anomalies`` (which keeps an optimizer's state on a skipped step) and
``spike_recovery`` (which keeps a whole training state on a skipped step).

The obvious skip, ``new_state = where(skip, old_state, new_state)`` leaf by leaf, makes XLA copy
every donated state buffer each step: XLA duplicates the cheap elementwise moment update
(``b1 * mu + (1 - b1) * g``) into both of its consumers, the select that writes ``mu`` in place
and the parameter update, which then reads the *old* ``mu`` -- so ``mu`` is read after being
overwritten unless it is first copied away (3-4x the cost of Adam on CPU). The fix is to let
every later computation read the *selected* value, as plain Adam's update reads the new moments:
the step is traced once, then re-evaluated with each new-state value replaced, right where it is
computed, by ``select(skip, old, new)``. Values are unchanged on kept steps (``select(False, old,
new)`` is ``new`` bit for bit); XLA then writes each selected value in place once and later
computations read it, as in the plain step.

The predicate may itself be computed by the step: :class:`Verdict` can wait for one of the step's
outputs (``spike_recovery`` judges the loss, which the forward pass computes before the backward
pass and the update). Values computed before the predicate is known are selected at the end,
which costs nothing for the small ones that come first (batch-norm statistics, RNG keys).

Rules of the re-evaluation (the fast path):
- A value is replaced where it is computed: by a top-level equation, or inside a nested
  ``jax.jit`` call when that call can be inlined without loss (its parameters are those of a
  plain ``jax.jit``: no shardings, layouts, donation or compiler options) and the inner value is
  computed inside it and returned exactly once. Any other new-state leaf (a constant, an input
  passed through, one value returned into several leaves, the output of a ``cond``/``scan``/
  sharded ``jit``) is selected right after the equation that returns it, so it keeps what that
  equation says about its sharding.
- A jaxpr with side effects (callbacks, debug prints) is not re-evaluated, nor one whose tracing
  or re-evaluation raises, nor one whose re-evaluated outputs differ in type from the trace: those
  run the step as it is (which raises a user's own error) and select every kept leaf after it.
  The re-evaluation uses JAX's jaxpr interpreter API (``Literal``, ``Var``,
  ``Primitive.get_bind_params``, ``JaxprEqn.ctx``); should a JAX release change it, the callers
  stay correct on the plain path and tests/test_guards_catalogue.py reports the optimizers that
  left the fast path.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

try:
    from jax.extend.core import Literal, Var
except ImportError:  # older jax
    from jax.core import Literal, Var


def select(skip: jax.Array, old, new) -> jax.Array:
    """``old`` if ``skip`` else ``new``, bit for bit, in ``new``'s type: one scalar-predicate
    select, which XLA fuses into the computation of ``new``."""
    new = jnp.asarray(new)
    old = jnp.asarray(old)
    if old.dtype != new.dtype:
        old = old.astype(new.dtype)
    return jax.lax.select(skip, jnp.broadcast_to(old, new.shape), new)


class Verdict:
    """The scalar predicate ``skip``: given, or computed by ``decide`` from one output of the step
    as soon as the re-evaluation computes it."""

    def __init__(self, skip: jax.Array | None = None, decide: Callable | None = None):
        self.skip, self.decide = skip, decide

    def reach(self, value) -> None:
        """Computes the predicate from ``value`` (the watched output), once."""
        if self.skip is None:
            self.skip = self.decide(value)


_PLAIN_JIT = jax.jit(lambda x: x)  # traced at each call: the parameters of a plain ``jax.jit``


def _inlinable(eqn, plain_jit) -> bool:
    """Whether the call ``eqn`` is a ``jax.jit`` that inlining loses nothing from: its parameters
    equal those of ``plain_jit`` (a plain one-argument ``jax.jit`` traced here, whose one-element
    tuples are per-argument settings), except its body, name and tracing options."""
    if eqn.primitive is not plain_jit.primitive:
        return False
    free = {"jaxpr", "name", "inline", "keep_unused"}
    for key, value in eqn.params.items():
        if key in free:
            continue
        if key not in plain_jit.params:
            return False
        plain = plain_jit.params[key]
        if isinstance(plain, tuple) and len(plain) == 1:  # per-argument: all must be plain
            if not all(v == plain[0] for v in value):
                return False
        elif value != plain:
            return False
    return True


def eval_selecting(jaxpr, consts, args, replace: dict, verdict: Verdict, plain_jit, *,
                   watch=None, selected: set | None = None) -> list:  # fmt: skip
    """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``; each variable ``v`` in ``replace`` is
    bound to ``select(verdict.skip, replace[v], value)`` as soon as it is computed and the verdict
    is known, inside nested ``jit`` calls where they are :func:`_inlinable` and ``v`` is computed
    inside and returned once. The variable ``watch``, once computed, gives the verdict. The
    variables selected in place are added to ``selected``."""
    selected = set() if selected is None else selected
    env: dict = {}
    read = lambda v: v.val if isinstance(v, Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    if watch is not None and (isinstance(watch, Literal) or watch in env):
        verdict.reach(read(watch))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        pushed: dict = {}  # inner variable -> old value, for a call evaluated inline
        inner_watch = None
        wanted = any(v in replace for v in eqn.outvars) or (watch in eqn.outvars)
        if wanted and _inlinable(eqn, plain_jit):
            body = eqn.params["jaxpr"]
            produced = {v for e in body.jaxpr.eqns for v in e.outvars}
            returned = collections.Counter(v for v in body.jaxpr.outvars if isinstance(v, Var))
            for outer, v in zip(eqn.outvars, body.jaxpr.outvars, strict=True):
                if outer in replace and isinstance(v, Var) and v in produced and returned[v] == 1:
                    pushed[v] = (outer, replace[outer])
                if outer is watch and verdict.skip is None:
                    inner_watch = v
        if pushed or inner_watch is not None:
            inner = {v: old for v, (_, old) in pushed.items()}
            done: set = set()  # a body may be shared by several calls: a set for this one
            outs = eval_selecting(body.jaxpr, body.consts, invals, inner, verdict, plain_jit,
                                  watch=inner_watch, selected=done)  # fmt: skip
            selected.update(outer for v, (outer, _) in pushed.items() if v in done)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = params if isinstance(params, tuple) else ((), params)  # older jax
            with getattr(getattr(eqn, "ctx", None), "manager", contextlib.nullcontext()):
                outs = eqn.primitive.bind(*subfuns, *invals, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
        if watch is not None and watch in eqn.outvars:
            verdict.reach(env[watch])
        if verdict.skip is None:
            continue
        for v in eqn.outvars:
            if v in replace and v not in selected:
                env[v] = select(verdict.skip, replace[v], env[v])
                selected.add(v)
    return [read(v) for v in jaxpr.outvars]


def _same_type(x, aval) -> bool:
    got = jax.typeof(x)
    return (got.shape, got.dtype, got.weak_type) == (aval.shape, aval.dtype, aval.weak_type)


def _select_in_place(closed, args, keep: Sequence, verdict: Verdict, watch: int | None):
    """The fast path: ``closed`` re-evaluated with each kept output selected where it is computed
    (see above). Returns the flat outputs, or None where the rules above send the step to the
    plain path."""
    jaxpr = closed.jaxpr
    if closed.effects:
        return None
    produced = {v for e in jaxpr.eqns for v in e.outvars}
    owner: dict = {}  # kept output variable -> index of the output whose old value replaces it
    for i, (v, old) in enumerate(zip(jaxpr.outvars, keep, strict=True)):
        if old is not None and isinstance(v, Var) and v in produced:
            owner.setdefault(v, i)
    replace = {v: keep[i] for v, i in owner.items()}
    plain_jit = jax.make_jaxpr(_PLAIN_JIT)(jnp.float32(0)).eqns[0]
    watch_var = None if watch is None else jaxpr.outvars[watch]
    selected: set = set()
    try:
        outs = eval_selecting(jaxpr, closed.consts, args, replace, verdict, plain_jit,
                              watch=watch_var, selected=selected)  # fmt: skip
    except Exception:  # any failure of the re-evaluation takes the plain path
        return None
    typed = zip(outs, jaxpr.outvars, closed.out_avals, strict=True)
    if verdict.skip is None or not all(
        _same_type(x, aval) for x, v, aval in typed if isinstance(v, Var)
    ):
        return None
    in_place = lambda i, v: isinstance(v, Var) and owner.get(v) == i and v in selected
    return [
        x if old is None or in_place(i, v) else select(verdict.skip, old, x)
        for i, (v, x, old) in enumerate(zip(jaxpr.outvars, outs, keep, strict=True))
    ]


def call_keeping(
    fun: Callable, args: tuple, keep: Callable[[Any], list], verdict: Verdict,
    watch: Callable[[list], int] | None = None,
) -> Any:  # fmt: skip
    """``fun(*args)`` with each output leaf that ``keep`` pairs with an old value replaced by
    ``select(verdict.skip, old, new)``, where it is computed.

    Args:
      fun: the step; returns a pytree.
      args: its arguments.
      keep: maps the output's shapes (a pytree of ``jax.ShapeDtypeStruct``) to a list with one
        entry per flat output leaf: the old value to keep on a skipped step, or None. It may
        raise (e.g. a structure mismatch), before anything runs.
      verdict: the predicate; when it has none yet, ``watch`` names the flat output leaf
        (by its index, from the shapes) from which ``verdict.decide`` computes it.
      watch: ``shapes -> index`` of the watched output leaf.
    """
    try:
        closed, shapes = jax.make_jaxpr(fun, return_shape=True)(*args)
    except Exception:  # e.g. Python control flow on values, outside jit: the plain path
        closed = None
    else:
        olds = keep(shapes)
        index = None if watch is None else watch(shapes)
        outs = _select_in_place(closed, jax.tree.leaves(args), olds, verdict, index)
        if outs is not None:
            return jax.tree.unflatten(jax.tree.structure(shapes), outs)
        verdict.skip = None if watch is not None else verdict.skip
    out = fun(*args)
    flat, treedef = jax.tree.flatten(out)
    olds = keep(jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), out))
    if watch is not None:
        verdict.reach(flat[watch(jax.tree.unflatten(treedef, flat))])
    pairs = zip(flat, olds, strict=True)
    flat = [x if old is None else select(verdict.skip, old, x) for x, old in pairs]
    return jax.tree.unflatten(treedef, flat)
