"""jaxstab.linen.BatchNorm: flax's own tests with it swapped in, parity with flax, extras."""

from __future__ import annotations

import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from flax.training import train_state

import jaxstab.linen
from jaxstab import batchnorm as core

BOTH = (fnn.BatchNorm, jaxstab.linen.BatchNorm)


def normal(seed, shape, loc=0.0, scale=1.0, dtype=jnp.float32):
    """Gaussian test input from NumPy (eager jax.random would compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), dtype)


def numpy_init(key, shape, dtype=jnp.float32):
    """A LeCun-normal kernel from NumPy: jax.random in a jitted init costs seconds to compile."""
    del key
    fan_in = np.prod(shape[:-1])
    return jnp.asarray(np.random.default_rng(0).normal(0, fan_in**-0.5, shape), dtype)


@functools.partial(jax.jit, static_argnums=0)
def _train_apply(module, variables, x, mask):
    flag = {} if module.use_running_average is not None else {"use_running_average": False}
    y, upd = module.apply(variables, x, mask=mask, mutable=["batch_stats"], **flag)
    return y, upd["batch_stats"]


def train_apply(module, variables, x, mask=None):
    """Jitted training-mode apply: (output, updated batch_stats)."""
    return _train_apply(module, variables, x, mask)


@functools.partial(jax.jit, static_argnums=0)
def init(module, x):
    return module.init(jax.random.key(0), x, use_running_average=False)


@functools.partial(jax.jit, static_argnums=0)
def init_and_train(model, x, mask):
    """flax's test steps in one compile: init's output, then the stats of one training apply."""
    y, variables = model.init_with_output(jax.random.key(3), x, mask=mask)
    return y, model.apply(variables, x, mask=mask, mutable=["batch_stats"])[1]["batch_stats"]


# --------------------------------------------------------------------------------------------
# flax's BatchNorm tests (tests/linen/linen_test.py, NormalizationTest), for both classes


class FlaxBatchNormTests(parameterized.TestCase):
    """What flax checks of its BatchNorm, run with flax's class and with ours."""

    @parameterized.product(cls=BOTH, test_mask=[True, False])
    def test_batch_norm(self, cls, test_mask):
        x = np.asarray(normal(0, (4, 3, 2)))  # NumPy: the checks below compile nothing
        m = None
        if test_mask:
            m = np.random.default_rng(1).integers(0, 2, (4, 3, 1)).astype(bool)
            x = np.where(m, x, np.nan)  # masked-out positions are NaN
        model = cls(momentum=0.9, use_running_average=False)
        y, stats = jax.device_get(init_and_train(model, x, m))
        w = True if m is None else m
        np.testing.assert_allclose(y.mean((0, 1), where=w), [0.0, 0.0], atol=1e-4)
        np.testing.assert_allclose(y.var((0, 1), where=w), [1.0, 1.0], rtol=1e-4)
        np.testing.assert_allclose(stats["mean"], 0.1 * x.mean((0, 1), where=w), atol=1e-4)
        np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * x.var((0, 1), where=w), rtol=1e-4)

    @parameterized.product(cls=BOTH, test_mask=[True, False])
    def test_batch_norm_complex(self, cls, test_mask):
        x = np.asarray(normal(4, (4, 3, 2)) + 1j * normal(5, (4, 3, 2)), np.complex64)
        m = None
        if test_mask:
            m = np.random.default_rng(6).integers(0, 2, (4, 3, 1)).astype(bool)
            x = np.where(m, x, np.nan).astype(np.complex64)
        model = cls(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
        y, stats = jax.device_get(init_and_train(model, x, m))
        w = True if m is None else m
        mean = y.mean((0, 1), where=w)
        np.testing.assert_allclose(mean, [0.0, 0.0], atol=1e-4)
        np.testing.assert_allclose(y.var((0, 1), where=w), [1.0, 1.0], rtol=1e-4)
        self.assertEqual(mean.dtype, jnp.complex64)
        np.testing.assert_allclose(stats["mean"], 0.1 * x.mean((0, 1), where=w), atol=1e-4)
        np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * x.var((0, 1), where=w), rtol=1e-4)

    @parameterized.parameters(*BOTH)
    def test_batch_norm_multi_init(self, cls):
        """init outside the named axis works with axis_name set."""

        class Foo(fnn.Module):
            @fnn.compact
            def __call__(self, x):
                norm = cls(name="norm", use_running_average=False, axis_name="batch")
                x = norm(x)
                return x, norm(x)

        x = normal(7, (2, 4))
        (y1, y2), _ = Foo().init_with_output(jax.random.key(0), x)
        np.testing.assert_allclose(y1, y2, rtol=0.005)


# --------------------------------------------------------------------------------------------
# Parity with flax on ordinary data


class ParityTest(parameterized.TestCase):
    @parameterized.parameters(
        {"dtype": None, "axis": -1},
        {"dtype": None, "axis": 1},
        {"dtype": None, "axis": (1, 2)},
        {"dtype": None, "axis": -1, "use_fast_variance": False},
        {"dtype": None, "axis": -1, "masked": True},
        {"dtype": None, "axis": (1, 3), "masked": True, "use_fast_variance": False},
        {"dtype": jnp.bfloat16, "axis": -1},
        {"dtype": jnp.float16, "axis": -1, "param_dtype": jnp.float16, "masked": True},
        {"dtype": None, "axis": -1, "use_bias": False, "use_scale": False},
        {"dtype": None, "axis": -1, "force_float32_reductions": False},
    )
    def test_train_and_eval_match_flax(self, dtype, axis, masked=False, **kwargs):
        x = normal(8, (6, 3, 4, 5), loc=1.5, scale=2.0)
        mask = np.random.default_rng(9).random((6, 3, 4, 1)) < 0.7 if masked else None
        kwargs.update(momentum=0.8, axis=axis, dtype=dtype)
        models = jaxstab.linen.BatchNorm(**kwargs), fnn.BatchNorm(**kwargs)

        @jax.jit
        def run(x, mask):
            out = []
            for m in models:
                variables = m.init(jax.random.key(0), x, use_running_average=False)
                y, upd = m.apply(
                    variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
                )
                out.append([variables, y, upd["batch_stats"]])
            for m, o in zip(models, out, strict=True):  # both evaluate flax's running stats
                o.append(m.apply({**o[0], "batch_stats": out[1][2]}, x, use_running_average=True))
            return out

        (v, y, stats, y_eval), (v_ref, y_ref, stats_ref, y_eval_ref) = run(x, mask)
        chex_equal_structure(v, v_ref)  # drop-in: same variables, same values
        self.assertEqual(y.dtype, y_ref.dtype)
        tol = 1e-5 if y.dtype == jnp.float32 else 2 * float(jnp.finfo(y.dtype).eps) * 8
        np.testing.assert_allclose(y.astype(float), y_ref.astype(float), atol=tol, rtol=tol)
        for key in ("mean", "var"):
            self.assertEqual(stats[key].dtype, stats_ref[key].dtype)
            np.testing.assert_allclose(stats[key], stats_ref[key], rtol=1e-5, atol=1e-6)
        self.assertEqual(y_eval.dtype, y_eval_ref.dtype)
        np.testing.assert_allclose(
            y_eval.astype(float), y_eval_ref.astype(float), atol=tol, rtol=tol
        )


def chex_equal_structure(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------------------------
# Where flax is wrong


def test_no_cancellation_at_large_mean():
    x = normal(10, (64, 4), loc=1e5)
    variables = init(jaxstab.linen.BatchNorm(), x)
    out = {}
    for cls in BOTH:
        out[cls] = train_apply(cls(), variables, x)
    ref_var = np.var(np.asarray(x, np.float64), 0)
    ours_var = (out[BOTH[1]][1]["var"] - 0.99) / 0.01
    assert np.max(np.abs(ours_var / ref_var - 1)) < 1e-3
    np.testing.assert_allclose(out[BOTH[1]][0].std(0), 1.0, atol=2e-3)
    assert np.max(np.abs(out[BOTH[0]][0].std(0) - 1.0)) > 0.5  # flax: std 0.02 to 300


def test_pooled_masked_statistics_across_vmapped_devices():
    """The issue's example: four valid zeros on device A, one valid 10 on device B."""
    x = jnp.array([[0.0, 0, 0, 0, 7], [10, 3, 3, 3, 3]])[..., None]
    mask = jnp.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], bool)[..., None]
    stats = {}
    for cls in BOTH:
        model = cls(momentum=0.0, use_running_average=False, axis_name="d")
        variables = model.init(jax.random.key(0), x[0])
        run = lambda x, m, model=model, v=variables: train_apply(model, v, x, mask=m)[1]
        stats[cls] = jax.vmap(run, axis_name="d")(x, mask)
    np.testing.assert_allclose(stats[BOTH[1]]["mean"][:, 0], [2.0, 2.0])
    np.testing.assert_allclose(stats[BOTH[1]]["var"][:, 0], [16.0, 16.0])
    np.testing.assert_allclose(stats[BOTH[0]]["mean"][:, 0], [5.0, 5.0])  # flax: mean of means
    np.testing.assert_allclose(stats[BOTH[0]]["var"][:, 0], [25.0, 25.0])


def test_bfloat16_statistics_stay_float32():
    x = normal(11, (128, 4), loc=256.7, scale=0.5)
    model = jaxstab.linen.BatchNorm(dtype=jnp.bfloat16, momentum=0.0)
    variables = init(model, x)
    y, stats = train_apply(model, variables, x)
    assert y.dtype == jnp.bfloat16 and stats["mean"].dtype == jnp.float32
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(stats["mean"], x64.mean(0), rtol=1e-7)
    y_eval = model.apply({**variables, "batch_stats": stats}, x, use_running_average=True)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    assert np.max(np.abs(np.asarray(y_eval, np.float64) - ref)) < 0.05


# --------------------------------------------------------------------------------------------
# In models: scan, a conv net in both modes, train states, renorm, ghost batches


class Stack(fnn.Module):
    """Three Dense+BatchNorm layers scanned with nn.scan."""

    bn: type

    @fnn.compact
    def __call__(self, x, train: bool):
        class Block(fnn.Module):
            bn: type

            @fnn.compact
            def __call__(self, h, _):
                h = fnn.Dense(4, kernel_init=numpy_init)(h)
                return fnn.relu(self.bn(use_running_average=not train, momentum=0.9)(h)), None

        scanned = fnn.scan(
            Block,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=3,
        )
        return scanned(self.bn)(x, None)[0]


def test_inside_nn_scan_matches_flax():
    x = normal(12, (8, 4), loc=2.0)
    variables = Stack(fnn.BatchNorm).init(jax.random.key(0), x, train=False)
    out = {}
    for cls in BOTH:
        apply = jax.jit(
            lambda v, cls=cls: Stack(cls).apply(v, x, train=True, mutable=["batch_stats"])
        )
        out[cls] = apply(variables)
    assert out[BOTH[1]][1]["batch_stats"]["ScanBlock_0"]["BatchNorm_0"]["mean"].shape == (3, 4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *out.values())


class ConvNet(fnn.Module):
    bn: type

    @fnn.compact
    def __call__(self, x, train: bool):
        x = fnn.Conv(4, (3, 3), kernel_init=numpy_init)(x)
        x = fnn.relu(self.bn(use_running_average=not train, momentum=0.5)(x))
        return fnn.Dense(2, kernel_init=numpy_init)(x.mean((1, 2)))


class TrainState(train_state.TrainState):
    batch_stats: dict


def test_conv_net_train_and_eval_modes_match_flax():
    x, labels = normal(13, (8, 6, 6, 3), loc=0.5), jnp.arange(8) % 2
    variables = jax.jit(lambda x: ConvNet(fnn.BatchNorm).init(jax.random.key(0), x, train=False))(x)

    @functools.partial(jax.jit, static_argnums=0)
    def train_and_evaluate(net):
        def step(state, _):
            def loss(params):
                v = {"params": params, "batch_stats": state.batch_stats}
                logits, upd = net.apply(v, x, train=True, mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

            (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
            return state.apply_gradients(grads=grads, batch_stats=upd["batch_stats"]), value

        state = TrainState.create(
            apply_fn=net.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=optax.sgd(0.5),
        )
        state, losses = jax.lax.scan(step, state, length=3)
        v = {"params": state.params, "batch_stats": state.batch_stats}
        train_out = net.apply(v, x, train=True, mutable=["batch_stats"])[0]
        return losses, net.apply(v, x, train=False), train_out, state.batch_stats

    ours, flax_ = (train_and_evaluate(ConvNet(cls)) for cls in reversed(BOTH))
    np.testing.assert_allclose(ours[0], flax_[0], rtol=1e-5)
    assert ours[0][-1] < ours[0][0]  # it trains
    np.testing.assert_allclose(ours[1], flax_[1], rtol=1e-4, atol=1e-5)  # eval
    np.testing.assert_allclose(ours[2], flax_[2], rtol=1e-4, atol=1e-5)  # train
    assert np.max(np.abs(ours[1] - ours[2])) > 1e-3  # the two modes differ
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours[3], flax_[3]
    )


def test_renorm_schedule_step_counter():
    r_max, d_max = core.renorm_schedules(warmup_steps=0, r_max_steps=1, d_max_steps=1)
    model = jaxstab.linen.BatchNorm(renorm=True, r_max=r_max, d_max=d_max, momentum=0.5)
    x = normal(14, (16, 3), loc=1.0)
    variables = init(model, x)
    assert int(variables["batch_stats"]["step"]) == 0  # init does not count
    y0, stats = train_apply(model, variables, x)
    assert int(stats["step"]) == 1
    plain, _ = train_apply(jaxstab.linen.BatchNorm(momentum=0.5), variables, x)
    np.testing.assert_array_equal(y0, plain)  # step 0: r_max = 1, d_max = 0
    y1, stats = train_apply(model, {**variables, "batch_stats": stats}, x)
    assert int(stats["step"]) == 2 and not np.allclose(y1, plain)
    # Floats need no counter: the variables stay flax's.
    fixed = jaxstab.linen.BatchNorm(renorm=True).init(
        jax.random.key(0), x, use_running_average=False
    )
    assert set(fixed["batch_stats"]) == {"mean", "var"}


def test_ghost_batches_and_init_with_small_batch():
    model = jaxstab.linen.BatchNorm(virtual_batch_size=4, momentum=0.0)
    variables = init(model, jnp.ones((1, 3)))
    x = normal(15, (8, 3)) * np.array([[1.0]] * 4 + [[5.0]] * 4)
    y, stats = train_apply(model, variables, x)
    for i in (0, 4):
        ref, _ = train_apply(jaxstab.linen.BatchNorm(momentum=0.0), variables, x[i : i + 4])
        np.testing.assert_allclose(y[i : i + 4], ref, atol=1e-6)
    np.testing.assert_allclose(stats["var"], (x[:4].var(0) + x[4:].var(0)) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="must divide the batch"):
        train_apply(model, variables, x[:6])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"momentum": 2.0}, "momentum must be in"),
        ({"epsilon": -1.0}, "epsilon must be in"),
        ({"renorm": True, "r_max": 0.9}, "r_max must be in"),
        ({"renorm": True, "d_max": -0.1}, "d_max must be in"),
        ({"virtual_batch_size": 0}, "virtual_batch_size must be None or a positive int"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxstab.linen.BatchNorm(**kwargs)


def test_single_element_per_feature_in_training_warns_and_computes_what_flax_does():
    x = normal(0, (1, 3))
    model = jaxstab.linen.BatchNorm(use_running_average=False)
    reference = fnn.BatchNorm(use_running_average=False)
    variables = model.init(jax.random.key(0), x)  # init with one example is silent
    with pytest.warns(UserWarning, match="one element per feature"):
        got = model.apply(variables, x, mutable=["batch_stats"])
    want = reference.apply(reference.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_a_nan_batch_does_not_poison_running_statistics_and_is_reported():
    model = jaxstab.linen.BatchNorm(use_running_average=False, momentum=0.9)
    x = normal(0, (8, 3))
    variables = model.init(jax.random.key(0), x)
    bad = x.at[2, 1].set(jnp.nan)
    _, upd = jax.jit(
        lambda v, x: model.apply(v, x, mutable=["batch_stats", jaxstab.linen.REPORT])
    )(variables, bad)
    assert int(upd[jaxstab.linen.REPORT]["nonfinite"]) == 1
    stats = upd["batch_stats"]
    assert float(stats["mean"][1]) == 0.0 and float(stats["var"][1]) == 1.0
    assert bool(jnp.all(jnp.isfinite(stats["mean"]))) and float(stats["mean"][0]) != 0.0
    # flax's turns NaN for good
    flax_model = fnn.BatchNorm(use_running_average=False, momentum=0.9)
    _, flax_upd = flax_model.apply(flax_model.init(jax.random.key(0), x), bad,
                                   mutable=["batch_stats"])  # fmt: skip
    assert bool(jnp.isnan(flax_upd["batch_stats"]["mean"][1]))
    # without the collection mutable nothing is reported, as with any sow
    _, upd = model.apply(variables, bad, mutable=["batch_stats"])
    assert set(upd) == {"batch_stats"}


@pytest.mark.parametrize("wrap", ["scan", "remat"])
def test_gradient_through_nn_scan_and_nn_remat_equals_flax(wrap):
    """Training a stack of layers under ``nn.scan`` or ``nn.remat``: the gradient equals flax's."""

    def block(bn_cls):
        class Block(fnn.Module):
            @fnn.compact
            def __call__(self, h, _):
                return bn_cls(use_running_average=False)(fnn.Dense(4)(h)), None

        if wrap == "scan":
            axes = {"params": 0, "batch_stats": 0}
            return fnn.scan(Block, variable_axes=axes, split_rngs={"params": True}, length=3)()
        return fnn.remat(Block)()

    x = normal(0, (8, 4))
    grads = []
    for bn_cls in BOTH:
        model = block(bn_cls)
        variables = model.init(jax.random.key(1), x, None)

        def loss(params, model=model, variables=variables):
            out = model.apply({**variables, "params": params}, x, None, mutable=["batch_stats"])
            return jnp.sum(out[0][0] ** 3)

        grads.append(jax.jit(jax.grad(loss))(variables["params"]))
    for got, want in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
