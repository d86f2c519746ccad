"""global_norm, unit_norms, clip_factor, scale_leaf against NumPy float64 references."""

import re

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _lowering import conditionals
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxstab
from jaxstab import _norms


def leaf_reads(hlo: str) -> tuple[list[int], list[int]]:
    """How often each leaf (entry parameter) of an optimized HLO module is read: by instructions
    of the entry computation (handing it to a ``conditional`` in a tuple is not a read), and by
    ``get-tuple-element`` inside the conditionals' branches."""
    comps = dict(re.findall(r"^(?:ENTRY )?%(\S+) .*?\{\n(.*?)^\}", hlo, re.S | re.M))
    entry = comps[re.search(r"^ENTRY %(\S+)", hlo, re.M).group(1)].splitlines()
    instruction = re.compile(r"\s*(?:ROOT )?%(\S+) = (.*)")
    defs = {m.group(1): m.group(2) for m in map(instruction.match, entry) if m}
    params = sorted(
        (int(m.group(1)), name)
        for name, rhs in defs.items()
        if (m := re.search(r" parameter\((\d+)\)", rhs))
    )
    operands = lambda rhs: re.findall(r"%([\w.\-]+)", rhs.split("),")[0])
    main = [
        sum(name in operands(rhs) for rhs in defs.values() if " tuple(" not in rhs)
        for _, name in params
    ]
    in_branches = [0] * len(params)
    for rhs in defs.values():
        if " conditional(" not in rhs:
            continue
        branches = re.search(r"branch_computations=\{([^}]*)\}", rhs).group(1)
        for arg, branch in zip(operands(rhs)[1:], branches.split(","), strict=True):
            tupled = operands(defs[arg])
            body = comps[branch.strip().lstrip("%")]
            for i, (_, name) in enumerate(params):
                if name in tupled:
                    gte = rf"get-tuple-element\(%[^)]*\), index={tupled.index(name)}\b"
                    in_branches[i] += len(re.findall(gte, body))
    return main, in_branches


def np_norm(leaves):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves))


class GlobalNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_on_mixed_dtypes(self):
        rng = np.random.default_rng(0)
        tree = {
            "a": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32),
            "b": [jnp.asarray(rng.normal(size=5), jnp.float16), None],
            "c": jnp.asarray(rng.normal(size=(2, 2)), jnp.bfloat16),
            "step": jnp.array(3, jnp.int32),
        }
        got = self.variant(jaxstab.global_norm)(tree)
        want = np_norm([tree["a"], tree["b"][0], tree["c"].astype(jnp.float32)])
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_overflowing_sums_of_squares(self):
        fn = self.variant(jaxstab.global_norm)
        fp16 = {"a": jnp.full((10, 10), 300.0, jnp.float16)}
        np.testing.assert_allclose(fn(fp16), 3000.0, rtol=1e-6)
        assert not np.isfinite(optax.tree.norm(fp16).astype(jnp.float16))
        fp32 = [jnp.full((3,), 1e20), jnp.full((4,), -1e20)]
        np.testing.assert_allclose(fn(fp32), np.sqrt(7) * 1e20, rtol=1e-6)
        assert np.isinf(optax.tree.norm(fp32))
        largest = [jnp.array([3e38, 1.0])]
        np.testing.assert_allclose(fn(largest), 3e38, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_underflowing_sums_of_squares(self):
        fn = self.variant(jaxstab.global_norm)
        np.testing.assert_allclose(fn([jnp.full((9,), 1e-25)]), 3e-25, rtol=1e-6)
        assert fn([jnp.zeros((3, 3))]) == 0.0
        assert fn({}) == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_non_finite(self):
        fn = self.variant(jaxstab.global_norm)
        assert np.isnan(fn([jnp.array([1.0, jnp.nan]), jnp.array([jnp.inf])]))
        assert np.isposinf(fn([jnp.array([1.0, -jnp.inf])]))
        assert np.isposinf(fn([jnp.array([1e30, jnp.inf])]))

    def test_masked_nodes_are_ignored(self):
        tree = {"a": jnp.array([3.0, 4.0]), "b": optax.MaskedNode()}
        assert jaxstab.global_norm(tree) == 5.0

    def test_common_case_is_one_pass(self):
        """Outside the rescue branch the optimized HLO reads each gradient exactly once."""
        tree = [jnp.ones((64, 64)), jnp.ones((32, 48)), jnp.ones((100,))]
        per_unit = lambda t: _norms.unit_norms(t, [(0,)] * len(t))
        for fn in (jaxstab.global_norm, per_unit):
            main, in_branches = leaf_reads(jax.jit(fn).lower(tree).compile().as_text())
            assert main == [1, 1, 1]
            assert in_branches == [1, 1, 1]  # the rescue reads them again, only there
        # The same count finds a second read when the rescue is not behind a conditional.
        two_pass = lambda t: optax.tree.norm(t) + optax.tree.norm(jax.tree.map(lambda x: x / 8, t))
        main, _ = leaf_reads(jax.jit(two_pass).lower(tree).compile().as_text())
        assert main == [2, 2, 2]

    def test_complex_leaves_count_by_their_modulus(self):
        """The rescue took the real part: 1e20j had norm 0 and 1e-12j too (optax: 1e-12)."""
        for value in (1e20j, 1e-12j, 3e-15 + 4e-15j, 1e20 + 1e20j):
            for leaves in ([jnp.array([value])], [jnp.array([value]) for _ in range(3)]):
                want = abs(value) * np.sqrt(len(leaves))
                np.testing.assert_allclose(jaxstab.global_norm(leaves), want, rtol=1e-6)
                got = _norms.leaf_norms(leaves)  # unit_norms' own rescue
                np.testing.assert_allclose(got, abs(value), rtol=1e-6)
        np.testing.assert_allclose(optax.tree.norm([jnp.array([1e-12j])]), 1e-12, rtol=1e-6)

    def test_many_small_leaves_are_grouped_in_the_rescue(self):
        leaves = [jnp.full((5,), 1e20) for _ in range(40)]
        np.testing.assert_allclose(jaxstab.global_norm(leaves), np.sqrt(200) * 1e20, rtol=1e-6)
        jaxpr = str(jax.make_jaxpr(jaxstab.global_norm)(leaves))
        assert jaxpr.count("f32[200] = concatenate") == 1  # older jax: in chunks of 16 leaves


class UnitNormsTest(chex.TestCase):
    def test_matches_numpy_per_unit(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(3, 4, 5)).astype(np.float32)
        (got,) = _norms.unit_norms([jnp.asarray(x)], [(0, 1)])
        want = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=(0, 1), keepdims=True))
        np.testing.assert_allclose(got, want, rtol=1e-6)

    def test_rescues_only_units_that_need_it(self):
        x = jnp.array([[1e20, 3.0], [1e20, 4.0]])
        (got,) = _norms.unit_norms([x], [(0,)])
        np.testing.assert_allclose(got, [[np.sqrt(2) * 1e20, 5.0]], rtol=1e-6)

    def test_leaf_norms(self):
        got = _norms.leaf_norms([jnp.array([3.0, 4.0]), jnp.full((2, 2), 1e20)])
        np.testing.assert_allclose(got, [5.0, 2e20], rtol=1e-6)


@pytest.mark.parametrize("rescue", ["auto", "branchless"])
@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(max_dims=3, max_side=5),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    st.sampled_from([1e-30, 1.0, 1e15, 1e30]),
)
def test_property_global_norm_matches_float64(rescue, x, factor):
    x = (x.astype(np.float64) * factor).astype(np.float32)
    saved, _norms._RESCUE = _norms._RESCUE, rescue
    try:
        got = float(jaxstab.global_norm([jnp.asarray(x)]))
        (unit,) = _norms.leaf_norms([jnp.asarray(x)])
    finally:
        _norms._RESCUE = saved
    want = np_norm([x])
    if want > 1e-35:
        np.testing.assert_allclose(got, want, rtol=2e-6)
        # The branch keeps a unit whose float32 squares all flush to 0 at norm 0.
        normal_square = np.sqrt(np.finfo(np.float32).tiny)
        if rescue == "branchless" or np.any(np.abs(x) >= normal_square):
            np.testing.assert_allclose(float(unit), want, rtol=2e-6)


class _Branchless:
    """Runs a test class's tests with the norms' GPU/TPU form (three sums, no conditional) on the
    CPU, where :func:`_norms._per_platform` otherwise picks the branch form."""

    def setUp(self):
        super().setUp()
        self._saved, _norms._RESCUE = _norms._RESCUE, "branchless"
        jax.clear_caches()

    def tearDown(self):
        _norms._RESCUE = self._saved
        jax.clear_caches()
        super().tearDown()


class BranchlessGlobalNormTest(_Branchless, GlobalNormTest):
    def test_common_case_is_one_pass(self):
        """No conditional at all: the three sums are reductions beside each other."""
        tree = [jnp.ones((64, 64)), jnp.ones((32, 48)), jnp.ones((100,))]
        per_unit = lambda t: _norms.unit_norms(t, [(0,)] * len(t))
        for fn in (jaxstab.global_norm, per_unit):
            jaxpr = str(jax.make_jaxpr(fn)(tree))
            assert " cond[" not in jaxpr and jaxpr.count("reduce_sum") == 9

    def test_many_small_leaves_are_grouped_in_the_rescue(self):
        leaves = [jnp.full((5,), 1e20) for _ in range(40)]
        np.testing.assert_allclose(jaxstab.global_norm(leaves), np.sqrt(200) * 1e20, rtol=1e-6)


class BranchlessUnitNormsTest(_Branchless, UnitNormsTest):
    pass


def test_auto_picks_the_branch_on_cpu_and_three_sums_elsewhere():
    tree = [jnp.ones((8, 4)), jnp.ones((3,))]
    for fn in (jaxstab.global_norm, lambda t: _norms.unit_norms(t, [(0,), (0,)])):
        for platform, expected in (("cpu", 1), ("cuda", 0), ("tpu", 0)):
            assert len(conditionals(fn, tree, platform=platform)) == expected, platform


class ClipFactorTest(chex.TestCase):
    def test_values(self):
        f = _norms.clip_factor(jnp.array([0.5, 2.0, 0.0, jnp.nan, jnp.inf]), 1.0)
        np.testing.assert_array_equal(f, [1.0, 0.5, 1.0, 0.0, 0.0])
        assert _norms.clip_factor(jnp.array(0.0), 0.0) == 1.0

    def test_scale_leaf_keeps_dtype_and_zeroes_non_finite(self):
        x = jnp.array([1.0, jnp.nan, jnp.inf], jnp.float16)
        out = _norms.scale_leaf(x, jnp.float32(0.0))
        assert out.dtype == jnp.float16
        np.testing.assert_array_equal(out, [0.0, 0.0, 0.0])
        small = _norms.scale_leaf(jnp.full((2,), 300.0, jnp.float16), jnp.float32(1e-6))
        np.testing.assert_allclose(small.astype(np.float32), 3e-4, rtol=1e-3)


@pytest.mark.parametrize(
    ("path", "shape", "axes"),
    [
        (("Dense_0", "kernel"), (16, 8), (0,)),
        (("Dense_0", "bias"), (8,), (0,)),
        (("Conv_0", "kernel"), (3, 3, 4, 8), (0, 1, 2)),
        (("Conv_0", "kernel"), (5, 4, 8), (0, 1)),
        (("attn", "query", "kernel"), (32, 4, 8), (0,)),
        (("attn", "query", "bias"), (4, 8), (0, 1)),
        (("attn", "out", "kernel"), (4, 8, 32), (0, 1)),
        (("LayerNorm_0", "scale"), (32,), (0,)),
        ((0,), (16, 8), (0,)),
        ((0,), (2, 3, 4), (0,)),
        ((0,), (1, 7), (0, 1)),
        ((0,), (2, 3, 3, 4, 8), (0, 1, 2, 3)),
    ],
)
def test_flax_unit_axes(path, shape, axes):
    keys = tuple(jax.tree_util.DictKey(k) for k in path)
    assert jaxstab.flax_unit_axes(keys, shape) == axes


def test_flax_unit_axes_unknown_rank():
    with pytest.raises(ValueError, match="axis= or unit_axes="):
        jaxstab.flax_unit_axes((jax.tree_util.DictKey("w"),), (2, 2, 2, 2, 2, 2))


@pytest.mark.parametrize("rescue", ["auto", "branchless"])
def test_float64_leaves_are_summed_in_float64_under_x64(enable_x64, monkeypatch, rescue):
    """Summed in float32, a float64 gradient of 1e39 had norm inf and one of 1e-40 norm 0."""
    monkeypatch.setattr(_norms, "_RESCUE", rescue)
    with enable_x64(True):
        f64 = lambda *v: jnp.array(v, jnp.float64)
        cases = [
            ([f64(1e39, 0.0)], 1e39),
            ([f64(1e-40)], 1e-40),
            ([f64(1e200, 1e200)], np.sqrt(2) * 1e200),  # float64's own rescue
            ([f64(3e-145, 4e-145)], 5e-145),
            ([f64(1e39), jnp.ones((4,), jnp.float32)], 1e39),  # mixed: float64 wins
            ([jnp.array([1e39j], jnp.complex128)], 1e39),
        ]
        for leaves, want in cases:
            got = jaxstab.global_norm(leaves)
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(got, want, rtol=1e-12)
            np.testing.assert_allclose(_norms.leaf_norms(leaves)[0], want, rtol=1e-12)
        # float32 and narrower keep their float32 promise under x64 too.
        assert jaxstab.global_norm([jnp.ones(3, jnp.float32)]).dtype == jnp.float32
