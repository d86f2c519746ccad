"""qk_clip against a NumPy reference (per head, GQA, stacked layers); the recording attention_fn
against flax's own attention (linen and nnx); the gathered logits feeding qk_clip end to end."""

import functools
import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxstab
from jaxstab.attention import QKClipState, flax_projection, gather_max_logits, qk_clip
from jaxstab.attention_flax import COLLECTION, MaxLogits, dot_product_attention, max_logits

F, D = 6, 3  # features, head_dim


def attention_params(rng, heads, kv_heads=None, stack=(), dtype=jnp.float32):
    """One Flax-layout attention module's params (with biases), leading ``stack`` axes."""
    kv_heads = kv_heads or heads
    shapes = {
        "query": {"kernel": (*stack, F, heads, D), "bias": (*stack, heads, D)},
        "key": {"kernel": (*stack, F, kv_heads, D), "bias": (*stack, kv_heads, D)},
        "value": {"kernel": (*stack, F, kv_heads, D)},
        "out": {"kernel": (*stack, heads, D, F)},
    }
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), dtype), shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )  # fmt: skip


def model(seed=0, heads=4, kv_heads=None, stack=(), dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    params = {
        "Block_0": {"attn": attention_params(rng, heads, kv_heads, stack, dtype)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(F, 2)), dtype)},
    }
    updates = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.normal(size=p.shape), p.dtype), params)
    return params, updates


def reference(params, updates, s, tau, kv_heads):
    """NumPy: new q/k params per head, from the logits' own definition. Query head h, key head
    h // g: the factors must multiply to gamma = min(1, tau/S), be <= 1, and leave unclipped
    heads' (and groups') weights untouched."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    u = jax.tree.map(lambda x: np.asarray(x, np.float64), updates)
    s = np.asarray(s, np.float64)
    gamma = np.where(np.isfinite(s) & (s > tau), tau / np.where(np.isfinite(s), s, 1), 1.0)
    heads = s.shape[-1]
    g = heads // kv_heads
    key_f = np.sqrt(gamma.reshape(*s.shape[:-1], kv_heads, g).max(-1))
    query_f = gamma / np.repeat(key_f, g, axis=-1)
    out = jax.tree.map(lambda a, b: a + b, p, u)
    for name, f in (("query", query_f), ("key", key_f)):
        kernel = out["Block_0"]["attn"][name]["kernel"]
        out["Block_0"]["attn"][name]["kernel"] = kernel * f[..., None, :, None]
        bias = out["Block_0"]["attn"][name]["bias"]
        out["Block_0"]["attn"][name]["bias"] = bias * f[..., :, None]
    return out, gamma


def logits_of(attn, x):
    """q . k / sqrt(D) for every query head with its key head, as NumPy, unstacked params."""
    q = np.einsum("tf,fhd->thd", x, attn["query"]["kernel"]) + attn["query"]["bias"]
    k = np.einsum("tf,fhd->thd", x, attn["key"]["kernel"]) + attn["key"]["bias"]
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    return np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D)


class QKClipTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_reference(self):
        cases = [  # heads, kv_heads, stack, max logits
            (4, 4, (), [400.0, 50.0, 100.0, 1e4]),
            (4, 2, (), [400.0, 50.0, 300.0, 200.0]),  # GQA: one mixed group, one all over tau
            (4, 1, (), [1e3, 2e3, 150.0, 120.0]),
            (2, 2, (3,), [[400.0, 1.0], [90.0, 250.0], [1e5, 1e5]]),  # nn.scan-stacked layers
        ]
        for heads, kv_heads, stack, s in cases:
            params, updates = model(heads=heads, kv_heads=kv_heads, stack=stack)
            tx = qk_clip(100.0)
            s = jnp.asarray(s)
            got, state = self.variant(tx.update)(
                updates, tx.init(params), params, max_logits={"Block_0": {"attn": s}}
            )
            want, gamma = reference(params, updates, s, 100.0, kv_heads)
            new = optax.apply_updates(params, got)
            chex.assert_trees_all_close(new, jax.tree.map(np.float32, want), rtol=1e-5, atol=1e-6)
            assert float(state.heads_clipped) == np.sum(gamma < 1)
            assert float(state.max_logit) == np.max(s)
            # Untouched leaves keep the optimizer's update bit for bit.
            np.testing.assert_array_equal(got["head"]["kernel"], updates["head"]["kernel"])
            np.testing.assert_array_equal(
                got["Block_0"]["attn"]["value"]["kernel"],
                updates["Block_0"]["attn"]["value"]["kernel"],
            )

    def test_logits_scale_by_exactly_tau_over_s(self):
        x = np.random.default_rng(1).normal(size=(5, F))
        for kv_heads in (4, 2, 1):
            params, updates = model(seed=2, kv_heads=kv_heads)
            after = optax.apply_updates(params, updates)
            s = logits_of(jax.tree.map(np.asarray, after["Block_0"]["attn"]), x).max(axis=(1, 2))
            s = s.copy()
            s[1] = 0.5 * s[1]  # head 1 reported under its real maximum -> tau between
            tau = float(np.sort(s)[1])  # some heads above, some at or below
            tx = qk_clip(tau)
            got, _ = tx.update(
                updates, tx.init(params), params, max_logits={"Block_0": {"attn": s}}
            )
            new = optax.apply_updates(params, got)
            before = logits_of(jax.tree.map(np.asarray, after["Block_0"]["attn"]), x)
            now = logits_of(jax.tree.map(np.asarray, new["Block_0"]["attn"]), x)
            np.testing.assert_allclose(now, before * np.minimum(1, tau / s)[:, None, None],
                                       rtol=1e-4, atol=1e-5)  # fmt: skip

    def test_noop_under_tau_is_bit_exact(self):
        params, updates = model()
        tx = qk_clip(100.0)
        got, state = tx.update(
            updates, tx.init(params), params, max_logits={"Block_0": {"attn": jnp.full(4, 99.0)}}
        )
        chex.assert_trees_all_equal(got, updates)
        assert float(state.heads_clipped) == 0

    def test_non_finite_logits_are_ignored(self):
        params, updates = model()
        tx = qk_clip(10.0)
        s = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 40.0])
        got, state = tx.update(
            updates, tx.init(params), params, max_logits={"Block_0": {"attn": s}}
        )
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got))
        want, _ = reference(params, updates, s, 10.0, 4)
        chex.assert_trees_all_close(
            optax.apply_updates(params, got), jax.tree.map(np.float32, want), rtol=1e-5, atol=1e-6
        )
        assert float(state.heads_clipped) == 1 and float(state.max_logit) == 40.0

    def test_keeps_dtypes(self):
        for dtype in (jnp.bfloat16, jnp.float16):
            params, updates = model(dtype=dtype)
            tx = qk_clip(1.0)
            max_logits = {"Block_0": {"attn": jnp.array([4.0, 1.0, 9.0, 0.5], dtype)}}
            got, _ = tx.update(updates, tx.init(params), params, max_logits=max_logits)
            chex.assert_trees_all_equal_dtypes(got, updates)
            want, _ = reference(params, updates, max_logits["Block_0"]["attn"], 1.0, 4)
            new = optax.apply_updates(params, got)
            kernel = new["Block_0"]["attn"]["query"]["kernel"]
            np.testing.assert_allclose(
                np.asarray(kernel, np.float32), want["Block_0"]["attn"]["query"]["kernel"],
                rtol=2e-2, atol=2e-2,
            )  # fmt: skip

    def test_inject_hyperparams_and_no_retrace(self):
        params, updates = model()
        tx = optax.chain(optax.adam(1e-3), optax.inject_hyperparams(qk_clip)(tau=100.0))
        state = tx.init(params)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(params, state, s):
            u, state = tx.update(updates, state, params, max_logits={"Block_0": {"attn": s}})
            return optax.apply_updates(params, u), state

        for tau in (100.0, 10.0):
            state[1].hyperparams["tau"] = jnp.asarray(tau)
            _, state = step(params, state, jnp.array([400.0, 50.0, 20.0, 5.0]))
            assert float(jaxstab.telemetry(state)["1/inner_state/qk_clip/heads_clipped"]) == (
                1 if tau == 100.0 else 3
            )

    def test_sharded_jit(self):
        """Heads sharded across devices (all there are; 8 under make test's multidevice run)."""
        n = 4 if jax.device_count() >= 4 else 1
        mesh = jax.make_mesh((n,), ("heads",))
        params, updates = model()

        def spec(path, x):  # query/key heads split across devices, the rest replicated
            if flax_projection(path) is None:
                return PartitionSpec()
            return PartitionSpec(*[None] * (x.ndim - 2), "heads", None)

        shard = lambda tree: jax.tree_util.tree_map_with_path(
            lambda path, x: jax.device_put(x, NamedSharding(mesh, spec(path, x))), tree
        )
        tx = qk_clip(100.0)
        s = {"Block_0": {"attn": jnp.array([400.0, 50.0, 100.0, 1e4])}}
        got, _ = jax.jit(tx.update)(shard(updates), tx.init(params), shard(params), max_logits=s)
        want, _ = tx.update(updates, tx.init(params), params, max_logits=s)
        chex.assert_trees_all_close(got, want)
        assert got["Block_0"]["attn"]["query"]["kernel"].sharding.num_devices == n

    def test_bad_input(self):
        for tau in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="tau must be in"):
                qk_clip(tau)
        params, updates = model()
        tx = qk_clip()
        with pytest.raises(ValueError, match="needs params and max_logits"):
            tx.update(updates, tx.init(params), params)
        with pytest.raises(ValueError, match="no max_logits for attention module 'Block_0/attn'"):
            tx.update(updates, tx.init(params), params, max_logits={"other": jnp.ones(4)})
        with pytest.raises(ValueError, match=r"max_logits for \['extra'\] match no"):
            s = {"Block_0": {"attn": jnp.ones(4)}, "extra": jnp.ones(4)}
            tx.update(updates, tx.init(params), params, max_logits=s)
        with pytest.raises(ValueError, match="not a multiple of 3 key heads"):
            p, u = model(heads=4, kv_heads=3)
            tx.update(u, tx.init(p), p, max_logits={"Block_0": {"attn": jnp.ones(4)}})

    def test_custom_projection_predicate(self):
        params = {"mha": {"wq": {"w": jnp.ones((2, 2, 1))}, "wk": {"w": jnp.ones((2, 2, 1))}}}
        role = {"wq": "query", "wk": "key"}
        tx = qk_clip(1.0, projection=lambda path: role.get(path[-2].key))
        got, _ = tx.update(
            jax.tree.map(jnp.zeros_like, params), tx.init(params), params,
            max_logits={"mha": jnp.array([4.0, 1.0])},
        )  # fmt: skip
        new = optax.apply_updates(params, got)
        np.testing.assert_allclose(new["mha"]["wq"]["w"][0, :, 0], [0.5, 1.0])
        assert isinstance(tx.init(params), QKClipState)


def test_gather_max_logits():
    sown = {"Block_0": {"attn": {"max_logits": 1.0}, "mlp": {}}, "x": 3, "Block_1": {"attn": {}}}
    assert gather_max_logits(sown) == {"Block_0": {"attn": jnp.asarray(1.0)}}
    assert gather_max_logits({}) is None


# --------------------------------------------------------------------------------------------
# Recording attention_fn


def masked_max_logits(query, key, mask):
    """NumPy: per query head, max over batch/q/k of q . k / sqrt(d) where the mask allows."""
    q, k = np.asarray(query, np.float64), np.asarray(key, np.float64)
    k = np.repeat(k, q.shape[-2] // k.shape[-2], axis=-2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
    return logits.max(axis=(0, 2, 3))


def padding_and_causal_mask(batch, length):
    lengths = np.arange(length - batch + 1, length + 1)  # each row has some padding
    valid = np.arange(length)[None, :] < lengths[:, None]
    return nn.combine_masks(nn.make_attention_mask(valid, valid), nn.make_causal_mask(valid))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linen_matches_flax_and_records_masked_max(dtype):
    x = jax.random.normal(jax.random.key(1), (3, 7, 16))
    mask = padding_and_causal_mask(3, 7)
    ref = nn.MultiHeadDotProductAttention(4, dtype=dtype)
    ours = nn.MultiHeadDotProductAttention(4, dtype=dtype, attention_fn=dot_product_attention)
    variables = ref.init(jax.random.key(0), x)

    def loss(params, layer, **kw):
        y = layer.apply({"params": params}, x, mask=mask, mutable=[COLLECTION], **kw)[0]
        return jnp.sum(y.astype(jnp.float32) ** 2), y

    (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(variables["params"], ref)
    (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], ours, sow_weights=True
    )
    np.testing.assert_array_equal(got, want)  # the same ops in the same order
    chex.assert_trees_all_close(g_got, g_want, rtol=1e-6)
    _, recorded = ours.apply(variables, x, mask=mask, sow_weights=True, mutable=[COLLECTION])
    p = variables["params"]
    q = nn.DenseGeneral((4, 4), dtype=dtype).apply({"params": p["query"]}, x)
    k = nn.DenseGeneral((4, 4), dtype=dtype).apply({"params": p["key"]}, x)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(
        max_logits(recorded), masked_max_logits(q, k, mask), rtol=tol, atol=tol
    )
    # Without sow_weights nothing is recorded and the output is unchanged.
    y, none = ours.apply(variables, x, mask=mask, mutable=[COLLECTION])
    np.testing.assert_array_equal(y, want)
    assert COLLECTION not in none


@pytest.mark.skipif(
    not hasattr(nnx, "capture")
    or "num_kv_heads" not in inspect.signature(nnx.MultiHeadAttention.__init__).parameters,
    reason="nnx GQA (num_kv_heads) and nnx.capture are newer than the flax floor (0.11.0)",
)
def test_nnx_gqa_causal_matches_flax_and_records():
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    make = lambda **kw: nnx.MultiHeadAttention(
        4, 16, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0), **kw
    )
    ref, ours = make(), make(attention_fn=dot_product_attention)
    forward = nnx.capture(lambda m, x: m(x, sow_weights=True, is_causal=True), MaxLogits)
    got, state = forward(ours, x)
    np.testing.assert_array_equal(got, ref(x, is_causal=True))
    q, k = ours.query(x), ours.key(x)
    causal = np.tril(np.ones((6, 6), bool))
    np.testing.assert_allclose(
        gather_max_logits(nnx.to_pure_dict(state)), masked_max_logits(q, k, causal), rtol=1e-5
    )


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        attn = nn.MultiHeadDotProductAttention(2, attention_fn=dot_product_attention, name="attn")
        return x + attn(x, mask=mask, sow_weights=True), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            ScanBlock, variable_axes={"params": 0, COLLECTION: 0},
            split_rngs={"params": True}, length=3,
        )  # fmt: skip
        return scan(name="layers")(x, None)[0]


def test_scan_stacked_logits_feed_qk_clip():
    """nn.scan gives (layers, heads) logits; after qk_clip every head's max logit is <= tau."""
    x = 3 * jax.random.normal(jax.random.key(1), (2, 5, 8))
    model = Stack()
    params = model.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda p: 4 * p, params)  # large logits
    _, recorded = model.apply({"params": params}, x, mutable=[COLLECTION])
    s = max_logits(recorded)
    assert s["layers"]["attn"].shape == (3, 2)
    tau = float(jnp.min(s["layers"]["attn"])) + 1e-3
    tx = qk_clip(tau)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, tx.init(params), params, max_logits=s)
    assert float(state.heads_clipped) == 5
    # The first layer sees the same input, so its logits now peak at exactly tau.
    _, after = model.apply(
        {"params": optax.apply_updates(params, updates)}, x, mutable=[COLLECTION]
    )
    np.testing.assert_allclose(max_logits(after)["layers"]["attn"][0], tau, rtol=1e-4)


def test_fully_masked_head_records_minus_inf():
    q = jnp.ones((1, 3, 2, 4))
    mask = jnp.zeros((1, 1, 3, 3), bool)

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, q):
            return dot_product_attention(q, q, q, mask=mask, module=self)

    y, out = Probe().apply({}, q, mutable=[COLLECTION])
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(max_logits(out), [-np.inf, -np.inf])


# --------------------------------------------------------------------------------------------
# Soft-capped attention logits (Gemma 2)


def capped_attention64(query, key, value, mask=None, bias=None, cap=None):
    """NumPy float64 attention: softmax(where(mask, cap * tanh(q . k / sqrt(d) / cap) + bias))."""
    q, k, v = (np.asarray(a, np.float64) for a in (query, key, value))
    k = np.repeat(k, q.shape[-2] // k.shape[-2], axis=-2)
    v = np.repeat(v, q.shape[-2] // v.shape[-2], axis=-2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if mask is not None:  # flax's fill: a fully masked (padding) query attends uniformly
        logits = np.where(np.broadcast_to(mask, logits.shape), logits, np.finfo(np.float32).min)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def qkv(seed=0, heads=4, kv_heads=4, scale=8.0, dtype=jnp.float32):
    """Random (batch 3, length 7) query/key/value, scaled so many logits exceed the caps."""
    rng = np.random.default_rng(seed)
    q = scale * rng.normal(size=(3, 7, heads, D))
    k, v = (scale * rng.normal(size=(3, 7, kv_heads, D)) for _ in range(2))
    return (jnp.asarray(a, dtype) for a in (q, k, v))


class Recorder(nn.Module):
    """Calls ``dot_product_attention`` directly with this module recording."""

    @nn.compact
    def __call__(self, q, k, v, **kwargs):
        return dot_product_attention(q, k, v, module=self, **kwargs)


class SoftcapAttentionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_reference_and_records_the_raw_max(self):
        mask = padding_and_causal_mask(3, 7)
        bias = 0.5 * np.random.default_rng(9).normal(size=(1, 4, 7, 7))
        for kv_heads in (4, 2):
            q, k, v = qkv(heads=4, kv_heads=kv_heads)
            raw = masked_max_logits(q, k, mask)
            assert np.all(raw > 60.0)  # every head is capped
            for cap in (5.0, 50.0):
                for b in (None, jnp.asarray(bias, jnp.float32)):

                    def apply(q, k, v, bias, cap=cap):
                        return Recorder().apply(
                            {}, q, k, v, mask=mask, bias=bias, logit_softcap=cap,
                            mutable=[COLLECTION],
                        )  # fmt: skip

                    y, recorded = self.variant(apply)(q, k, v, b)
                    want = capped_attention64(q, k, v, mask, b, cap)
                    # float32 softmax of logits near the cap: jax versions differ by ~4e-5
                    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
                    # recorded: the raw logits, before the cap (what qk_clip scales)
                    np.testing.assert_allclose(max_logits(recorded), raw, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_traced_cap_and_finite_gradients(self):
        q, k, v = qkv(scale=300.0)  # logits ~ 1e5
        mask = padding_and_causal_mask(3, 7)

        def loss(q, k, cap):
            y = dot_product_attention(q, k, v, mask=mask, logit_softcap=cap)
            return jnp.sum(y**2)

        for cap in (30.0, 50.0):
            value, grads = self.variant(jax.value_and_grad(loss, argnums=(0, 1)))(
                q, k, jnp.asarray(cap)
            )
            want = capped_attention64(q, k, v, mask, cap=cap)
            np.testing.assert_allclose(value, np.sum(want**2), rtol=1e-4)
            assert all(np.all(np.isfinite(g)) for g in grads)

    def test_low_precision_keeps_dtype(self):
        mask = padding_and_causal_mask(3, 7)
        for dtype in (jnp.bfloat16, jnp.float16):
            # logits up to ~30 capped at 10: bfloat16 resolves a capped logit to 1/16
            q, k, v = qkv(scale=3.0, dtype=dtype)
            assert np.any(masked_max_logits(q, k, mask) > 20.0)
            for force in (False, True):
                y = dot_product_attention(
                    q, k, v, mask=mask, logit_softcap=10.0, force_fp32_for_softmax=force
                )
                assert y.dtype == (jnp.float32 if force else dtype)  # as flax's own
                want = capped_attention64(q, k, v, mask, cap=10.0)
                np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=0.1, atol=0.3)

    def test_no_cap_is_bit_identical(self):
        mask = padding_and_causal_mask(3, 7)
        for kv_heads in (4, 2):
            q, k, v = qkv(heads=4, kv_heads=kv_heads)
            plain, plain_rec = Recorder().apply({}, q, k, v, mask=mask, mutable=[COLLECTION])
            none, none_rec = Recorder().apply(
                {}, q, k, v, mask=mask, logit_softcap=None, mutable=[COLLECTION]
            )
            np.testing.assert_array_equal(none, plain)
            chex.assert_trees_all_equal(none_rec, plain_rec)
        q, k, v = qkv()
        np.testing.assert_array_equal(
            dot_product_attention(q, k, v, mask=mask, logit_softcap=None),
            nn.dot_product_attention(q, k, v, mask=mask),
        )

    def test_bad_softcap(self):
        q, k, v = qkv()
        for cap in (0.0, -50.0, float("nan"), float("inf"), jnp.ones(4)):
            with pytest.raises(ValueError, match="logit_softcap"):
                dot_product_attention(q, k, v, logit_softcap=cap)
        with pytest.raises(TypeError, match="logit_softcap"):
            dot_product_attention(q, k, v, logit_softcap="50")


def tanh_capped_attention(query, key, value, mask=None, *, cap, **unused):
    """A plain jnp reference ``attention_fn``: tanh-capped logits, masked, softmax (float32)."""
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key) / jnp.sqrt(query.shape[-1])
    logits = jnp.where(mask, cap * jnp.tanh(logits / cap), jnp.finfo(jnp.float32).min)
    return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits), value)


def test_linen_partial_softcap_matches_reference_and_records():
    """functools.partial keeps the signature flax filters its keyword arguments by."""
    x = 4 * jax.random.normal(jax.random.key(1), (3, 7, 16))
    mask = padding_and_causal_mask(3, 7)
    cap = 20.0
    make = lambda fn: nn.MultiHeadDotProductAttention(4, attention_fn=fn)
    ref = make(functools.partial(tanh_capped_attention, cap=cap))
    ours = make(functools.partial(dot_product_attention, logit_softcap=cap))
    variables = ours.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda p: 3 * p, variables)  # logits well past the cap
    want = ref.apply(variables, x, mask=mask)
    y, recorded = jax.jit(
        lambda v, x: ours.apply(v, x, mask=mask, sow_weights=True, mutable=[COLLECTION])
    )(variables, x)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)  # jax versions differ by ~3e-5
    p = variables["params"]
    q = nn.DenseGeneral((4, 4)).apply({"params": p["query"]}, x)
    k = nn.DenseGeneral((4, 4)).apply({"params": p["key"]}, x)
    raw = masked_max_logits(q, k, mask)
    assert np.all(raw > cap)
    # The raw logits are recorded (what qk_clip scales), not the capped ones.
    np.testing.assert_allclose(max_logits(recorded), raw, rtol=1e-5)
    # Not capping differs (the cap did something).
    assert not np.allclose(make(dot_product_attention).apply(variables, x, mask=mask), y)


def test_nnx_partial_softcap_matches_reference():
    x = 4 * jax.random.normal(jax.random.key(1), (2, 6, 16))
    make = lambda fn: nnx.MultiHeadAttention(4, 16, decode=False, rngs=nnx.Rngs(0), attention_fn=fn)
    ours = make(functools.partial(dot_product_attention, logit_softcap=10.0))
    ref = make(functools.partial(tanh_capped_attention, cap=10.0))
    causal = nn.make_causal_mask(jnp.ones((2, 6)))
    got = ours(x, mask=causal)
    want = ref(x, mask=causal)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
