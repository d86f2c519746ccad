"""z_loss and softcap against float64 NumPy references: jit and no jit, float16/bfloat16 inputs,
huge and non-finite logits, token masks, analytic gradients, properties, argument errors."""

from __future__ import annotations

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxstab.logits import softcap, z_loss

F32_MAX = float(np.finfo(np.float32).max)


def lse64(logits):
    x = np.asarray(logits, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def z_loss64(logits, weight, where=None):
    """NumPy float64: weight * mean over the (masked) tokens of logsumexp ** 2; 0 if none."""
    lse = lse64(logits)
    where = np.ones(lse.shape, bool) if where is None else np.asarray(where)
    if not where.any():
        return 0.0
    return weight * np.mean(lse[where] ** 2)


def z_grad64(logits, weight, where=None):
    """The analytic gradient 2 * weight * lse * softmax / N (0 on masked-out tokens)."""
    x = np.asarray(logits, np.float64)
    lse = lse64(x)
    where = np.ones(lse.shape, bool) if where is None else np.asarray(where)
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    softmax = e / np.sum(e, axis=-1, keepdims=True)  # not exp(x - lse): lse may absorb log(k)
    n = max(int(where.sum()), 1)
    return np.where(where[..., None], 2 * weight * lse[..., None] * softmax / n, 0.0)


def softcap64(x, cap):
    return cap * np.tanh(np.asarray(x, np.float64) / cap)


class ZLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_reference(self):
        rng = np.random.default_rng(0)
        z = self.variant(z_loss)
        for shape in ((5,), (3, 7), (2, 3, 11)):
            for scale in (1.0, 30.0):
                logits = jnp.asarray(scale * rng.normal(size=shape) + 3.0, jnp.float32)
                for weight in (1e-4, 1.0):
                    got = z(logits, weight)
                    assert got.dtype == jnp.float32 and got.shape == ()
                    np.testing.assert_allclose(got, z_loss64(logits, weight), rtol=1e-5)
                if len(shape) > 1:
                    where = jnp.asarray(rng.random(shape[:-1]) < 0.6).at[(0,) * (len(shape) - 1)]
                    where = where.set(True)
                    np.testing.assert_allclose(
                        z(logits, 1e-2, where=where), z_loss64(logits, 1e-2, where), rtol=1e-5
                    )

    def test_default_weight_is_palms(self):
        logits = jnp.array([[1.0, 2.0, 3.0]])
        np.testing.assert_allclose(z_loss(logits), 1e-4 * lse64(logits)[0] ** 2, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_is_the_analytic_gradient(self):
        logits = jnp.array([[0.5, -1.0, 2.0, 0.0], [3.0, 3.0, -2.0, 1.0], [-4.0, 0.0, 1.0, 7.0]])
        where = jnp.array([True, False, True])
        grad = self.variant(jax.grad(z_loss))
        np.testing.assert_allclose(grad(logits, 0.3), z_grad64(logits, 0.3), rtol=1e-5, atol=1e-7)
        masked = self.variant(jax.grad(lambda x: z_loss(x, 0.3, where=where)))(logits)
        np.testing.assert_allclose(masked, z_grad64(logits, 0.3, where), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(masked[1], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_low_precision_inputs_are_computed_in_float32(self):
        rng = np.random.default_rng(1)
        z = self.variant(z_loss)
        for dtype, top in ((jnp.bfloat16, 3e38), (jnp.float16, 6e4)):
            logits = jnp.asarray(20 * rng.normal(size=(4, 9)), dtype)
            got = z(logits, 1e-3)
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(got, z_loss64(logits.astype(jnp.float32), 1e-3), rtol=1e-5)
            # exp of these would overflow in the input dtype; max-shifted float32 math does not
            big = jnp.asarray([[top, 0.0, -top], [top, top, 1.0]], dtype)
            want = z_loss64(np.asarray(big, np.float32), 1e-4)
            got = z(big, 1e-4)
            if want <= F32_MAX:
                np.testing.assert_allclose(got, want, rtol=1e-5)
            else:  # the true value is beyond float32
                assert got == np.inf
            grad = self.variant(jax.grad(z_loss))(big, 1e-4)
            assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_huge_finite_logits(self):
        z, grad = self.variant(z_loss), self.variant(jax.grad(z_loss))
        for value in (1e4, 1e20, 3e38):
            logits = jnp.array([[value, 0.0, -value], [value, value, 1.0]], jnp.float32)
            want = z_loss64(logits, 1e-4)
            if want <= F32_MAX:  # 1e20: lse ** 2 overflows float32, weight * mean does not
                np.testing.assert_allclose(z(logits, 1e-4), want, rtol=1e-5)
            else:  # 3e38: weight * lse ** 2 ~ 1e73 is beyond float32
                assert z(logits, 1e-4) == np.inf
            g = grad(logits, 1e-4)  # finite for every finite logit, and right
            assert np.all(np.isfinite(g))
            np.testing.assert_allclose(g, z_grad64(logits, 1e-4), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_non_finite_logits_show_and_masked_ones_do_not(self):
        z = self.variant(z_loss)
        logits = jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [3.0, -1.0]])
        assert np.isnan(z(logits, 1e-4))  # NaN propagates: the bad step shows
        assert z(logits.at[1, 0].set(jnp.inf), 1e-4) == np.inf
        # a -inf logit is an impossible class, not a problem
        np.testing.assert_allclose(
            z(logits.at[1, 0].set(-jnp.inf), 1e-4),
            z_loss64(np.asarray(logits.at[1, 0].set(-1e30)), 1e-4),
            rtol=1e-6,
        )
        where = jnp.array([True, False, True])
        for bad in (jnp.nan, jnp.inf, -jnp.inf):
            padded = logits.at[1].set(bad)
            got = z(padded, 1e-4, where=where)
            np.testing.assert_allclose(got, z_loss64(logits, 1e-4, where), rtol=1e-6)
            g = self.variant(jax.grad(lambda x: z_loss(x, 1e-4, where=where)))(padded)
            np.testing.assert_allclose(g, z_grad64(logits, 1e-4, where), rtol=1e-5, atol=1e-9)

    @chex.variants(with_jit=True, without_jit=True)
    def test_all_false_mask_gives_zero_not_nan(self):
        logits = jnp.array([[1e4, 2.0], [jnp.nan, 0.0]])
        where = jnp.zeros(2, bool)
        f = lambda x: z_loss(x, 1e-4, where=where)
        assert self.variant(f)(logits) == 0.0
        np.testing.assert_array_equal(self.variant(jax.grad(f))(logits), 0.0)

    def test_zero_weight_and_one_token(self):
        assert z_loss(jnp.array([5.0, 1.0]), 0.0) == 0.0
        np.testing.assert_allclose(z_loss(jnp.array([5.0, 1.0]), 1.0), lse64([5.0, 1.0]) ** 2)


def test_float64_logits_give_float64(enable_x64):
    with enable_x64(True):
        logits = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)) * 10, jnp.float64)
        got = z_loss(logits, 1.0)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, z_loss64(logits, 1.0), rtol=1e-12)


_z_loss = jax.jit(z_loss)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.float32, (3, 4), elements=st.floats(-(2.0**100), 2.0**100, width=32)),
    st.lists(st.booleans(), min_size=3, max_size=3),
    st.sampled_from([0.0, 1e-4, 1.0, 1e3]),
)
def test_property_z_loss_is_non_negative_and_never_nan(logits, mask, weight):
    for where in (None, jnp.asarray(mask)):
        got = float(_z_loss(jnp.asarray(logits), weight, where=where))
        assert got >= 0.0  # inf where the true value overflows float32; never NaN
        want = z_loss64(logits, weight, where)
        if want <= 0.99 * F32_MAX:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-37)


class SoftcapTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_reference(self):
        x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 50)) * 80, jnp.float32)
        cap_ = self.variant(softcap)
        for cap in (0.5, 30.0, 50.0, jnp.asarray(1e3)):
            got = cap_(x, cap)
            assert got.dtype == jnp.float32 and got.shape == x.shape
            c = float(cap)
            np.testing.assert_allclose(got, softcap64(x, c), rtol=1e-6, atol=1e-6 * c)

    @chex.variants(with_jit=True, without_jit=True)
    def test_low_precision_keeps_dtype(self):
        x = np.random.default_rng(4).normal(size=(64,)) * 60
        for dtype, ulp in ((jnp.bfloat16, 2.0**-8), (jnp.float16, 2.0**-11)):
            xd = jnp.asarray(x, dtype)
            got = self.variant(softcap)(xd, 50.0)
            assert got.dtype == dtype
            want = softcap64(np.asarray(xd, np.float32), 50.0)
            np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=ulp, atol=1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_huge_and_non_finite(self):
        for dtype, top in ((jnp.float32, 3e38), (jnp.bfloat16, 3e38), (jnp.float16, 65504.0)):
            x = jnp.asarray([top, -top, jnp.inf, -jnp.inf, jnp.nan, 0.0], dtype)
            got = np.asarray(self.variant(softcap)(x, 30.0), np.float32)
            np.testing.assert_array_equal(got[:4], [30.0, -30.0, 30.0, -30.0])
            assert np.isnan(got[4]) and got[5] == 0.0
            grad = self.variant(jax.grad(lambda x: jnp.sum(softcap(x, 30.0).astype(jnp.float32))))
            g = np.asarray(grad(x.at[4].set(1.0)), np.float32)
            np.testing.assert_array_equal(g[:4], 0.0)  # saturated
            np.testing.assert_allclose(g[4:], [1 - np.tanh(1 / 30) ** 2, 1.0], rtol=1e-2)

    def test_gradient_under_the_cap(self):
        x = jnp.array([-100.0, -3.0, 0.0, 2.0, 40.0])
        g = jax.grad(lambda x: jnp.sum(softcap(x, 20.0)))(x)
        want = 1 - np.tanh(np.asarray(x, np.float64) / 20) ** 2
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)  # 1 - t**2 cancels near +-1


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.float32, 16, elements=st.floats(-F32_MAX, F32_MAX, width=32)),
    st.floats(2.0**-10, 2.0**13, width=32),
    st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
)
def test_property_softcap_is_bounded_odd_and_monotone(x, cap, dtype):
    with np.errstate(over="ignore"):  # rounding to float16 may give +-inf: allowed
        xd = jnp.sort(jnp.asarray(x, dtype))
    y = np.asarray(softcap(xd, cap), np.float64)
    bound = float(jnp.asarray(cap, dtype).astype(jnp.float32))  # cap rounded to the dtype
    assert np.all(np.abs(y) <= bound)
    np.testing.assert_array_equal(np.asarray(softcap(-xd, cap), np.float64), -y)
    # XLA's tanh is monotone only to a last-bit wobble near saturation
    slack = 2 * np.spacing(np.asarray(bound, np.dtype(dtype)).astype(np.float64))
    assert np.all(np.diff(y) >= -slack)


def test_bad_arguments():
    logits = jnp.ones((2, 3))
    for weight in (-1.0, float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="weight"):
            z_loss(logits, weight)
    for weight in (None, "1e-4", 1j):
        with pytest.raises(TypeError, match="weight"):
            z_loss(logits, weight)
    for bad in (jnp.ones((2, 3), jnp.int32), [[1, 2]], "logits", None):
        with pytest.raises(TypeError, match="logits"):
            z_loss(bad)
    with pytest.raises(ValueError, match="logits"):
        z_loss(jnp.float32(1.0))
    for where in (jnp.ones(3, bool), jnp.ones((2, 3), bool), jnp.ones((), bool)):
        with pytest.raises(ValueError, match="where"):
            z_loss(logits, where=where)
    with pytest.raises(TypeError, match="where"):
        z_loss(logits, where=jnp.ones(2))
    for cap in (0.0, -1.0, float("nan"), float("inf"), jnp.ones(2)):
        with pytest.raises(ValueError, match="cap"):
            softcap(logits, cap)
    for cap in (None, "30"):
        with pytest.raises(TypeError, match="cap"):
            softcap(logits, cap)
    with pytest.raises(TypeError, match="x must be a floating"):
        softcap(jnp.ones(3, jnp.int32), 1.0)
