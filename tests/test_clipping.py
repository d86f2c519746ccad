"""clip_by_global_norm and adaptive_grad_clip: parity with optax, properties, edge cases, Flax."""

import functools
import inspect

import chex
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jaxstab
from jaxstab import _norms


def random_tree(seed, scale=1.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = {"a": (5, 3), "b": (4,), "c": (2, 3, 3, 4)}
    return {k: jnp.asarray(rng.normal(size=s) * scale, dtype) for k, s in shapes.items()}


def tree_norm(tree):
    return float(jaxstab.global_norm(tree))


class ClipByGlobalNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @pytest.mark.filterwarnings("ignore::DeprecationWarning")
    def test_parity_with_optax(self):
        for seed, max_norm in [(0, 0.5), (1, 2.0), (2, 100.0)]:
            grads = random_tree(seed)
            ours = jaxstab.clip_by_global_norm(max_norm)
            theirs = optax.clip_by_global_norm(max_norm)
            got, _ = self.variant(ours.update)(grads, ours.init(grads))
            want, _ = theirs.update(grads, theirs.init(grads))
            chex.assert_trees_all_close(got, want, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_overflow_cases_clip_to_max_norm(self):
        tx = jaxstab.clip_by_global_norm(1.0)
        update = self.variant(tx.update)
        for grads in (
            {"w": jnp.full((8, 8), 300.0, jnp.float16)},
            {"w": jnp.full((3,), 1e20, jnp.float32), "b": jnp.ones((2,))},
        ):
            out, state = update(grads, tx.init(grads))
            np.testing.assert_allclose(tree_norm(out), 1.0, rtol=1e-3)
            chex.assert_trees_all_equal_dtypes(out, grads)
            assert bool(state.clipped)
            # optax zeroes these updates.
            theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
            assert tree_norm(theirs) == 0.0 or not np.isfinite(tree_norm(theirs))

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_gradients_with_zero_max_norm(self):
        tx = jaxstab.clip_by_global_norm(0.0)
        grads = {"w": jnp.zeros((3,))}
        out, state = self.variant(tx.update)(grads, tx.init(grads))
        np.testing.assert_array_equal(out["w"], 0.0)
        assert float(state.scale) == 1.0
        theirs, _ = optax.clip_by_global_norm(0.0).update(grads, optax.EmptyState())
        assert np.isnan(theirs["w"]).all()

    @chex.variants(with_jit=True, without_jit=True)
    def test_non_finite_step_gives_zeros(self):
        tx = jaxstab.clip_by_global_norm(1.0)
        grads = {"w": jnp.array([1.0, jnp.nan]), "b": jnp.array([jnp.inf])}
        out, state = self.variant(tx.update)(grads, tx.init(grads))
        chex.assert_trees_all_equal(out, {"w": jnp.zeros(2), "b": jnp.zeros(1)})
        assert float(state.scale) == 0.0 and np.isnan(state.grad_norm)

    @chex.variants(with_jit=True, without_jit=True)
    def test_low_precision_dtypes_are_kept(self):
        for dtype in (jnp.float16, jnp.bfloat16):
            grads = random_tree(3, scale=10.0, dtype=dtype)
            tx = jaxstab.clip_by_global_norm(1.0)
            out, _ = self.variant(tx.update)(grads, tx.init(grads))
            chex.assert_trees_all_equal_dtypes(out, grads)
            np.testing.assert_allclose(tree_norm(out), 1.0, rtol=1e-2)

    def test_no_retracing(self):
        tx = jaxstab.clip_by_global_norm(1.0)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(grads, state):
            return tx.update(grads, state)

        state = tx.init(random_tree(0))
        for seed in range(4):
            _, state = step(random_tree(seed), state)

    def test_injected_max_norm(self):
        tx = optax.inject_hyperparams(jaxstab.clip_by_global_norm)(max_norm=1.0)
        grads = {"w": jnp.array([3.0, 4.0])}
        state = tx.init(grads)
        state.hyperparams["max_norm"] = jnp.asarray(2.5)
        out, _ = jax.jit(tx.update)(grads, state)
        np.testing.assert_allclose(out["w"], [1.5, 2.0], rtol=1e-6)

    def test_bad_max_norm(self):
        with pytest.raises(ValueError, match=r"max_norm must be in \[0, inf\), got -1"):
            jaxstab.clip_by_global_norm(-1)
        with pytest.raises(ValueError, match="max_norm"):
            jaxstab.clip_by_global_norm(float("nan"))

    def test_fuses_into_a_multiply(self):
        """The clip is a multiply by a scalar: no divide of the full gradient tensor. The same
        check finds the divide in optax's select-and-divide clip (the positive control)."""

        def divides_full_tensor(clip):
            tx = optax.chain(clip, optax.sgd(0.1))
            params = {"w": jnp.ones((256, 256))}
            step = lambda p, s, g: tx.update(g, s, p)
            hlo = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
            return "f32[256,256]{1,0} divide(" in hlo

        assert not divides_full_tensor(jaxstab.clip_by_global_norm(1.0))
        assert divides_full_tensor(optax.clip_by_global_norm(1.0))

    @chex.variants(with_jit=True, without_jit=True)
    def test_complex_gradients_are_clipped_by_their_modulus(self):
        """1e20j had norm 0 (the rescue dropped the imaginary part) and passed unclipped."""
        tx = jaxstab.clip_by_global_norm(1.0)
        for value in (1e20j, 3e19 + 4e19j, 1e-12j, 2j):
            grads = {"w": jnp.array([value, 0.0], jnp.complex64)}
            out, state = self.variant(tx.update)(grads, tx.init(grads))
            np.testing.assert_allclose(out["w"][0], value / max(abs(value), 1.0), rtol=1e-6)
            np.testing.assert_allclose(state.grad_norm, abs(value), rtol=1e-6)

@jax.jit
def clip_with(grads, max_norm):
    return jaxstab.clip_by_global_norm(max_norm).update(grads, None)[0]


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(np.float32, 12, elements=st.floats(-1e4, 1e4, width=32)),
    st.floats(1e-3, 1e3),
)
@example(np.full(12, 1e-45, np.float32), 1.0)  # subnormal: flushed to zero, found by CI
def test_clip_properties(g, max_norm):
    grads = {"g": jnp.asarray(g)}
    out = clip_with(grads, max_norm)
    norm_in, norm_out = tree_norm(grads), tree_norm(out)
    assert norm_out <= max_norm * (1 + 1e-6) + 1e-30
    if norm_in <= max_norm:  # a no-op below the threshold, but for subnormal entries, which
        # XLA's arithmetic may flush to zero (seen on XLA:CPU with jax 0.6.2 and 0.10.2)
        got, normal = np.asarray(out["g"]), np.abs(g) >= np.finfo(np.float32).tiny
        np.testing.assert_array_equal(got[normal], g[normal])
        assert np.all((got[~normal] == 0) | (got[~normal] == g[~normal]))
    else:
        # direction preserved: out is a positive multiple of g
        ratio = norm_out / norm_in
        np.testing.assert_allclose(out["g"], g * ratio, rtol=1e-5, atol=1e-30)
    again = clip_with(out, max_norm)  # idempotent
    np.testing.assert_allclose(again["g"], out["g"], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# adaptive_grad_clip


# optax < 0.2.6 has no `axis=` and rejects parameters of more than four dimensions.
OPTAX_AGC_HAS_AXIS = "axis" in inspect.signature(optax.adaptive_grad_clip).parameters


class AdaptiveGradClipTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_parity_with_optax_default_layouts(self):
        if not OPTAX_AGC_HAS_AXIS:
            self.skipTest("optax >= 0.2.6")
        rng = np.random.default_rng(0)
        shapes = [(6,), (5, 4), (3, 3, 2, 4), (2, 2, 2, 3, 4), (1, 5)]
        params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
        grads = [jnp.asarray(rng.normal(size=s) * 3, jnp.float32) for s in shapes]
        for clipping in (0.01, 10.0):
            ours, theirs = jaxstab.adaptive_grad_clip(clipping), optax.adaptive_grad_clip(clipping)
            got, state = self.variant(ours.update)(grads, ours.init(params), params)
            want, _ = theirs.update(grads, theirs.init(params), params)
            chex.assert_trees_all_close(got, want, rtol=1e-5)
            np.testing.assert_allclose(state.grad_norm, tree_norm(grads), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_parity_with_explicit_axis(self):
        if not OPTAX_AGC_HAS_AXIS:
            self.skipTest("optax >= 0.2.6")
        params = [jnp.ones((3, 4, 5))]
        grads = [jnp.arange(60.0).reshape(3, 4, 5)]
        ours, theirs = jaxstab.adaptive_grad_clip(0.1, axis=(1, 2)), optax.adaptive_grad_clip(
            0.1, axis=(1, 2)
        )
        got, _ = self.variant(ours.update)(grads, ours.init(params), params)
        want, _ = theirs.update(grads, theirs.init(params), params)
        chex.assert_trees_all_close(got, want, rtol=1e-5)

    def test_clip_fraction_counts_units(self):
        params = {"Dense_0": {"kernel": jnp.ones((4, 3))}}
        grads = {"Dense_0": {"kernel": jnp.ones((4, 3)).at[:, 0].set(100.0)}}
        tx = jaxstab.adaptive_grad_clip(1.0)
        out, state = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(state.clip_fraction, 1 / 3)
        np.testing.assert_allclose(out["Dense_0"]["kernel"][:, 0], 1.0)  # ||g|| -> ||w|| = 2
        np.testing.assert_array_equal(out["Dense_0"]["kernel"][:, 1:], 1.0)

    def test_clip_fraction_over_leaves_and_layouts(self):
        """The fraction comes from one comparison over all leaves' unit norms: each clipped
        leaf's units count in their own layout, excluded leaves' units not at all."""
        rng = np.random.default_rng(3)
        shapes = {"Dense_0": {"kernel": (5, 4), "bias": (4,)}, "Conv_0": {"kernel": (3, 3, 2, 4)}}
        shapes["head"] = {"kernel": (4, 2)}
        draw = lambda shape: jnp.asarray(rng.lognormal(0, 1, shape) - 1.0, jnp.float32)
        params = jax.tree.map(draw, shapes, is_leaf=lambda x: isinstance(x, tuple))
        grads = jax.tree.map(draw, shapes, is_leaf=lambda x: isinstance(x, tuple))
        tx = jaxstab.adaptive_grad_clip(0.5, exclude="head")
        _, state = jax.jit(tx.update)(grads, tx.init(params), params)
        norm = lambda x, axes: np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=axes))
        clipped = 0
        for module, name, axes in [("Dense_0", "kernel", 0), ("Dense_0", "bias", 0),
                                   ("Conv_0", "kernel", (0, 1, 2))]:  # fmt: skip
            g, p = norm(grads[module][name], axes), norm(params[module][name], axes)
            clipped += int(np.sum(g > 0.5 * np.maximum(p, 1e-3)))
        assert 0 < clipped < 9
        np.testing.assert_allclose(state.clip_fraction, clipped / 9)

    @chex.variants(with_jit=True, without_jit=True)
    def test_non_finite_units_are_zeroed_alone(self):
        """A NaN/Inf zeroes its own unit (an excluded leaf: the whole leaf); the other units get
        what they get from a finite step, and ``nonfinite`` counts the zeroed ones."""
        rng = np.random.default_rng(3)
        params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "head": jnp.ones((2,))}
        clean = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "head": jnp.ones((2,))}
        tx = jaxstab.adaptive_grad_clip(0.1, exclude="head")
        update = self.variant(tx.update)
        want, _ = update(clean, tx.init(params), params)
        for bad in (jnp.nan, jnp.inf, -jnp.inf):
            grads = {"a": clean["a"].at[1, 2].set(bad).at[0, 0].set(bad), "head": clean["head"]}
            out, state = update(grads, tx.init(params), params)
            np.testing.assert_array_equal(out["a"][:, [1, 3]], want["a"][:, [1, 3]])
            np.testing.assert_array_equal(out["a"][:, [0, 2]], 0.0)
            np.testing.assert_array_equal(out["head"], want["head"])
            assert float(state.nonfinite) == 2.0 and not np.isfinite(state.grad_norm)
            grads = {"a": clean["a"], "head": clean["head"].at[0].set(bad)}
            out, state = update(grads, tx.init(params), params)
            np.testing.assert_array_equal(out["a"], want["a"])
            np.testing.assert_array_equal(out["head"], 0.0)
            assert float(state.nonfinite) == 1.0
        _, state = update(clean, tx.init(params), params)
        assert float(state.nonfinite) == 0.0 and np.isfinite(state.grad_norm)

    def test_overflowing_gradients_are_clipped_not_zeroed(self):
        params = {"Dense_0": {"kernel": jnp.ones((4, 2))}}
        grads = {"Dense_0": {"kernel": jnp.full((4, 2), 1e20)}}
        tx = jaxstab.adaptive_grad_clip(0.5)
        out, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(out["Dense_0"]["kernel"], 0.5, rtol=1e-5)  # unit norm 1 = .5*2

    def test_errors(self):
        with pytest.raises(ValueError, match="clipping must be in"):
            jaxstab.adaptive_grad_clip(0.0)
        with pytest.raises(ValueError, match="eps must be in"):
            jaxstab.adaptive_grad_clip(0.1, eps=-1.0)
        tx = jaxstab.adaptive_grad_clip(0.1)
        grads = {"w": jnp.ones((2, 2))}
        with pytest.raises(ValueError, match="needs params"):
            tx.update(grads, tx.init(grads))
        with pytest.raises(ValueError, match=r"same tree structure(.|\n)*updates:(.|\n)*params:"):
            tx.update(grads, tx.init(grads), {"v": jnp.ones((2, 2))})
        with pytest.raises(TypeError, match="exclude must be"):
            jaxstab.adaptive_grad_clip(0.1, exclude=3)

    def test_no_retracing(self):
        params = random_tree(0)
        tx = jaxstab.adaptive_grad_clip(0.1)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(grads, state):
            return tx.update(grads, state, params)

        state = tx.init(params)
        for seed in range(3):
            _, state = step(random_tree(seed + 1), state)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(x.shape[-1])(jax.nn.relu(x)), None


class FlaxModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        x = x.reshape(x.shape[0], -1, 8)
        x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
        x = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(
            x, None
        )[0]
        return nn.Dense(10, name="head")(x.mean(axis=1))


@functools.cache
def flax_params_and_grads():
    model = FlaxModel()
    x = jnp.ones((2, 4, 4, 3))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    grads = jax.tree.map(lambda p: jnp.full_like(p, 50.0), params)
    return params, grads


def flat(tree):
    return {_norms.path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def unit_norm_np(x, axes):
    return np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=axes, keepdims=True))


def test_flax_layouts_stacked_and_excluded():
    params, grads = flax_params_and_grads()
    clipping, eps = 0.01, 1e-3
    tx = jaxstab.adaptive_grad_clip(clipping, eps, stacked="ScanBlock", exclude="head")
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)

    expected_axes = {
        "Conv_0/kernel": (0, 1, 2),
        "MultiHeadDotProductAttention_0/query/kernel": (0,),
        "MultiHeadDotProductAttention_0/query/bias": (0, 1),
        "MultiHeadDotProductAttention_0/out/kernel": (0, 1),
        "ScanBlock_0/Dense_0/kernel": (1,),  # per layer: reduce over `in` only
        "ScanBlock_0/Dense_0/bias": (1,),  # per layer: the whole bias
    }
    flat_p, flat_g, flat_o = flat(params), flat(grads), flat(out)
    assert set(expected_axes) <= set(flat_p)
    for name, axes in expected_axes.items():
        g, p = np.asarray(flat_g[name]), np.asarray(flat_p[name])
        max_norm = clipping * np.maximum(unit_norm_np(p, axes), eps)
        factor = np.minimum(1.0, max_norm / unit_norm_np(g, axes))
        np.testing.assert_allclose(flat_o[name], g * factor, rtol=1e-5, err_msg=name)
    for name in ("head/kernel", "head/bias"):
        np.testing.assert_array_equal(flat_o[name], flat_g[name])


def test_unit_axes_override():
    params, grads = flax_params_and_grads()
    calls = []

    def override(path, leaf):
        calls.append(_norms.path_str(path))
        return tuple(range(leaf.ndim)) if path[-1].key == "kernel" else None

    tx = jaxstab.adaptive_grad_clip(0.01, unit_axes=override)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    conv_g, conv_p = grads["Conv_0"]["kernel"], params["Conv_0"]["kernel"]
    factor = 0.01 * max(float(jnp.linalg.norm(conv_p)), 1e-3) / float(jnp.linalg.norm(conv_g))
    np.testing.assert_allclose(out["Conv_0"]["kernel"], conv_g * factor, rtol=1e-5)
    assert "Conv_0/kernel" in calls


def test_agc_telemetry_through_chain():
    params, grads = flax_params_and_grads()
    tx = optax.chain(jaxstab.adaptive_grad_clip(0.01), optax.sgd(0.1))
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    tel = jaxstab.telemetry(state)
    fields = ("grad_norm", "clip_fraction", "nonfinite")
    assert set(tel) == {f"0/adaptive_grad_clip/{f}" for f in fields}
    np.testing.assert_allclose(tel["0/adaptive_grad_clip/grad_norm"], tree_norm(grads), rtol=1e-5)
    assert 0.0 < float(tel["0/adaptive_grad_clip/clip_fraction"]) <= 1.0


def test_float64_gradients_beyond_float32_under_x64(enable_x64):
    """Summed in float32, a float64 gradient of 1e39 had norm inf and was zeroed."""
    with enable_x64(True):
        tx = jaxstab.clip_by_global_norm(1.0)
        grads = {"w": jnp.array([1e39, -1e39], jnp.float64), "b": jnp.ones(2, jnp.float32)}
        out, state = jax.jit(tx.update)(grads, tx.init(grads))
        np.testing.assert_allclose(out["w"], [0.5**0.5, -(0.5**0.5)], rtol=1e-12)
        assert out["w"].dtype == jnp.float64 and out["b"].dtype == jnp.float32
        assert bool(state.clipped) and state.grad_norm.dtype == jnp.float32  # telemetry


def test_complex_and_float64_gradients_use_their_modulus_in_full_range(enable_x64):
    """Complex units are clipped by their modulus, the telemetry counts an excluded complex
    leaf by its modulus, and float64 units beyond float32's range are clipped (x64)."""
    c64 = lambda shape, value: jnp.full(shape, value, jnp.complex64)
    params = {"Dense_0": {"kernel": c64((4, 2), 1 + 1j)}, "head": c64((2,), 1)}
    grads = {"Dense_0": {"kernel": c64((4, 2), 1e20j)}, "head": c64((2,), 0).at[0].set(1e20j)}
    tx = jaxstab.adaptive_grad_clip(0.5, exclude="head")
    out, state = tx.update(grads, tx.init(params), params)
    unit = 0.5 * np.sqrt(8.0)  # clipping x ||w|| per unit: 4 entries of modulus sqrt(2)
    np.testing.assert_allclose(out["Dense_0"]["kernel"], 1j * unit / 2, rtol=1e-5)
    np.testing.assert_allclose(state.grad_norm, 1e20 * np.sqrt(9.0), rtol=1e-5)
    with enable_x64(True):
        params = {"Dense_0": {"kernel": jnp.ones((4, 2), jnp.float64)}}
        grads = {"Dense_0": {"kernel": jnp.full((4, 2), 1e39, jnp.float64)}}
        out, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(out["Dense_0"]["kernel"], 0.5, rtol=1e-12)
