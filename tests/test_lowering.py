"""No conditional in the GPU and TPU lowering of any public transform, guard or layer.

On a GPU, XLA runs every ``lax.cond`` by copying its predicate to the host and waiting for the
device, once per step. Each public piece is exported for ``cuda`` and ``tpu`` (which works on a
machine without either) and the conditionals left in its StableHLO are counted. The spike-recovery
controller keeps two on purpose (named below); everything else keeps none.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _lowering import conditionals

import jaxstab
from jaxstab import attention_flax

PLATFORMS = ["cuda", "tpu"]


def params_tree():
    return {
        "Dense_0": {"kernel": jnp.ones((16, 8)), "bias": jnp.ones((8,))},
        "Conv_0": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.ones((8,))},
        "attn": {
            "query": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.ones((2, 4))},
            "key": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.ones((2, 4))},
        },
        "half": jnp.ones((5, 3), jnp.bfloat16),
    }


TRANSFORMS = {
    "clip_by_global_norm": lambda: jaxstab.clip_by_global_norm(1.0),
    "adaptive_grad_clip": lambda: jaxstab.adaptive_grad_clip(0.01),
    "zscore_clip": lambda: jaxstab.zscore_clip(),
    "quantile_clip": lambda: jaxstab.quantile_clip(),
    "adagc": lambda: jaxstab.adagc(),
    "normalize_by_global_norm": lambda: jaxstab.normalize_by_global_norm(),
    "stable_adamw": lambda: jaxstab.stable_adamw(1e-3, weight_decay=0.1),
    "spam": lambda: jaxstab.spam(1e-3, count_spikes=True),
    "adam_atan2": lambda: jaxstab.adam_atan2(1e-3),
    "skip_anomalies(adam)": lambda: jaxstab.skip_anomalies(optax.adam(1e-3)),
    "skip_anomalies(chain(adaptive_grad_clip, adam))": lambda: jaxstab.skip_anomalies(
        optax.chain(jaxstab.adaptive_grad_clip(0.01), optax.adam(1e-3))
    ),
    "chain(clip_by_global_norm, adamw)": lambda: optax.chain(
        jaxstab.clip_by_global_norm(1.0), optax.adamw(1e-3)
    ),
}


count = conditionals


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_step_has_no_conditional(name, platform):
    tx = TRANSFORMS[name]()
    params = params_tree()

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    assert count(step, params, tx.init(params), params, platform=platform) == []


def test_the_counter_sees_a_conditional_and_the_cpu_form_keeps_its_rescue():
    cond = lambda x: jax.lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x)
    assert len(count(cond, jnp.ones(3), platform="cuda")) == 1
    tx = jaxstab.clip_by_global_norm(1.0)
    params = params_tree()
    assert len(count(tx.update, params, tx.init(params), platform="cpu")) == 1


@pytest.mark.parametrize("platform", PLATFORMS)
def test_qk_clip_and_the_recording_attention_have_no_conditional(platform):
    params = params_tree()
    tx = optax.chain(optax.adamw(1e-3), jaxstab.qk_clip(30.0))
    max_logits = {"attn": jnp.array([40.0, 3.0])}
    update = lambda g, s, p, m: tx.update(g, s, p, max_logits=m)
    assert count(update, params, tx.init(params), params, max_logits, platform=platform) == []
    layer = nn.MultiHeadDotProductAttention(
        num_heads=2, attention_fn=attention_flax.dot_product_attention
    )
    x = jnp.ones((2, 5, 8))
    variables = layer.init(jax.random.key(0), x)
    apply = lambda v, x: layer.apply(v, x, mutable=["intermediates"])
    assert count(apply, variables, x, platform=platform) == []


@pytest.mark.parametrize("platform", PLATFORMS)
def test_guards_and_diagnostics_have_no_conditional(platform):
    params = params_tree()
    scale = jaxstab.dynamic_loss_scale()
    adjust = lambda s, g: s.adjust(jaxstab.all_finite(g)).unscale(g)
    assert count(adjust, scale, params, platform=platform) == []
    assert count(jaxstab.global_norm, params, platform=platform) == []
    assert count(jaxstab.layer_norms, params, platform=platform) == []
    logits = jnp.ones((2, 5, 11))
    aux = lambda x: jaxstab.z_loss(jaxstab.softcap(x, 30.0))
    assert count(jax.value_and_grad(aux), logits, platform=platform) == []


@pytest.mark.parametrize("platform", PLATFORMS)
def test_batch_norm_has_no_conditional(platform):
    layer = jaxstab.linen.BatchNorm(use_running_average=False)
    x = jnp.ones((8, 4))
    variables = layer.init(jax.random.key(0), x)
    apply = lambda v, x: layer.apply(v, x, mutable=["batch_stats", jaxstab.linen.REPORT])
    assert count(apply, variables, x, platform=platform) == []


def test_spike_recovery_keeps_two_conditionals_snapshot_and_rollback():
    """Copying the whole state into the snapshot every step, or reading the snapshot back every
    step, would cost more than the two host waits: the snapshot every ``every`` steps and the
    rollback are ``lax.cond``s, and only they."""
    params = params_tree()
    tx = optax.adam(1e-3)
    recovery = jaxstab.spike_recovery(every=10)

    def train_step(state, grads):
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, jaxstab.global_norm(grads)

    state = {"params": params, "opt_state": tx.init(params)}
    rstate = recovery.init(state)
    step = recovery.wrap(train_step, jit=False)
    found = count(step, state, rstate, params, platform="cuda")
    assert len(found) == 2, found
