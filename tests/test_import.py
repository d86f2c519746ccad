"""`import jaxstab` stays flax-free; the flax modules load on first access."""

import subprocess
import sys
import textwrap

import pytest

import jaxstab

# Runs in a fresh interpreter: this test process has long imported flax through other tests.
_SCRIPT = textwrap.dedent(
    """
    import sys

    import jax
    import jax.numpy as jnp
    import optax

    import jaxstab

    params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}
    grads = {"w": jnp.full((3, 2), 4.0), "b": jnp.zeros((2,))}
    tx = optax.chain(
        jaxstab.clip_by_global_norm(1.0),
        jaxstab.skip_anomalies(optax.adam(1e-3)),
    )
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    tel = jaxstab.telemetry(state)
    norms = jaxstab.layer_norms(grads)
    assert abs(float(tel["0/clip_by_global_norm/scale"]) - 1 / 96**0.5) < 1e-6, tel
    assert not bool(tel["1/skip_anomalies/skipped"]), tel
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
    assert norms, norms
    assert "flax" not in sys.modules, sorted(m for m in sys.modules if m.startswith("flax"))

    assert jaxstab.linen.BatchNorm.__module__ == "jaxstab.linen"
    from jaxstab import nnx

    assert nnx.BatchNorm.__module__ == "jaxstab.nnx"
    assert "flax" in sys.modules
    print("ok")
    """
)


def test_import_and_transform_step_do_not_import_flax():
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_flax_modules_are_listed_and_cached():
    assert {"linen", "nnx"} <= set(dir(jaxstab))
    from jaxstab import linen

    assert jaxstab.linen is linen is sys.modules["jaxstab.linen"]


def test_public_names_resolve():
    for name in jaxstab.__all__:
        assert getattr(jaxstab, name) is not None, name


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'BatchNorm'"):
        jaxstab.BatchNorm  # noqa: B018
