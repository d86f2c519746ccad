"""Cost of recording the attention logits: jaxstab's attention_fn vs Flax's own attention.

A jitted training step (forward, backward, SGD update; params donated) of one
``flax.linen.MultiHeadDotProductAttention`` layer with a causal mask, once with Flax's
``dot_product_attention`` and once with ``jaxstab.attention_flax.dot_product_attention`` recording
each head's max logit (``sow_weights=True``, the logits returned from the step as qk_clip needs
them). Reported as a ratio, timed interleaved in one process.

Run: ``PYTHONPATH=. python benchmarks/bench_attention.py [--quick]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import _harness
from jaxstab.attention_flax import COLLECTION, dot_product_attention, max_logits

# (batch, length, features, heads): the example's GPT layer and a wider, longer one.
SHAPES = [(16, 64, 64, 4), (8, 256, 256, 8)]


def training_step(layer: nn.Module, record: bool):
    """``step(params, state, x)``: one SGD step on ``sum(y**2)``; state = last step's logits."""

    def loss(params, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        y, sown = layer.apply(
            {"params": params}, x, mask=mask, sow_weights=record, mutable=[COLLECTION]
        )
        logits = max_logits(sown) if record else jnp.zeros(())
        return jnp.mean(y**2), logits

    def step(params, state, x):
        del state
        grads, logits = jax.grad(loss, has_aux=True)(params, x)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), logits

    return jax.jit(step, donate_argnums=(0, 1))


def run(shape, reps: int) -> list[str]:
    batch, length, features, heads = shape
    x = jax.random.normal(jax.random.key(1), (batch, length, features))
    flax_layer = nn.MultiHeadDotProductAttention(heads)
    ours = nn.MultiHeadDotProductAttention(heads, attention_fn=dot_product_attention)
    params = flax_layer.init(jax.random.key(0), x)["params"]
    steps = {
        "flax": (training_step(flax_layer, False), lambda p: jnp.zeros(())),
        "jaxstab (recording)": (training_step(ours, True), lambda p: jnp.zeros((heads,))),
    }
    times, _ = _harness.time_steps(steps, params, x, reps=reps)
    ratio = times["jaxstab (recording)"] / times["flax"]
    return [
        f"{batch}x{length}, d={features}, {heads} heads",
        f"{times['flax'] * 1e3:.2f}",
        f"{times['jaxstab (recording)'] * 1e3:.2f}",
        f"{ratio:.2f}x",
    ]


def main() -> None:
    _, reps = _harness.size_from_args(__doc__.splitlines()[0])
    print("\n### Attention training step, logits recorded vs Flax's attention\n", flush=True)
    rows = [run(shape, reps * 2) for shape in SHAPES]
    header = ["batch x length, width", "flax ms/step", "jaxstab ms/step", "ratio"]
    print(_harness.markdown_table(header, rows), flush=True)


if __name__ == "__main__":
    main()
