"""Mistakes a new user makes, caught where they are made and explained: a list where a number
belongs, an optimizer factory where an optimizer belongs, a device axis name outside a mapped
context, and nnx variables where arrays were expected."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import jaxstab

# factory -> (keyword, a value of the right kind but not one number)
NON_SCALAR = {
    "clip_by_global_norm": (jaxstab.clip_by_global_norm, "max_norm"),
    "adaptive_grad_clip": (jaxstab.adaptive_grad_clip, "clipping"),
    "zscore_clip": (jaxstab.zscore_clip, "z_threshold"),
    "quantile_clip": (jaxstab.quantile_clip, "quantile"),
    "adagc": (jaxstab.adagc, "relative"),
    "normalize_by_global_norm": (jaxstab.normalize_by_global_norm, "target"),
    "qk_clip": (jaxstab.qk_clip, "tau"),
    "stable_adamw": (lambda **kw: jaxstab.stable_adamw(1e-3, **kw), "b2"),
    "spam": (lambda **kw: jaxstab.spam(1e-3, **kw), "eps"),
    "adam_atan2": (lambda **kw: jaxstab.adam_atan2(1e-3, **kw), "a"),
    "skip_anomalies": (lambda **kw: jaxstab.skip_anomalies(optax.sgd(0.1), **kw), "z_threshold"),
}


@pytest.mark.parametrize("name", NON_SCALAR)
def test_a_list_of_hyperparameters_fails_at_construction_naming_the_argument(name):
    factory, argument = NON_SCALAR[name]
    with pytest.raises(ValueError, match=rf"{argument} must be a scalar, got shape \(2,\)"):
        factory(**{argument: [0.5, 0.9]})


def test_a_one_element_array_is_still_a_shape_not_a_scalar():
    with pytest.raises(ValueError, match=r"max_norm must be a scalar, got shape \(1,\)"):
        jaxstab.clip_by_global_norm(jnp.ones(1))
    jaxstab.clip_by_global_norm(jnp.float32(1.0))  # a 0-d array is one number


@pytest.mark.parametrize("inner", [optax.adamw, optax.chain, 3, None])
def test_skip_anomalies_wants_an_optimizer_not_its_factory(inner):
    match = "looks like a factory: call it" if callable(inner) else "inner must be an optax"
    with pytest.raises(TypeError, match=match):
        jaxstab.skip_anomalies(inner)


def test_an_unbound_axis_name_says_where_it_works():
    grads = {"w": jnp.ones(3)}
    tx = jaxstab.clip_by_global_norm(1.0, axis_name="batch")
    with pytest.raises(NameError, match=r"axis_name='batch' is not bound(.|\n)*shard_map"):
        jax.jit(lambda g: tx.update(g, tx.init(g))[0])(grads)
    layer = jaxstab.linen.BatchNorm(use_running_average=False, axis_name="batch")
    x = jnp.ones((4, 3))
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(NameError, match="leave axis_name=None"):
        layer.apply(variables, x, mutable=["batch_stats"])
    with pytest.raises(NameError, match="axis_name='data' is not bound"):
        jaxstab.all_finite(grads, axis_name="data")


def test_an_unbound_axis_name_of_an_optimizer_says_so_too():
    params = {"w": jnp.ones(3)}
    tx = jaxstab.stable_adamw(1e-3, axis_name="batch")
    with pytest.raises(NameError, match="axis_name='batch' is not bound"):
        tx.update(params, tx.init(params), params)


def test_telemetry_of_an_nnx_optimizer_is_arrays():
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    tx = optax.chain(jaxstab.clip_by_global_norm(1.0), optax.adam(1e-3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    out = jaxstab.telemetry(optimizer.opt_state)
    assert set(out) == {f"0/clip_by_global_norm/{k}" for k in ("grad_norm", "scale", "clipped")}
    assert all(isinstance(v, jax.Array) for v in out.values())
    assert float(jax.device_get(out)["0/clip_by_global_norm/scale"]) == 1.0


def test_raw_nnx_state_is_read_as_its_arrays_are():
    """``nnx.state``/``nnx.split``/``nnx.grad`` leaves are Variables, whose paths end in
    ``.value``: the path-based layouts (AGC's units, qk_clip's projections, layer_norms' layers)
    must read them as they read the plain arrays of ``nnx.to_pure_dict``."""
    from jaxstab.attention_flax import MaxLogits, dot_product_attention

    mha = nnx.MultiHeadAttention(
        4, 16, decode=False, attention_fn=dot_product_attention, rngs=nnx.Rngs(0)
    )
    raw = nnx.state(mha, nnx.Param)
    pure = nnx.to_pure_dict(raw)
    grads = lambda tree: jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), tree)

    agc = jaxstab.adaptive_grad_clip(0.01)
    from_raw, _ = agc.update(grads(raw), agc.init(raw), raw)
    from_pure, _ = agc.update(grads(pure), agc.init(pure), pure)
    raw_leaves = jax.tree.leaves(nnx.to_pure_dict(from_raw))
    pairs = zip(raw_leaves, jax.tree.leaves(from_pure), strict=True)
    assert all(jnp.array_equal(a, b) for a, b in pairs)

    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    mha(x, sow_weights=True)
    max_logits = jaxstab.gather_max_logits(nnx.to_pure_dict(nnx.pop(mha, MaxLogits)))
    qk = jaxstab.qk_clip(1.0)
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    _, state_raw = qk.update(zeros(raw), qk.init(raw), raw, max_logits=max_logits)
    _, state_pure = qk.update(zeros(pure), qk.init(pure), pure, max_logits=max_logits)
    assert float(state_raw.heads_clipped) == float(state_pure.heads_clipped) == 4.0

    assert sorted(jaxstab.layer_norms(grads(raw))) == sorted(jaxstab.layer_norms(grads(pure)))


def test_qk_clip_without_max_logits_says_what_is_missing_and_how_to_call_it():
    params = {"attn": {"query": {"kernel": jnp.ones((4, 2, 2))}}}
    tx = jaxstab.qk_clip(10.0)
    with pytest.raises(ValueError, match=r"got no max_logits: call tx\.update.*apply_gradients"):
        tx.update(params, tx.init(params), params)


def test_max_logits_without_the_recorded_collection_says_how_to_record():
    from jaxstab.attention_flax import max_logits

    with pytest.raises(KeyError, match=r"sow_weights=True.*mutable=\['attention_logits'\]"):
        max_logits({"batch_stats": {}})


AROUND_ADAM = {
    "clip_by_global_norm": lambda: optax.chain(jaxstab.clip_by_global_norm(1.0), optax.adam(0.1)),
    "adaptive_grad_clip": lambda: optax.chain(jaxstab.adaptive_grad_clip(0.01), optax.adam(0.1)),
    "zscore_clip": lambda: optax.chain(jaxstab.zscore_clip(), optax.adam(0.1)),
    "quantile_clip": lambda: optax.chain(jaxstab.quantile_clip(), optax.adam(0.1)),
    "adagc": lambda: optax.chain(jaxstab.adagc(), optax.adam(0.1)),
    "normalize_by_global_norm": lambda: optax.chain(
        jaxstab.normalize_by_global_norm(), optax.adam(0.1)
    ),
    "skip_anomalies": lambda: jaxstab.skip_anomalies(optax.adam(0.1)),
}


@pytest.mark.parametrize("name", AROUND_ADAM)
def test_optax_finds_the_optimizers_step_count_through_every_stabilizer(name):
    """``optax.tree_utils.tree_get(state, "count")`` (how users log a schedule's step) finds one
    ``count``: the optimizer's. A stabilizer's own counters have other names."""
    tx = AROUND_ADAM[name]()
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(params, state, params)
    assert int(optax.tree_utils.tree_get(state, "count")) == 3
    reset = optax.tree_utils.tree_set(state, count=jnp.zeros((), jnp.int32))
    assert int(optax.tree_utils.tree_get(reset, "count")) == 0
