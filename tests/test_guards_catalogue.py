"""skip_anomalies around any inner transformation: every optimizer of optax and optax.contrib, the
wrappers people put around them, and hand-written inners built from what the in-place rewrite of
the guard must get right (control flow, custom derivatives, callbacks, PRNG keys, nested jits).

For each inner transformation the guarded run and the plain run see the same loss and gradients;
the guarded run also sees a NaN step and a step over ``max_norm``. Accepted steps must match the
plain inner (to float rounding), the bad steps must give zero updates and leave the inner state
bit for bit as it was, and the step after them must match the plain run that never saw them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from jax.experimental import io_callback

from jaxstab import _inplace
from jaxstab.guards import skip_anomalies

# optax.noisy_sgd's default key and optax.optimistic_adam are deprecated
pytestmark = pytest.mark.filterwarnings("ignore:Specifying a key", "ignore:`optimistic_adam`")

PARAMS = {"w": jnp.array([[0.5, -1.0, 2.0], [0.25, 0.75, -0.5]]), "b": jnp.array([0.3, -0.2])}
TARGET = jax.tree.map(lambda p: 0.5 - p[::-1], PARAMS)
MAX_NORM = 1e4  # far above any healthy step here, even of the parameter-free optimizers
# The run of the guarded optimizer; the plain one sees only the "ok" steps.
STEPS = ("nan", "ok", "nan", "big", "ok")


def loss_fn(params):
    return sum(jax.tree.leaves(jax.tree.map(lambda p, t: jnp.sum((p - t) ** 2), params, TARGET)))


# Factories that take ``learning_rate`` first but cannot run with default arguments alone.
SKIP = {
    "optax.contrib.dpsgd",  # needs l2_norm_clip, noise_multiplier, seed and per-example gradients
}


def _is_optimizer_factory(fn) -> bool:
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if not parameters or parameters[0].name != "learning_rate":
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in parameters[1:]
    )


def _discovered() -> dict:
    """Every public ``learning_rate``-first factory of optax and optax.contrib that needs no
    other argument, called with ``learning_rate=1e-2`` (or its default where it has one)."""
    found = {}
    for module in (optax, optax.contrib):
        for name in sorted(dir(module)):
            fn = getattr(module, name)
            qualified = f"{module.__name__}.{name}"
            if name.startswith("_") or not inspect.isfunction(fn) or qualified in SKIP:
                continue
            if _is_optimizer_factory(fn):
                lr = inspect.signature(fn).parameters["learning_rate"]
                found[qualified] = fn if lr.default is not lr.empty else (lambda f=fn: f(1e-2))
    return found


# The wrappers people put around an optimizer, and the optimizers reading extra arguments that the
# search above does not find (optax.lbfgs, schedule_free_adamw and muon are among those it finds).
WRAPPERS = {
    "MultiSteps(adam)": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
    .gradient_transformation(),
    "inject_hyperparams(adam)": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    "masked(adam)": lambda: optax.masked(optax.adam(1e-2), {"w": True, "b": False}),
    "multi_transform": lambda: optax.multi_transform(
        {"a": optax.adam(1e-2), "s": optax.sgd(1e-2, momentum=0.9)}, {"w": "a", "b": "s"}
    ),
    "lookahead(adam)": lambda: optax.lookahead(optax.adam(1e-2), sync_period=2, slow_step_size=0.5),
    "polyak_sgd": lambda: optax.polyak_sgd(),  # max_learning_rate first
    "chain(adam, reduce_on_plateau)": lambda: optax.chain(
        optax.adam(1e-2), optax.contrib.reduce_on_plateau(patience=1, cooldown=0)
    ),
}


def momentum_like(new_mu: Callable) -> optax.GradientTransformation:
    """An inner with state ``(int32 count, mu)``: ``mu <- new_mu(count, mu, g)`` leaf by leaf, and
    updates ``-0.1 * mu``."""

    def update_fn(updates, state, params=None):
        count, mu = state
        mu = jax.tree.map(lambda m, g: new_mu(count, m, g), mu, updates)
        return jax.tree.map(lambda m: -0.1 * m, mu), (count + 1, mu)

    return optax.GradientTransformation(
        lambda params: (jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params)), update_fn
    )


@jax.custom_jvp
def soft_jvp(x):
    return x / (1 + jnp.abs(x))


soft_jvp.defjvp(lambda primals, tangents: (soft_jvp(*primals), tangents[0]))


@jax.custom_vjp
def soft_vjp(x):
    return x / (1 + jnp.abs(x))


soft_vjp.defvjp(lambda x: (soft_vjp(x), None), lambda _, g: (g,))

IO_CALLS = []  # one entry per call of the io_callback below


def _io_moment(m, g):
    IO_CALLS.append(1)
    return (0.9 * m + g).astype(m.dtype)


def with_keys() -> optax.GradientTransformation:
    """An inner adding noise from a typed key and a raw uint32 key, both split every step."""

    def update_fn(updates, state, params=None):
        key, raw, mu = state
        key, sub = jax.random.split(key)
        raw, raw_sub = jax.random.split(raw)
        noise = jax.random.normal(sub, (2,)) + jax.random.uniform(raw_sub, (2,))
        mu = jax.tree.map(lambda m, g: 0.9 * m + g + 1e-3 * noise[0], mu, updates)
        return jax.tree.map(lambda m: -0.1 * m, mu), (key, raw, mu)

    return optax.GradientTransformation(
        lambda p: (jax.random.key(0), jax.random.PRNGKey(1), jax.tree.map(jnp.zeros_like, p)),
        update_fn,
    )


def nested_jit(returns: Callable) -> optax.GradientTransformation:
    """An inner whose new state comes out of a nested ``jax.jit`` of ``returns(count, mu, g)``."""
    jitted = jax.jit(returns)

    def update_fn(updates, state, params=None):
        state = jitted(*state, updates)
        return jax.tree.map(lambda m: -0.1 * m, state[1]), state

    return optax.GradientTransformation(
        lambda p: (jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, p), jnp.int32(100)),
        update_fn,
    )


def _moment(mu, g):
    return jax.tree.map(lambda m, x: 0.9 * m + x, mu, g)


# Inners built to stress the guard's in-place rewrite: each new-state leaf comes out of a
# different construct.
HAND_WRITTEN = {
    "lax.cond": lambda: momentum_like(
        lambda c, m, g: jax.lax.cond(c % 2 == 0, lambda: 0.9 * m + g, lambda: 0.5 * m - g)
    ),
    "lax.while_loop": lambda: momentum_like(
        lambda c, m, g: jax.lax.while_loop(
            lambda im: im[0] < c % 3 + 1, lambda im: (im[0] + 1, 0.5 * im[1] + g), (0, m)
        )[1]
    ),
    "lax.scan": lambda: momentum_like(
        lambda c, m, g: jax.lax.scan(lambda m, _: (0.9 * m + g, None), m, length=3)[0]
    ),
    "custom_jvp": lambda: momentum_like(lambda c, m, g: 0.9 * m + soft_jvp(g)),
    "custom_vjp": lambda: momentum_like(lambda c, m, g: 0.9 * m + soft_vjp(g)),
    "pure_callback": lambda: momentum_like(
        lambda c, m, g: jax.pure_callback(
            lambda m, g: np.asarray(0.9 * m + g), jax.ShapeDtypeStruct(m.shape, m.dtype), m, g
        )
    ),
    "io_callback": lambda: momentum_like(
        lambda c, m, g: io_callback(
            _io_moment, jax.ShapeDtypeStruct(m.shape, m.dtype), m, g
        )
    ),
    "PRNG keys": with_keys,
    "nested jit returning a constant": lambda: nested_jit(
        lambda c, mu, mark, g: (c + 1, _moment(mu, g), jnp.int32(0))
    ),
    "nested jit returning one value twice": lambda: nested_jit(
        lambda c, mu, mark, g: (lambda n: (n, _moment(mu, g), n))(c + 1)
    ),
}
CATALOGUE = {**_discovered(), **WRAPPERS, **HAND_WRITTEN}


def test_the_catalogue_found_the_optimizers():
    for name in ("optax.adam", "optax.adamw", "optax.sgd", "optax.lion", "optax.adafactor",
                 "optax.lbfgs", "polyak_sgd", "optax.noisy_sgd", "optax.contrib.prodigy",
                 "optax.contrib.schedule_free_adamw", "optax.contrib.muon",
                 "optax.contrib.sophia"):  # fmt: skip
        assert name in CATALOGUE
    assert len(CATALOGUE) >= 50


# The extra arguments of the optimizers that read them (optax.lbfgs rejects any other).
EXTRA_ARGS = {
    "optax.lbfgs": ("value", "grad", "value_fn"),
    "polyak_sgd": ("value",),
    "optax.contrib.momo": ("value",),
    "optax.contrib.momo_adam": ("value",),
    "chain(adam, reduce_on_plateau)": ("value",),
    "optax.contrib.sophia": ("obj_fn",),
}
KINDS = {"ok": 0, "nan": 1, "big": 2}  # a "big" step's gradients are far over MAX_NORM


def _extra_args(name, params, grad) -> dict:
    """The extra arguments ``name`` reads, at ``params`` with gradients ``grad``."""
    wanted = EXTRA_ARGS.get(name, ())
    extra = {"grad": grad, "value_fn": loss_fn, "obj_fn": loss_fn}
    if "value" in wanted:
        extra["value"] = loss_fn(params)
    return {k: extra[k] for k in wanted}


def _initial_params(name):
    """PARAMS, as fast and slow copies for lookahead."""
    return optax.LookaheadParams.init_synced(PARAMS) if name.startswith("lookahead") else PARAMS


def _runs(name, guarded, plain):
    """Runs ``guarded`` over STEPS and ``plain`` over their "ok" steps from PARAMS, the parameters
    following the updates, with one jitted step for both (one compilation). Returns each run as a
    list of ``(params, state, updates)``, the first without updates."""
    trained = (lambda p: p.fast) if name.startswith("lookahead") else (lambda p: p)

    def run_step(tx, params, state, kind):
        grad = jax.tree.map(
            lambda g: g * jnp.where(kind == 1, jnp.nan, 1.0) + jnp.where(kind == 2, 1e5, 0.0),
            jax.grad(loss_fn)(trained(params)),
        )
        updates, state = tx.update(grad, state, params, **_extra_args(name, trained(params), grad))
        return optax.apply_updates(params, updates), state, updates

    @jax.jit
    def step(guarded_run, plain_run, kind):
        return run_step(guarded, *guarded_run, kind), run_step(plain, *plain_run, KINDS["ok"])

    params = _initial_params(name)
    guarded_runs = [(params, guarded.init(params), None)]
    plain_runs = [(params, plain.init(params), None)]
    for kind in STEPS:
        guarded_run, plain_run = step(guarded_runs[-1][:2], plain_runs[-1][:2], KINDS[kind])
        guarded_runs.append(guarded_run)
        if kind == "ok":  # the plain run never sees the bad steps
            plain_runs.append(plain_run)
    return guarded_runs, plain_runs


def _as_numpy(tree):
    def leaf(x):
        if jax.dtypes.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(leaf, tree)


def assert_bit_identical(got, want):
    got, want = _as_numpy(got), _as_numpy(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (g.dtype, g.shape) == (w.dtype, w.shape)
        assert g.tobytes() == w.tobytes(), (g, w)


def assert_close(got, want):
    got, want = _as_numpy(got), _as_numpy(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        if jnp.issubdtype(g.dtype, jnp.inexact):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_skipped_steps_never_happened(name):
    inner = CATALOGUE[name]()
    assert isinstance(inner, optax.GradientTransformation)
    guarded = skip_anomalies(inner, max_norm=MAX_NORM, warmup_steps=1000)
    guarded_runs, plain_runs = _runs(name, guarded, CATALOGUE[name]())
    accepted = 0
    for i, kind in enumerate(STEPS):
        (_, before, _), (_, after, updates) = guarded_runs[i : i + 2]
        if kind == "ok":
            accepted += 1
            _, plain_state, plain_updates = plain_runs[accepted]
            assert not bool(after.skipped)
            assert_close(updates, plain_updates)
            assert_close(after.inner_state, plain_state)
        else:
            assert bool(after.skipped)
            assert_bit_identical(after.inner_state, before.inner_state)
            assert_bit_identical(updates, jax.tree.map(jnp.zeros_like, plain_runs[1][2]))
    assert accepted == len(plain_runs) - 1


def test_side_effects_run_once_per_step():
    tx = skip_anomalies(CATALOGUE["io_callback"](), warmup_steps=1)
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    IO_CALLS.clear()
    for scale in (1.0, np.nan, 1.0):
        _, state = update(jax.tree.map(lambda p, s=scale: p * s, PARAMS), state)
    assert int(state.skipped_total) == 1
    assert len(IO_CALLS) == 2 * 3  # one call per leaf and step, skipped steps too


# Inners whose update the guard does not re-evaluate in place, and whose state it selects after the
# plain update (correct, but XLA copies the state). Every optimizer of optax is on the fast path;
# Adam, AdamW, SGD and Lion in particular must stay there (no state copy, see test_guards.py).
FALLBACK = {"io_callback"}  # side effects: run once, by the plain update


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_which_optimizers_take_the_fast_path(name, monkeypatch):
    taken = []

    def recording(*args):
        outs = select_in_place(*args)
        taken.append(outs is not None)
        return outs

    select_in_place = _inplace._select_in_place
    monkeypatch.setattr(_inplace, "_select_in_place", recording)
    tx = skip_anomalies(CATALOGUE[name]())
    params = _initial_params(name)
    extra = _extra_args(name, PARAMS, PARAMS)
    jax.eval_shape(lambda s: tx.update(PARAMS, s, params, **extra), tx.init(params))
    assert taken == [name not in FALLBACK]
