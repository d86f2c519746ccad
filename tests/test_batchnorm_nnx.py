"""jaxstab.nnx.BatchNorm: parity with flax.nnx, bit-identity with jaxstab.linen, extras."""

from __future__ import annotations

import dataclasses
import functools

import chex
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from flax import nnx

import jaxstab.linen
import jaxstab.nnx
from jaxstab import batchnorm as core


def normal(seed, shape, loc=0.0, scale=1.0, dtype=jnp.float32):
    """Gaussian test input from NumPy (eager jax.random would compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), dtype)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _nnx_run(graphdef, state, x, use_running_average, mask):
    model = nnx.merge(graphdef, state)
    y = model(x, use_running_average, mask=mask)
    return y, nnx.state(model)


def nnx_apply(model, x, mask=None, use_running_average=None):
    """Runs an nnx module under jit; returns (output, its BatchStat state after the call)."""
    graphdef, state = nnx.split(model)
    y, state = _nnx_run(graphdef, state, x, use_running_average, mask)
    nnx.update(model, state)
    return y, nnx.state(model, nnx.BatchStat)


@functools.partial(jax.jit, static_argnums=0)
def _linen_run(model, variables, x, mask):
    return model.apply(variables, x, mask=mask, mutable=["batch_stats"])


def linen_apply(model, variables, x, mask=None):
    """Jitted training-mode linen apply: (output, updated batch_stats)."""
    y, upd = _linen_run(model, variables, x, mask)
    return y, upd["batch_stats"]


# --------------------------------------------------------------------------------------------
# flax's nnx/linen equivalence test (tests/nnx/nn/normalization_test.py), for both pairs

PAIRS = {
    "flax": (fnn.BatchNorm, nnx.BatchNorm),
    "jaxstab": (jaxstab.linen.BatchNorm, jaxstab.nnx.BatchNorm),
}


FEATURE_MASK = np.array([True, False, True, False, True])
CONSISTENCY_CASES = [  # flax's own pair only in float32: its nnx casts to float16 first
    dict(pair=pair, dtype=dtype, use_fast_variance=fast, mask=mask)
    for pair, dtype, fast, mask in (
        ("jaxstab", jnp.float32, True, None),
        ("jaxstab", jnp.float32, False, FEATURE_MASK),
        ("jaxstab", jnp.float16, False, None),
        ("jaxstab", jnp.float16, True, FEATURE_MASK),
        ("flax", jnp.float32, True, None),
        ("flax", jnp.float32, False, FEATURE_MASK),
    )
]


class LinenConsistencyTest(parameterized.TestCase):
    @parameterized.parameters(*CONSISTENCY_CASES)
    def test_nnx_linen_batchnorm_equivalence(self, pair, dtype, use_fast_variance, mask):
        linen_cls, nnx_cls = PAIRS[pair]
        kwargs = dict(use_running_average=False, dtype=dtype, use_fast_variance=use_fast_variance)
        x = normal(0, (10, 5))
        linen_model = linen_cls(**kwargs)
        variables = jax.jit(lambda x: linen_model.init(jax.random.key(1), x))(x)
        linen_out, linen_stats = linen_apply(linen_model, variables, x, mask)
        nnx_model = nnx_cls(5, rngs=nnx.Rngs(42), **kwargs)
        nnx_out, nnx_stats = nnx_apply(nnx_model, x, mask)
        np.testing.assert_array_equal(linen_out, nnx_out)
        if pair == "jaxstab":
            np.testing.assert_array_equal(linen_stats["mean"], nnx_stats["mean"][...])
            np.testing.assert_array_equal(linen_stats["var"], nnx_stats["var"][...])


# --------------------------------------------------------------------------------------------
# linen and nnx: bit-identical, extras included


@pytest.mark.parametrize(
    "kwargs",
    [
        {"axis": (1, 3), "masked": True},
        {"masked": True, "use_fast_variance": False},
        {"renorm": True, "r_max": 1.5, "d_max": 0.5},
        {"renorm": True, "schedules": True},
        {"virtual_batch_size": 2, "unbiased_running_var": True, "dtype": jnp.bfloat16},
    ],
)
def test_linen_and_nnx_are_bit_identical(kwargs):
    kwargs = dict(kwargs, momentum=0.7)
    masked = kwargs.pop("masked", False)
    if kwargs.pop("schedules", False):
        kwargs["r_max"], kwargs["d_max"] = core.renorm_schedules(
            warmup_steps=0, r_max_steps=2, d_max_steps=2
        )
    x = normal(1, (4, 3, 2, 5), loc=3.0, scale=2.0)
    mask = np.random.default_rng(2).random((4, 3, 2, 1)) < 0.7 if masked else None
    axis = kwargs.get("axis", -1)
    features = core.BatchNormConfig(axis=axis).feature_shape(x.shape)
    linen_model = jaxstab.linen.BatchNorm(use_running_average=False, **kwargs)
    variables = jax.jit(lambda x: linen_model.init(jax.random.key(0), x))(x)
    nnx_model = jaxstab.nnx.BatchNorm(features, rngs=nnx.Rngs(0), **kwargs)
    for _ in range(2):  # two steps: the second one starts from updated running statistics
        linen_y, stats = linen_apply(linen_model, variables, x, mask)
        variables = {**variables, "batch_stats": stats}
        nnx_y, nnx_stats = nnx_apply(nnx_model, x, mask)
        np.testing.assert_array_equal(linen_y, nnx_y)
        assert set(stats) == set(nnx_stats)
        for key in stats:
            np.testing.assert_array_equal(stats[key], nnx_stats[key][...])
    evaluate = linen_model.clone(use_running_average=True).apply
    linen_eval = jax.jit(evaluate)(variables, x)
    nnx_eval, _ = nnx_apply(nnx_model, x, use_running_average=True)
    np.testing.assert_array_equal(linen_eval, nnx_eval)


# --------------------------------------------------------------------------------------------
# Parity with flax.nnx where flax is right, accuracy where it is not


@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_float32_matches_flax_nnx(use_fast_variance):
    x = normal(3, (16, 6), loc=1.0, scale=3.0)
    out = []
    for cls in (nnx.BatchNorm, jaxstab.nnx.BatchNorm):
        model = cls(6, momentum=0.9, use_fast_variance=use_fast_variance, rngs=nnx.Rngs(0))
        y, stats = nnx_apply(model, x)
        model.eval()
        y_eval, _ = nnx_apply(model, x)
        out.append((y, stats["mean"][...], stats["var"][...], y_eval))
    for ours, theirs in zip(*out, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bfloat16_eval_is_accurate():
    """The issue's case: mean 256.7, std 0.5, dtype=bfloat16. flax.nnx: 0.09 (flax 0.11) to
    several units (0.12) against jaxstab's 0.008."""
    x = normal(4, (256, 4), loc=256.7, scale=0.5)
    x64 = np.asarray(x, np.float64)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    errors = {}
    for cls in (nnx.BatchNorm, jaxstab.nnx.BatchNorm):
        model = cls(4, momentum=0.0, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        nnx_apply(model, x)  # one training step: running stats = batch stats
        y, _ = nnx_apply(model, x, use_running_average=True)
        assert y.dtype == jnp.bfloat16 and model.mean[...].dtype == jnp.float32
        errors[cls] = np.max(np.abs(np.asarray(y, np.float64) - ref))
    assert errors[jaxstab.nnx.BatchNorm] < 0.05
    assert errors[nnx.BatchNorm] > 10 * errors[jaxstab.nnx.BatchNorm]


# --------------------------------------------------------------------------------------------
# The module itself


def test_variables_train_and_eval():
    model = jaxstab.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    assert set(state) == {"mean", "var", "scale", "bias"}
    assert isinstance(model.mean, nnx.BatchStat) and isinstance(model.scale, nnx.Param)
    x = normal(5, (8, 3), loc=2.0)
    y, stats = nnx_apply(model, x)
    np.testing.assert_allclose(stats["mean"][...], 0.01 * x.mean(0), rtol=1e-5)
    model.eval()
    assert model.use_running_average is True
    y_eval, same = nnx_apply(model, x)
    np.testing.assert_array_equal(same["mean"][...], stats["mean"][...])
    assert not np.allclose(y, y_eval)
    model.train()
    assert model.use_running_average is False


@pytest.mark.skipif(not hasattr(nnx, "view"), reason="nnx.view is new in flax 0.12.4")
def test_view_sets_use_running_average():
    model = jaxstab.nnx.BatchNorm(3, use_running_average=True, rngs=nnx.Rngs(0))
    trained = nnx.view(model, use_running_average=False)
    assert trained.use_running_average is False and model.use_running_average is True


@pytest.mark.skipif(not hasattr(nnx, "view_info"), reason="flax 0.11 has no nnx.view_info")
def test_view_info_describes_set_view():
    """``nnx.view_info`` reads the arguments from ``set_view``'s docstring (a KeyError without)."""
    model = jaxstab.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    info = nnx.view_info(model)
    assert "BatchNorm:" in info and "use_running_average" in info and "running statistics" in info


def test_no_scale_no_bias_and_tuple_features():
    model = jaxstab.nnx.BatchNorm(
        (3, 2), axis=(1, -1), use_scale=False, use_bias=False, rngs=nnx.Rngs(0)
    )
    assert model.scale is None and model.bias is None and model.mean[...].shape == (3, 2)
    x = normal(6, (4, 3, 5, 2))
    y, _ = nnx_apply(model, x)
    x64 = np.asarray(x, np.float64)
    mean, var = x64.mean((0, 2), keepdims=True), x64.var((0, 2), keepdims=True)
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5), atol=1e-5)


def test_gradients_through_nnx_training_step():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.bn = jaxstab.nnx.BatchNorm(4, renorm=True, r_max=2.0, d_max=1.0, rngs=rngs)

        def __call__(self, x):
            return jnp.sum(jnp.tanh(self.bn(x)) * jnp.arange(4.0))

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: m(x))(model)
        optimizer.update(model, grads)
        return loss, grads

    _, grads = step(model, optimizer, normal(7, (8, 4), loc=10.0))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["bn"]["scale"][...]).sum()) > 0
    assert model.bn.mean[...][0] != 0  # the running statistics moved


def test_errors():
    with pytest.raises(ValueError, match="momentum must be in"):
        jaxstab.nnx.BatchNorm(3, momentum=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_max must be in"):
        jaxstab.nnx.BatchNorm(3, renorm=True, d_max=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features must give one size per feature axis"):
        jaxstab.nnx.BatchNorm(3, axis=(1, 2), rngs=nnx.Rngs(0))
    model = jaxstab.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x.shape = \(4, 5\) with axis = -1 has features"):
        jax.eval_shape(lambda x: model(x), jnp.ones((4, 5)))
    x, reference = normal(9, (1, 3)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match="one element per feature"):  # flax allows it
        np.testing.assert_allclose(model(x), reference(x), atol=1e-6)
    np.testing.assert_allclose(model.mean[...], reference.mean[...], rtol=1e-6)
    np.testing.assert_allclose(model.var[...], reference.var[...], rtol=1e-6)
    undecided = jaxstab.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs use_running_average"):
        undecided(jnp.ones((4, 3)))


def test_linen_checkpoint_loads_into_nnx():
    """Both modules name their variables as flax does: a linen checkpoint maps one to one."""
    x = normal(8, (6, 4), loc=1.0)
    linen_model = jaxstab.linen.BatchNorm(use_running_average=True)
    variables = {
        "params": {"scale": jnp.arange(1.0, 5.0), "bias": jnp.ones(4)},
        "batch_stats": {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 2.0)},
    }
    model = jaxstab.nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0))
    for collection in variables.values():
        for name, value in collection.items():
            getattr(model, name)[...] = value
    np.testing.assert_array_equal(linen_model.apply(variables, x), model(x))


# --------------------------------------------------------------------------------------------
# One config, checked in one place, held by both modules


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("axis", 1.5),
        ("momentum", 1.5),
        ("epsilon", 0.0),
        ("d_max", -1.0),
        ("virtual_batch_size", 0),
    ],
)
def test_bad_option_raises_the_config_error_from_both_modules(option, value):
    options = {option: value, "renorm": True}
    with pytest.raises(ValueError, match=f"^{option} must be") as expected:
        core.BatchNormConfig(**options)
    with pytest.raises(ValueError) as from_linen:
        jaxstab.linen.BatchNorm(**options)
    with pytest.raises(ValueError) as from_nnx:
        jaxstab.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **options)
    assert str(from_linen.value) == str(from_nnx.value) == str(expected.value)


def test_both_modules_hold_the_same_config():
    r_max, d_max = core.renorm_schedules()
    options = dict(axis=(1, 2), momentum=0.9, renorm=True, r_max=r_max, d_max=d_max)
    expected = core.BatchNormConfig(**options)
    linen_model = jaxstab.linen.BatchNorm(**options)
    nnx_model = jaxstab.nnx.BatchNorm((3, 4), rngs=nnx.Rngs(0), **options)
    assert linen_model.config == nnx_model.config == expected
    two_pass = dict(use_fast_variance=False, use_variance_shift=False)
    for flags, variance in (
        ({}, "shifted"),
        ({"use_variance_shift": False}, "fast"),
        (two_pass, "two_pass"),
    ):
        assert jaxstab.linen.BatchNorm(**flags).config.variance == variance
        assert jaxstab.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **flags).config.variance == variance


def test_linen_module_stays_a_hashable_cloneable_dataclass():
    model = jaxstab.linen.BatchNorm(axis=(1, 2), momentum=0.9)
    assert "config" not in {f.name for f in dataclasses.fields(model)}  # derived, not an argument
    assert model == jaxstab.linen.BatchNorm(axis=(1, 2), momentum=0.9)
    assert hash(model) == hash(jaxstab.linen.BatchNorm(axis=(1, 2), momentum=0.9))
    clone = model.clone(momentum=0.5)
    assert clone.config == dataclasses.replace(model.config, momentum=0.5)
    with pytest.raises(ValueError, match="momentum must be in"):
        model.clone(momentum=2.0)


def test_nnx_config_is_static_and_options_read_and_write_as_attributes():
    models = [jaxstab.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(seed)) for seed in (0, 1)]
    graphdef, state = nnx.split(models[0])
    assert graphdef == nnx.graphdef(models[1]) and hash(graphdef) == hash(nnx.graphdef(models[1]))
    assert "config" not in state

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def forward(model, x):
        return model(x)

    x = normal(9, (4, 3))
    for model in models:  # equal configs: one trace
        forward(model, x)
    model = models[0]
    assert model.momentum == 0.9 and model.epsilon == 1e-5 and model.axis == -1
    model.momentum = 0.5  # as on flax's module, checked into a new config
    assert model.config == dataclasses.replace(models[1].config, momentum=0.5)
    with pytest.raises(ValueError, match="momentum must be in"):
        model.momentum = 2.0
    assert model.momentum == 0.5
    with pytest.raises(AttributeError, match="no attribute 'momentom'"):
        model.momentom  # noqa: B018


@pytest.mark.parametrize(("fast", "shift", "variance"), [
    (True, True, "shifted"), (True, False, "fast"), (False, True, "two_pass"),
])
def test_nnx_variance_flags_are_flax_attributes_and_set_the_variance(fast, shift, variance):
    flax_bn = nnx.BatchNorm(3, use_fast_variance=fast, rngs=nnx.Rngs(0))
    model = jaxstab.nnx.BatchNorm(
        3, use_fast_variance=fast, use_variance_shift=shift, rngs=nnx.Rngs(0)
    )
    assert model.use_fast_variance is flax_bn.use_fast_variance is fast
    assert model.use_variance_shift is shift and model.config.variance == variance
    model.use_fast_variance = not fast  # as on flax's module: the next call uses the other pass
    assert model.use_fast_variance is not fast
    assert model.config.variance == ("two_pass" if fast else "shifted" if shift else "fast")
    model.use_fast_variance, model.use_variance_shift = True, False  # flax's one pass exactly
    x = normal(9, (4, 3))
    one_pass = nnx.BatchNorm(3, use_fast_variance=True, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model(x), one_pass(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.var[...], one_pass.var[...], rtol=1e-6)


def test_a_nan_batch_does_not_poison_running_statistics_and_is_reported():
    bn = jaxstab.nnx.BatchNorm(3, momentum=0.9, report=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(0, 1, (8, 3)), jnp.float32)
    nnx.jit(lambda m, x: m(x))(bn, x.at[2, 1].set(jnp.inf))
    assert int(bn.nonfinite[...]) == 1
    assert float(bn.mean[1]) == 0.0 and float(bn.var[1]) == 1.0 and float(bn.mean[0]) != 0.0
    bn(x)
    assert int(bn.nonfinite[...]) == 0
    plain = jaxstab.nnx.BatchNorm(3, rngs=nnx.Rngs(0))  # the default adds no state leaf
    flax_bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(plain)) == jax.tree.structure(nnx.state(flax_bn))
    assert isinstance(bn.nonfinite, jaxstab.nnx.BatchNormReport)
