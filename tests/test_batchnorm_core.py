"""The pure batch-norm core, jaxstab.batchnorm: statistics, normalization, renorm, ghost batches."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxstab import batchnorm as core
from jaxstab.batchnorm._batch_norm import _output_dtype
from jaxstab.batchnorm._moments import VARIANCES

SETTINGS = settings(max_examples=25, deadline=None)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _moments(x, axes, mask, static):
    return core.moments(x, axes, mask=mask, **dict(static))


def moments(x, axes, mask=None, **kwargs):
    """Jitted :func:`core.moments`, compiled once per shape and static arguments."""
    return _moments(x, axes, mask, tuple(sorted(kwargs.items())))


@functools.partial(jax.jit, static_argnums=5)
def _batch_norm(x, stats, scale, bias, mask, static):
    return core.batch_norm(x, stats, scale, bias, mask=mask, **dict(static))


def batch_norm(x, stats, scale=None, bias=None, mask=None, **kwargs):
    """Jitted :func:`core.batch_norm`, compiled once per shape and static arguments."""
    return _batch_norm(x, stats, scale, bias, mask, tuple(sorted(kwargs.items())))


@functools.partial(jax.jit, static_argnums=1)
def all_variances(x, axes, mask=None):
    """:func:`core.moments` with each variance algorithm, in one compile."""
    return {v: core.moments(x, axes, mask=mask, variance=v) for v in VARIANCES}


def trace(x, stats, **kwargs):
    """Traces :func:`core.batch_norm` without compiling: shape and argument errors surface."""
    return jax.eval_shape(lambda x, s: core.batch_norm(x, s, **kwargs), x, stats)


def normal(seed, shape, loc=0.0, scale=1.0, dtype=jnp.float32):
    """Gaussian test input from NumPy (eager jax.random would compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), dtype)


def np_moments(x, axes, mask=None):
    """Float64 NumPy reference: masked mean and biased variance over ``axes``."""
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    n = m.sum(axes, keepdims=True)
    mean = np.where(m, x, 0).sum(axes, keepdims=True) / n
    var = np.where(m, (x - mean) ** 2, 0).sum(axes, keepdims=True) / n
    return mean, var, n


# --------------------------------------------------------------------------------------------
# moments


class MomentsTest(chex.TestCase):
    @parameterized.parameters((0,), (0, 2))
    def test_matches_numpy(self, *axes):
        x = normal(0, (6, 5, 4), loc=2, scale=3)
        ref_mean, ref_var, ref_n = np_moments(x, axes)
        for variance, (mean, var, count) in all_variances(x, axes).items():
            np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6, err_msg=variance)
            np.testing.assert_allclose(var, ref_var, rtol=1e-5, atol=1e-6 * np.max(ref_var))
            np.testing.assert_array_equal(count, np.broadcast_to(ref_n, count.shape))

    def test_masked_matches_numpy_and_ignores_nan(self):
        x = normal(1, (8, 3, 2), loc=5)
        mask = np.random.default_rng(1).random((8, 3, 1)) < 0.6
        mask[:2] = True
        x = jnp.where(mask, x, np.nan)  # masked positions may hold anything
        ref_mean, ref_var, ref_n = np_moments(x, (0, 1), mask)
        for variance, (mean, var, count) in all_variances(x, (0, 1), mask).items():
            np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, err_msg=variance)
            np.testing.assert_allclose(var, ref_var, rtol=1e-4, err_msg=variance)
            np.testing.assert_array_equal(count, np.broadcast_to(ref_n, count.shape))

    def test_feature_without_valid_element_is_finite(self):
        x = jnp.arange(12.0).reshape(4, 3)
        mask = jnp.array([True, False, True])  # feature 1 has no valid element
        mean, var, count = moments(x, 0, mask=mask)
        assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))
        np.testing.assert_array_equal(count, [[4.0, 0.0, 4.0]])
        np.testing.assert_array_equal(var[0, 1], 0.0)

    @parameterized.parameters(1e3, 1e4, 1e5, 1e6)
    def test_no_cancellation_on_first_step(self, ratio):
        """Shifted one-pass variance at mean/std = ratio, float32: relative error < 1e-3."""
        x = normal(2, (256, 8), loc=ratio)
        _, ref_var, _ = np_moments(np.asarray(x), 0)
        errors = {
            k: np.max(np.abs(np.asarray(m.var) / ref_var - 1))
            for k, m in all_variances(x, (0,)).items()
        }
        assert errors["shifted"] < 1e-3 and errors["two_pass"] < 1e-3, errors
        assert errors["fast"] > 0.05, errors  # flax's formula: the cancellation fixed here

    @SETTINGS
    @given(
        x=st.sampled_from([(5, 3), (2, 4, 2), (9, 1)]).flatmap(
            lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32))
        ),
        offset=st.sampled_from([0.0, 1e2, 1e4]),
    )
    def test_property_matches_numpy(self, x, offset):
        x = x + np.float32(offset)
        mean, var, _ = moments(jnp.asarray(x), 0)
        ref_mean, ref_var, _ = np_moments(x, 0)
        scale = np.abs(ref_mean) + np.sqrt(ref_var) + 1
        np.testing.assert_allclose(mean, ref_mean, atol=1e-5 * np.max(scale))
        # Absolute error of a float32 variance: a few ulps of the spread's square.
        spread = np.max(np.abs(x - ref_mean), axis=0, keepdims=True)
        np.testing.assert_allclose(var, ref_var, atol=np.max(1e-5 * spread**2) + 1e-30)

    def test_gradients_are_exact_at_large_mean(self):
        """d/dx of sum(w * var) is 2 w (x - mean) / n: exact, no cancellation in the backward."""
        x = normal(3, (64, 3), loc=1e4)
        w = jnp.array([1.0, 2.0, 3.0])
        grad = jax.jit(jax.grad(lambda x: jnp.sum(w * core.moments(x, 0).var)))(x)
        x64 = np.asarray(x, np.float64)
        expected = 2 * np.asarray(w) * (x64 - x64.mean(0)) / x.shape[0]
        np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

    def test_gradients_match_autodiff_of_two_pass(self):
        x = normal(4, (16, 4))
        mask = np.arange(16)[:, None] % 3 != 0

        def loss(moments_fn, x):
            mean, var = moments_fn(x)
            return jnp.sum(jnp.sin(mean) + jnp.cos(var) * mean)

        def naive(x):
            mean = jnp.mean(x, 0, keepdims=True, where=mask)
            return mean, jnp.mean((x - mean) ** 2, 0, keepdims=True, where=mask)

        ours_fn = lambda x: core.moments(x, 0, mask=mask)[:2]
        ours = jax.jit(jax.grad(lambda x: loss(ours_fn, x)))(x)
        ref = jax.jit(jax.grad(lambda x: loss(naive, x)))(x)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)

    def test_complex_input(self):
        x = jnp.asarray(normal(5, (12, 2), loc=3) + 1j * normal(6, (12, 2)), jnp.complex64)
        mean, var, _ = moments(x, 0)
        assert mean.dtype == jnp.complex64 and var.dtype == jnp.float32
        xn = np.asarray(x, np.complex128)
        np.testing.assert_allclose(mean[0], xn.mean(0), rtol=1e-5)
        np.testing.assert_allclose(var[0], np.mean(np.abs(xn - xn.mean(0)) ** 2, 0), rtol=1e-5)

    def test_bfloat16_input_accumulates_in_float32(self):
        x = normal(6, (512, 2), loc=256.0, dtype=jnp.bfloat16)
        mean, var, _ = moments(x, 0)
        assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
        ref_mean, ref_var, _ = np_moments(np.asarray(x, np.float32), 0)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
        np.testing.assert_allclose(var, ref_var, rtol=1e-4)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="variance must be one of"):
            moments(jnp.ones((2, 2)), 0, variance="exact")
        with pytest.raises(ValueError, match="axes must hold axes in"):
            moments(jnp.ones((2, 2)), 2)


# --------------------------------------------------------------------------------------------
# Exact pooling across (simulated) devices


class PooledTest(chex.TestCase):
    def test_issue_example_unequal_valid_counts(self):
        """Device A: four valid zeros; device B: one valid 10 -> mean 2, var 16 (flax: 5, 25)."""
        x = jnp.array([[0.0, 0, 0, 0, 7], [10, 3, 3, 3, 3]])[..., None]
        mask = jnp.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], bool)[..., None]
        for variance in VARIANCES:
            pooled = jax.vmap(
                lambda x, m, v=variance: core.moments(x, 0, mask=m, axis_name="d", variance=v),
                axis_name="d",
            )
            stats = jax.jit(pooled)(x, mask)
            np.testing.assert_allclose(stats.mean[:, 0, 0], [2.0, 2.0], err_msg=variance)
            np.testing.assert_allclose(stats.var[:, 0, 0], [16.0, 16.0], err_msg=variance)
            np.testing.assert_array_equal(stats.count[:, 0, 0], [5.0, 5.0])

    @parameterized.parameters(*VARIANCES, ("shifted", False))
    def test_vmap_pooled_equals_global(self, variance, masked=True):
        offset = 0.0 if variance == "fast" else 1e3  # "fast" cancels at large mean/std
        x = normal(7, (4, 6, 3), loc=offset)  # 4 devices x 6 examples x 3 features
        mask = np.random.default_rng(7).random((4, 6, 1)) < (0.5 if masked else 2.0)
        mask[0, 0] = True  # unmasked, the shift is the mean of the devices' first samples
        pooled = jax.jit(
            jax.vmap(
                lambda x, m: core.moments(x, 0, mask=m, axis_name="d", variance=variance),
                axis_name="d",
                in_axes=(0, 0 if masked else None),
            )
        )(x, mask if masked else None)
        ref_mean, ref_var, ref_n = np_moments(x.reshape(24, 3), 0, mask.reshape(24, 1))
        for d in range(4):
            np.testing.assert_allclose(pooled.mean[d], ref_mean, rtol=1e-6)
            np.testing.assert_allclose(pooled.var[d], ref_var, rtol=1e-3)
            np.testing.assert_array_equal(pooled.count[d], ref_n)


# --------------------------------------------------------------------------------------------
# batch_norm: normalization, running averages, renorm, ghost batches, conventions


def _stats(features, mean=0.0, var=1.0, step=None):
    return core.BatchStats(jnp.full(features, mean), jnp.full(features, var), step)


class BatchNormFunctionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_train_and_eval(self):
        x = normal(8, (32, 4), loc=1, scale=2)
        scale, bias = jnp.arange(1.0, 5.0), jnp.arange(4.0)
        fn = self.variant(
            lambda x, s, t: core.batch_norm(x, s, scale, bias, momentum=0.9, use_running_average=t),
            static_argnums=2,
        )
        y, new = fn(x, _stats(4), False)
        mean, var, _ = np_moments(x, 0)
        expected = (np.asarray(x) - mean) / np.sqrt(var + 1e-5) * scale + bias
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new.mean, 0.1 * mean[0], rtol=1e-5)
        np.testing.assert_allclose(new.var, 0.9 + 0.1 * var[0], rtol=1e-5)
        y_eval, same = fn(x, new, True)
        assert same is new or jax.tree.all(jax.tree.map(jnp.array_equal, same, new))
        expected = (np.asarray(x) - new.mean) / np.sqrt(new.var + 1e-5) * scale + bias
        np.testing.assert_allclose(y_eval, expected, rtol=1e-5, atol=1e-5)

    def test_tuple_axes(self):
        x = normal(9, (5, 3, 4, 2))
        y, new = batch_norm(x, _stats((3, 2)), axis=(1, -1))
        mean, var, _ = np_moments(x, (0, 2))
        np.testing.assert_allclose(y, (np.asarray(x) - mean) / np.sqrt(var + 1e-5), atol=1e-5)
        assert new.mean.shape == (3, 2)

    def test_unbiased_running_var_and_torch_momentum(self):
        x = normal(10, (8, 3))
        momentum = core.momentum_from_torch(0.1)
        assert momentum == pytest.approx(0.9)
        _, new = batch_norm(x, _stats(3), momentum=momentum, unbiased_running_var=True)
        # PyTorch: running_var = 0.9 * 1 + 0.1 * unbiased batch variance
        np.testing.assert_allclose(new.var, 0.9 + 0.1 * np.var(np.asarray(x), 0, ddof=1), rtol=1e-5)
        y, _ = batch_norm(x, _stats(3), momentum=momentum, unbiased_running_var=True)
        y_biased, _ = batch_norm(x, _stats(3), momentum=momentum)
        np.testing.assert_array_equal(y, y_biased)  # normalization uses the biased variance

    def test_features_without_data_keep_running_stats(self):
        x = jnp.arange(12.0).reshape(4, 3)
        stats = _stats(3, mean=5.0, var=2.0)
        _, new = batch_norm(x, stats, mask=jnp.array([True, False, True]))
        assert new.mean[1] == 5.0 and new.var[1] == 2.0
        assert new.mean[0] != 5.0

    def test_single_element_per_feature_warns_and_gives_the_bias(self):
        x, bias = jnp.arange(1.0, 5.0)[None], jnp.full(4, 0.5)
        with pytest.warns(UserWarning, match=r"one element per feature.*\(1, 4\)"):
            y, new = core.batch_norm(x, _stats(4, 2.0, 3.0), bias=bias, momentum=0.9)
        np.testing.assert_array_equal(y, bias[None])  # variance 0: as flax computes it
        np.testing.assert_allclose(new.mean, 0.9 * 2.0 + 0.1 * x[0], rtol=1e-6)
        np.testing.assert_allclose(new.var, 0.9 * 3.0, rtol=1e-6)
        with pytest.raises(ValueError, match="virtual_batch_size=1 leaves one element"):
            trace(jnp.ones((4, 4)), _stats(4), virtual_batch_size=1)
        # Silent: inference, no update (a linen init), or a pooled axis that makes it > 1.
        trace(jnp.ones((1, 4)), _stats(4), use_running_average=True)
        trace(jnp.ones((1, 4)), _stats(4), update_stats=False)
        pooled = jax.vmap(lambda x: core.batch_norm(x, _stats(4), axis_name="d"), axis_name="d")
        jax.eval_shape(pooled, jnp.ones((2, 1, 4)))

    @parameterized.parameters(
        ({"momentum": 1.5}, "momentum must be in"),
        ({"momentum": -0.1}, "momentum must be in"),
        ({"epsilon": 0.0}, "epsilon must be in"),
        ({"epsilon": -1e-5}, "epsilon must be in"),
        ({"renorm": True, "r_max": 0.5}, "r_max must be in"),
        ({"renorm": True, "d_max": -1.0}, "d_max must be in"),
        ({"renorm": True, "r_max": optax.constant_schedule(0.5)}, r"r_max\(0\) must be in"),
        ({"virtual_batch_size": 0}, "virtual_batch_size must be None or a positive int"),
        ({"virtual_batch_size": -2}, "virtual_batch_size must be None or a positive int"),
        ({"virtual_batch_size": 2.5}, "virtual_batch_size must be None or a positive int"),
        ({"variance": "exact"}, "variance must be one of"),
    )
    def test_bad_hyperparameters_name_the_parameter(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            trace(jnp.ones((4, 2)), _stats(2), **kwargs)

    def test_shape_errors(self):
        with pytest.raises(ValueError, match="must divide the batch"):
            trace(jnp.ones((6, 2)), _stats(2), virtual_batch_size=4)
        with pytest.raises(ValueError, match=r"leading \(batch\) axis, which is a feature axis"):
            trace(jnp.ones((6, 2)), _stats(6), axis=0, virtual_batch_size=3)
        with pytest.raises(ValueError, match=r"has features \(2,\)"):
            trace(jnp.ones((6, 2)), _stats(3))

    def test_torch_momentum_range(self):
        with pytest.raises(ValueError, match="torch_momentum must be in"):
            core.momentum_from_torch(1.5)


class RenormTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.x = normal(11, (16, 3), loc=3, scale=2)
        self.stats = core.BatchStats(jnp.array([0.5, 3.0, -1.0]), jnp.array([1.0, 4.0, 9.0]))
        self.scale, self.bias = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.0, 1.0, -1.0])

    def _train(self, **kwargs):
        return batch_norm(
            self.x, self.stats, self.scale, self.bias, renorm=True, epsilon=1e-3, **kwargs
        )

    def test_formula(self):
        y, new = self._train(r_max=1.5, d_max=0.5)
        x = np.asarray(self.x, np.float64)
        mu_b, var_b, _ = np_moments(x, 0)
        sigma_b = np.sqrt(var_b + 1e-3)
        sigma = np.sqrt(np.asarray(self.stats.var) + 1e-3)
        r = np.clip(sigma_b / sigma, 1 / 1.5, 1.5)
        d = np.clip((mu_b - np.asarray(self.stats.mean)) / sigma, -0.5, 0.5)
        expected = ((x - mu_b) / sigma_b * r + d) * np.asarray(self.scale) + np.asarray(self.bias)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        _, plain = batch_norm(self.x, self.stats, self.scale, self.bias, epsilon=1e-3)
        chex.assert_trees_all_equal(new, plain)  # running averages move as without renorm

    def test_limits_one_and_zero_give_batch_norm(self):
        y, _ = self._train(r_max=1.0, d_max=0.0)
        plain, _ = batch_norm(self.x, self.stats, self.scale, self.bias, epsilon=1e-3)
        np.testing.assert_array_equal(y, plain)

    def test_unclipped_training_equals_inference(self):
        y, _ = self._train(r_max=float("inf"), d_max=float("inf"))
        inference, _ = batch_norm(
            self.x, self.stats, self.scale, self.bias, epsilon=1e-3, use_running_average=True
        )
        np.testing.assert_allclose(y, inference, rtol=1e-5, atol=1e-5)

    def test_gradients_finite_and_r_d_constant(self):
        def loss(x, scale):
            y, _ = core.batch_norm(x, self.stats, scale, renorm=True, r_max=2.0, d_max=1.0)
            return jnp.sum(jnp.sin(y))

        gx, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(self.x, self.scale)
        assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gs))

        # r and d carry no gradient: the gradient equals that of ((x - mu)/sigma * r + d) with
        # r, d frozen at their values.
        r, d = core.renorm_correction(
            *moments(self.x, 0)[:2],
            self.stats.mean,
            self.stats.var,
            epsilon=1e-5,
            r_max=2.0,
            d_max=1.0,
        )

        def frozen(x, scale):
            mean, var, _ = core.moments(x, 0)
            return jnp.sum(jnp.sin(((x - mean) * jax.lax.rsqrt(var + 1e-5) * r + d) * scale))

        fx, fs = jax.jit(jax.grad(frozen, argnums=(0, 1)))(self.x, self.scale)
        np.testing.assert_allclose(gx, fx, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gs, fs, rtol=1e-4, atol=1e-5)

    def test_schedules_use_and_advance_the_step(self):
        r_sched, d_sched = core.renorm_schedules(warmup_steps=2, r_max_steps=4, d_max_steps=4)
        stats = self.stats._replace(step=jnp.array(0, jnp.int32))
        y0, new = batch_norm(self.x, stats, renorm=True, r_max=r_sched, d_max=d_sched)
        plain, _ = batch_norm(self.x, stats)
        np.testing.assert_array_equal(y0, plain)  # step 0: r_max = 1, d_max = 0
        assert int(new.step) == 1
        late = stats._replace(step=jnp.array(10, jnp.int32))
        y_late, _ = batch_norm(self.x, late, renorm=True, r_max=r_sched, d_max=d_sched)
        y_fixed, _ = batch_norm(self.x, late, renorm=True, r_max=3.0, d_max=5.0)
        np.testing.assert_array_equal(y_late, y_fixed)
        with pytest.raises(ValueError, match=r"need stats\.step"):
            batch_norm(self.x, self.stats, renorm=True, r_max=r_sched)

    def test_paper_schedule_values(self):
        r_max, d_max = core.renorm_schedules()
        np.testing.assert_allclose([r_max(s) for s in (0, 5000, 40000, 10**6)], [1, 1, 3, 3])
        np.testing.assert_allclose([d_max(s) for s in (0, 5000, 25000, 10**6)], [0, 0, 5, 5])
        with pytest.raises(ValueError, match="r_max must be >= 1"):
            core.renorm_schedules(r_max=0.5)
        with pytest.raises(ValueError, match="d_max_steps must be >= warmup_steps"):
            core.renorm_schedules(warmup_steps=10, d_max_steps=5)


class GhostBatchTest(chex.TestCase):
    def test_equals_per_chunk_batch_norm(self):
        x = normal(12, (12, 3, 2), scale=np.arange(1.0, 13.0)[:, None, None])
        stats = _stats(2, mean=0.5, var=2.0)
        y, new = batch_norm(x, stats, virtual_batch_size=4)
        chunks = [batch_norm(x[i : i + 4], stats) for i in range(0, 12, 4)]
        np.testing.assert_allclose(y, jnp.concatenate([c[0] for c in chunks]), atol=1e-6)
        # Running averages move towards the mean of the chunks' statistics.
        expected = jax.tree.map(lambda *s: jnp.mean(jnp.stack(s), 0), *[c[1] for c in chunks])
        np.testing.assert_allclose(new.mean, expected.mean, rtol=1e-6)
        np.testing.assert_allclose(new.var, expected.var, rtol=1e-6)

    def test_inference_ignores_virtual_batches(self):
        x = normal(13, (6, 2))
        y, _ = batch_norm(x, _stats(2), use_running_average=True, virtual_batch_size=4)
        np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)

    def test_masked_ghost_batches(self):
        x = normal(14, (8, 2))
        mask = np.arange(8)[:, None] % 4 != 3
        y, _ = batch_norm(x, _stats(2), virtual_batch_size=4, mask=mask)
        for i in (0, 4):
            ref, _ = batch_norm(x[i : i + 4], _stats(2), mask=mask[i : i + 4])
            np.testing.assert_allclose(y[i : i + 4], ref, rtol=1e-6)


def test_output_dtype_rule():
    assert _output_dtype(jnp.ones(2, jnp.bfloat16), jnp.ones(2)) == jnp.float32
    assert _output_dtype(jnp.ones(2, jnp.bfloat16), None) == jnp.bfloat16
    assert _output_dtype(jnp.ones(2, jnp.int32)) == jnp.float32
    assert _output_dtype(jnp.ones(2), dtype=jnp.float16) == jnp.float16


# --------------------------------------------------------------------------------------------
# BatchNormConfig: the options, checked once, shared by the function and both modules

BAD_OPTIONS = [  # each bad option, and the start of the ValueError that names it
    ({"axis": 1.5}, "axis must be an int or a sequence of ints"),
    ({"axis": (0, "1")}, "axis must be an int or a sequence of ints"),
    ({"momentum": 1.5}, r"momentum must be in \[0.0, 1.0\], got 1.5"),
    ({"momentum": float("nan")}, "momentum must be in"),
    ({"epsilon": 0.0}, r"epsilon must be in \(0.0, inf\), got 0.0"),
    ({"variance": "exact"}, "variance must be one of"),
    ({"renorm": True, "r_max": 0.5}, r"r_max must be in \[1.0, inf\), got 0.5"),
    ({"renorm": True, "d_max": -1.0}, "d_max must be in"),
    ({"renorm": True, "d_max": optax.constant_schedule(-1.0)}, r"d_max\(0\) must be in"),
    ({"virtual_batch_size": True}, "virtual_batch_size must be None or a positive int, got True"),
    ({"virtual_batch_size": 0}, "virtual_batch_size must be None or a positive int, got 0"),
]


class ConfigTest(chex.TestCase):
    @parameterized.parameters(*BAD_OPTIONS)
    def test_bad_option_raises_naming_it(self, options, message):
        with pytest.raises(ValueError, match=message):
            core.BatchNormConfig(**options)

    def test_renorm_limits_are_checked_only_with_renorm(self):
        assert core.BatchNormConfig(r_max=0.5, d_max=-1.0).r_max == 0.5  # unused: not checked

    def test_equal_options_give_equal_hashable_configs(self):
        groups = [[0, 1], [2, 3]]
        a = core.BatchNormConfig(axis=[1, 2], axis_index_groups=groups, momentum=0.9)
        b = core.BatchNormConfig(axis=(1, 2), axis_index_groups=((0, 1), (2, 3)), momentum=0.9)
        assert a == b and hash(a) == hash(b)
        assert a.axis == (1, 2) and a.axis_index_groups == ((0, 1), (2, 3))
        assert a != dataclasses.replace(a, momentum=0.5)
        assert len({a, b, core.BatchNormConfig()}) == 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            a.momentum = 0.5  # type: ignore[misc]
        with pytest.raises(ValueError, match="momentum must be in"):
            dataclasses.replace(a, momentum=-1.0)  # a changed copy is checked again

    def test_feature_shape_and_step_counter(self):
        assert core.BatchNormConfig(axis=(-1, 1)).feature_shape((2, 3, 4, 5)) == (3, 5)
        with pytest.raises(ValueError, match="axis must hold axes in"):
            core.BatchNormConfig(axis=2).feature_shape((4, 3))
        r_max, d_max = core.renorm_schedules()
        assert not core.BatchNormConfig(r_max=r_max).counts_steps  # no renorm
        assert not core.BatchNormConfig(renorm=True).counts_steps  # fixed limits
        assert core.BatchNormConfig(renorm=True, d_max=d_max).counts_steps

    def test_batch_norm_takes_a_config_or_the_options(self):
        x = normal(15, (8, 3), loc=1.0)
        options = {"momentum": 0.8, "epsilon": 1e-3, "variance": "two_pass"}
        by_keywords = batch_norm(x, _stats(3), **options)
        by_config = batch_norm(x, _stats(3), config=core.BatchNormConfig(**options))
        chex.assert_trees_all_equal(by_keywords, by_config)
        with pytest.raises(TypeError, match="not both"):
            core.batch_norm(x, _stats(3), config=core.BatchNormConfig(), momentum=0.8)
        with pytest.raises(TypeError, match="unexpected keyword argument 'momentom'"):
            core.batch_norm(x, _stats(3), momentom=0.8)


# --------------------------------------------------------------------------------------------
# The public surface: what the package exports, the deprecated jaxstab.nn, no flax


def test_exports_only_what_users_call():
    assert set(core.__all__) == {
        "BatchNormConfig",
        "BatchStats",
        "Moments",
        "batch_norm",
        "momentum_from_torch",
        "moments",
        "renorm_correction",
        "renorm_schedules",
    }
    public = {name for name in vars(core) if not name.startswith("_")}
    assert public == set(core.__all__)


def test_deprecated_nn_alias_warns_and_still_works():
    import jaxstab.nn as old

    for name in core.__all__:  # every public name: the same object, with a warning
        message = rf"use jaxstab\.batchnorm\.{name} instead of jaxstab\.nn\.{name}"
        with pytest.warns(DeprecationWarning, match=message):
            assert getattr(old, name) is getattr(core, name)
    with pytest.warns(DeprecationWarning, match="jaxstab.nn is deprecated"):
        from jaxstab.nn import batch_norm as old_batch_norm
    y, _ = old_batch_norm(jnp.array([[1.0], [3.0]]), _stats(1), epsilon=1e-6)
    np.testing.assert_allclose(y[:, 0], [-1.0, 1.0], rtol=1e-6)
    # The internals it exported still answer as before, pointing to what replaces them.
    with pytest.warns(DeprecationWarning, match=r"BatchNormConfig, which checks its options"):
        check = old.check_hyperparameters
    with pytest.raises(ValueError, match="momentum must be in"):
        check(momentum=1.5, epsilon=1e-5)
    with pytest.warns(DeprecationWarning, match=r"BatchNormConfig\.counts_steps"):
        assert old.uses_step(True, optax.constant_schedule(2.0), 5.0)
    with pytest.warns(DeprecationWarning):
        assert old.variance_algorithm(True, False) == "fast"
    with pytest.warns(DeprecationWarning):
        assert old.canonical_axes(4, (-1, 1)) == (1, 3)
    with pytest.warns(DeprecationWarning):
        assert old.output_dtype(jnp.ones(2, jnp.int32)) == jnp.float32
    with pytest.warns(DeprecationWarning):
        assert old.VARIANCES == VARIANCES
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        old.nope  # noqa: B018


def test_core_imports_without_flax():
    """The core and its deprecated alias load and run with flax unimportable."""
    script = """
import importlib.util, sys, types
# Load jaxstab's subpackages without jaxstab/__init__.py (which may import the flax modules).
package = types.ModuleType("jaxstab")
package.__path__ = importlib.util.find_spec("jaxstab").submodule_search_locations
sys.modules["jaxstab"] = package
sys.modules["flax"] = None  # any import of flax raises ImportError
import jax.numpy as jnp
import jaxstab.batchnorm as core, jaxstab.nn
stats = core.BatchStats(jnp.zeros(1), jnp.ones(1))
y, _ = core.batch_norm(jnp.array([[1.0], [3.0]]), stats, epsilon=1e-6)
assert abs(float(y[0, 0]) + 1) < 1e-5, y
assert not [m for m in sys.modules if m.split(".")[0] == "flax" and sys.modules[m]]
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


# --------------------------------------------------------------------------------------------
# Running statistics one bad batch cannot poison


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "bad", [np.nan, np.inf, -np.inf, 1e30, -3e38], ids=["nan", "inf", "-inf", "1e30", "-3e38"]
)
def test_a_bad_feature_keeps_its_running_statistics_and_the_others_update(bad, jit):
    x = np.random.default_rng(0).normal(2.0, 3.0, (16, 3)).astype(np.float32)
    x[5, 1] = bad
    stats = core.BatchStats(jnp.array([0.5, -1.0, 2.0]), jnp.array([1.0, 4.0, 0.25]))
    fn = functools.partial(core.batch_norm, momentum=0.9, report=True)
    y, new, nonfinite = (jax.jit(fn) if jit else fn)(jnp.asarray(x), stats)
    assert int(nonfinite) == 1
    np.testing.assert_array_equal(new.mean[1], stats.mean[1])  # bit for bit
    np.testing.assert_array_equal(new.var[1], stats.var[1])
    want_mean = 0.9 * np.array(stats.mean) + 0.1 * x.mean(0)
    np.testing.assert_allclose(np.asarray(new.mean)[[0, 2]], want_mean[[0, 2]], rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(y)[:, [0, 2]]))
    if np.isfinite(bad):  # finite input: finite output everywhere
        assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_overflowing_half_precision_input_keeps_the_running_statistics(dtype):
    x = jnp.asarray(np.random.default_rng(1).normal(0, 1, (8, 2)), dtype).at[0, 0].set(jnp.inf)
    stats = core.BatchStats(jnp.zeros(2), jnp.ones(2))
    _, new, nonfinite = core.batch_norm(x, stats, momentum=0.9, report=True)
    assert int(nonfinite) == 1 and new.mean.dtype == jnp.float32
    assert float(new.mean[0]) == 0.0 and float(new.var[0]) == 1.0
    assert float(new.var[1]) != 1.0


def test_masked_nan_is_ignored_and_ghost_batches_with_a_nan_keep_the_feature():
    x = np.random.default_rng(2).normal(0, 1, (8, 2)).astype(np.float32)
    x[0, 0] = np.nan
    stats = core.BatchStats(jnp.zeros(2), jnp.ones(2))
    mask = np.ones((8, 2), bool)
    mask[0, 0] = False  # masked positions may hold anything
    _, new, nonfinite = core.batch_norm(jnp.asarray(x), stats, mask=mask, report=True)
    assert int(nonfinite) == 0 and bool(jnp.all(jnp.isfinite(new.mean)))
    _, new, nonfinite = core.batch_norm(
        jnp.asarray(x), stats, virtual_batch_size=4, report=True
    )
    assert int(nonfinite) == 1
    assert float(new.mean[0]) == 0.0 and float(new.mean[1]) != 0.0


def test_report_is_zero_in_inference_and_the_default_returns_a_pair():
    x = jnp.ones((4, 2)).at[0, 0].set(jnp.nan)
    stats = core.BatchStats(jnp.zeros(2), jnp.ones(2))
    assert len(core.batch_norm(x, stats)) == 2
    _, kept, nonfinite = core.batch_norm(x, stats, use_running_average=True, report=True)
    assert int(nonfinite) == 0 and kept is stats


# --------------------------------------------------------------------------------------------
# Gradients through the transformations that trace the moments anew (scan, remat, cond, jit):
# their count and mask are tracers there, which the custom JVP must take as arguments.

_NESTINGS = {
    "jit": lambda f: jax.jit(f),
    "checkpoint": lambda f: jax.checkpoint(f),
    "cond": lambda f: lambda a: jax.lax.cond(True, f, f, a),
    "scan": lambda f: lambda a: jax.lax.scan(lambda c, b: (c + f(b), None), 0.0, a[None])[0],
}


@pytest.mark.parametrize("nesting", list(_NESTINGS))
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("masked", [False, True])
def test_gradient_through_scan_remat_cond_and_jit_equals_the_plain_one(nesting, variance, masked):
    x = jax.random.normal(jax.random.key(0), (8, 4)) + 3.0
    mask = (jnp.arange(8) % 3 != 0)[:, None] if masked else None

    def stats(a):
        m = core.moments(a, 0, mask=mask, variance=variance)
        return jnp.sum(m.var * m.mean)

    loss = lambda w, f: f(x * w)
    want = jax.grad(loss)(1.5, stats)
    got = jax.jit(jax.grad(loss), static_argnums=1)(1.5, _NESTINGS[nesting](stats))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.isfinite(want) and want != 0
