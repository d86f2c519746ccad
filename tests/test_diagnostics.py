"""jaxstab.diagnostics.layer_norms against NumPy (float64) references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxstab.diagnostics import layer_norms


def _np_norm(*arrays):
    return float(np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in arrays)))


def _np_ratio(g, p):
    return 0.0 if g == 0 else (np.inf if p == 0 else g / p)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(3, name="head")(x)


def _flax_trees():
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (5, 4))
    params = model.init(jax.random.key(1), x)["params"]
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
    return jax.grad(loss)(params), params


def test_flax_model_matches_numpy():
    grads, params = _flax_trees()
    out = layer_norms(grads, params)
    g, p = jax.tree.map(np.asarray, grads), jax.tree.map(np.asarray, params)
    expected = {}
    for layer in ("Dense_0", "LayerNorm_0", "head"):
        for leaf in g[layer]:
            expected[f"{layer}/{leaf}"] = _np_norm(g[layer][leaf])
            expected[f"{layer}/{leaf}/ratio"] = _np_ratio(
                _np_norm(g[layer][leaf]), _np_norm(p[layer][leaf])
            )
        expected[layer] = _np_norm(*g[layer].values())
        expected[f"{layer}/ratio"] = _np_ratio(
            _np_norm(*g[layer].values()), _np_norm(*p[layer].values())
        )
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].dtype == jnp.float32
        np.testing.assert_allclose(float(out[key]), value, rtol=1e-5, err_msg=key)


def test_without_params_has_no_ratios_and_is_jittable():
    grads, _ = _flax_trees()
    eager = layer_norms(grads)
    jitted = jax.jit(layer_norms)(grads)
    assert not any(k.endswith("ratio") for k in eager)
    assert set(eager) == set(jitted)  # jit returns dicts sorted by key
    assert list(eager)[:3] == ["Dense_0/bias", "Dense_0/kernel", "Dense_0"]
    for key in eager:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6)


def test_nested_lists_none_ints_and_top_level_leaves():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, 4)), rng.normal(size=7), rng.normal(size=2)
    tree = {
        "blocks": [{"w": jnp.asarray(a, jnp.float32), "n": jnp.int32(3)}, None],
        "top": jnp.asarray(b, jnp.float32),
        "enc": {"mlp": {"w": jnp.asarray(c, jnp.float16), "m": optax.MaskedNode()}},
    }
    out = layer_norms(tree)
    assert set(out) == {"blocks/0/w", "blocks/0", "top", "enc/mlp/w", "enc/mlp"}
    np.testing.assert_allclose(out["blocks/0/w"], _np_norm(a), rtol=1e-6)
    np.testing.assert_allclose(out["top"], _np_norm(b), rtol=1e-6)
    np.testing.assert_allclose(out["enc/mlp"], _np_norm(c.astype(np.float16)), rtol=1e-6)
    assert out["enc/mlp"].dtype == jnp.float32


def test_overflow_safe_and_guarded_ratios():
    grads = {
        "a": {"w": jnp.full((4,), 300.0, jnp.float16), "b": jnp.zeros(3)},
        "z": {"w": jnp.full((2,), 1e20)},
    }
    params = {"a": {"w": jnp.ones(4, jnp.float16), "b": jnp.zeros(3)}, "z": {"w": jnp.zeros(2)}}
    out = layer_norms(grads, params)
    assert float(out["a/w"]) == 600.0  # float16 squares overflow; the norm does not
    np.testing.assert_allclose(float(out["z"]), np.sqrt(2) * 1e20, rtol=1e-6)
    assert float(out["a/b/ratio"]) == 0.0  # zero gradient of zero params: 0, not NaN
    assert float(out["z/w/ratio"]) == np.inf  # nonzero gradient of zero params
    assert float(out["a/ratio"]) == 300.0


def test_empty_and_structure_mismatch():
    assert layer_norms({}) == {}
    assert layer_norms({"n": jnp.int32(1)}) == {}
    with pytest.raises(ValueError, match="same tree structure"):
        layer_norms({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
