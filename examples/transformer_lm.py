"""Transformer learning-rate sweep: attention-logit growth, and what stops it.

A small decoder-only character-level GPT (Flax linen: 2 layers, width 64, 4 heads, context 64)
learns the Python standard library's own source (every machine has it; no download) with AdamW
and weight decay. As the learning rate grows, the largest pre-softmax attention logit grows by
orders of magnitude and the final loss degrades -- the attention-logit growth of Wortsman et al.
(ICLR 2024), at small scale. Each method trains over a sweep of learning rates and seeds; the
learning-rate sensitivity (mean over the sweep of final loss minus the best final loss) says how
much a method flattens that curve.

Every run is one jitted ``lax.scan``; the learning rates and seeds of a sweep are ``vmap``-ed
inputs, so each method compiles once. Add a method by adding to ``METHODS``.

    python examples/transformer_lm.py --sweep            # every method (minutes each)
    python examples/transformer_lm.py --methods AdamW "AdamW + qk_clip(100)"
    python examples/transformer_lm.py --size large --weight-decay 0 --methods AdamW

``--size large`` trains 3 layers of width 96 with 6 heads; ``--weight-decay 0`` is where the
output logits would diverge (each step also records the largest output logit and the
log-normalizer). Besides the summary, a second table gives each method's final loss per rate.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxstab
from jaxstab.adaptive import adagc, zscore_clip
from jaxstab.attention import qk_clip
from jaxstab.attention_flax import COLLECTION, dot_product_attention, max_logits
from jaxstab.guards import skip_anomalies

try:
    import _common as common
except ImportError:  # imported as examples.transformer_lm
    from examples import _common as common

import matplotlib.pyplot as plt

LAYERS, WIDTH, HEADS, CONTEXT, BATCH, VOCAB = 2, 64, 4, 64, 16, 256
# model sizes of the sweep: (layers, width, heads); head dimension 16 in both
SIZES = {"small": (LAYERS, WIDTH, HEADS), "large": (3, 96, 6)}
WARMUP_FRACTION, WEIGHT_DECAY, VAL_BATCHES = 0.1, 0.1, 16
SPIKE_NATS, SPIKE_WINDOW = 0.3, 5
SWEEP_RATES = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
# independent weight decay decays each step by what AdamW's does at this peak rate
DECAY_REFERENCE_RATE = 1e-2
DEMO_RATES = (3e-3, 3e-2, 3e-1)
# the sweep's recommendation: the flattest at both sizes without changing the model or the best loss
DEMO_METHODS = ("AdamW", "AdamW + qk_clip(30) + z-loss(1e-4)")

# --------------------------------------------------------------------------------------------
# Data: the standard library's .py files, bytes as tokens


def load_corpus(max_bytes: int = 4_000_000, val_fraction: float = 0.1):
    """``(train, val)`` uint8 arrays: the stdlib's ``.py`` files in sorted path order, joined.

    Files are read in sorted order until ``max_bytes``; the last ``val_fraction`` of the text is
    the validation set. The same Python version gives the same bytes on every machine.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )  # fmt: skip
    chunks, size = [], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    text = np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)
    split = int(len(text) * (1 - val_fraction))
    return jnp.asarray(text[:split]), jnp.asarray(text[split:])


def sample_batch(data: jax.Array, key: jax.Array, batch: int = BATCH) -> jax.Array:
    """``(batch, CONTEXT + 1)`` windows of ``data`` at random offsets."""
    starts = jax.random.randint(key, (batch,), 0, data.shape[0] - CONTEXT - 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (CONTEXT + 1,)))(starts)


# --------------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    normalize_qk: bool
    width: int
    heads: int
    attention_fn: Callable = dot_product_attention

    @nn.compact
    def __call__(self, x, mask):
        attn = nn.MultiHeadDotProductAttention(
            self.heads,
            normalize_qk=self.normalize_qk,
            attention_fn=self.attention_fn,
            name="attn",
        )
        x = x + attn(nn.LayerNorm()(x), mask=mask, sow_weights=True)
        h = nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.width)(h)


class GPT(nn.Module):
    """A pre-LayerNorm GPT over bytes; by default the lab's size, recording attention logits
    (``attention_fn``: jaxstab's recording attention; ``nn.dot_product_attention`` records none).
    """

    normalize_qk: bool = False
    layers: int = LAYERS
    width: int = WIDTH
    heads: int = HEADS
    attention_fn: Callable = dot_product_attention

    @nn.compact
    def __call__(self, tokens):
        mask = nn.make_causal_mask(tokens)
        x = nn.Embed(VOCAB, self.width)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (CONTEXT, self.width))
        for i in range(self.layers):
            block = Block(
                self.normalize_qk, self.width, self.heads, self.attention_fn, name=f"Block_{i}"
            )
            x = block(x, mask)
        return nn.Dense(VOCAB, name="head")(nn.LayerNorm()(x))


# --------------------------------------------------------------------------------------------
# Methods: name -> optimizer factory (learning-rate schedule -> optax transform), model option


class Method(NamedTuple):
    """A way to train: ``optimizer(schedule, weight_decay)`` builds the transform;
    ``independent_decay`` takes the weight decay out of it and decays by a fixed amount per step
    instead (not scaled by the peak rate); the rest changes the model or the loss:
    layer-normalized queries and keys, soft-capped attention or output logits, a z-loss term."""

    optimizer: Callable[..., optax.GradientTransformation]
    normalize_qk: bool = False
    attention_softcap: float | None = None
    output_softcap: float | None = None
    z_loss: float = 0.0
    independent_decay: bool = False

    def model(self, size: str = "small") -> GPT:
        attention = dot_product_attention
        if self.attention_softcap is not None:
            attention = functools.partial(attention, logit_softcap=self.attention_softcap)
        return GPT(self.normalize_qk, *SIZES[size], attention_fn=attention)

    def loss(self, logits, targets, *, train: bool = True):
        """Cross-entropy of the (soft-capped) logits, plus the z-loss when training."""
        if self.output_softcap is not None:
            logits = jaxstab.softcap(logits, self.output_softcap)
        loss = common.cross_entropy(logits, targets)
        return loss + jaxstab.z_loss(logits, self.z_loss) if train and self.z_loss else loss


def adamw(schedule, wd=WEIGHT_DECAY):
    return optax.adamw(schedule, b2=0.95, weight_decay=wd)


def spam(schedule, wd=WEIGHT_DECAY):
    """SPAM with AdamW's settings, its moment resets scaled to a 500-step run (the paper's
    500/150 suit long runs)."""
    return jaxstab.spam(schedule, b2=0.95, weight_decay=wd, reset_interval=250, warmup_steps=75)


def before_adamw(transform: Callable[[], optax.GradientTransformation]) -> Method:
    """A gradient transformation chained before AdamW."""
    return Method(lambda lr, wd=WEIGHT_DECAY: optax.chain(transform(), adamw(lr, wd)))


def after_adamw(transform: Callable[[], optax.GradientTransformation]) -> Method:
    """A transformation of AdamW's update, chained after it."""
    return Method(lambda lr, wd=WEIGHT_DECAY: optax.chain(adamw(lr, wd), transform()))


METHODS: dict[str, Method] = {
    "AdamW": Method(adamw),
    "AdamW + clip_by_global_norm(1)": before_adamw(lambda: jaxstab.clip_by_global_norm(1.0)),
    "AdamW + zscore_clip": before_adamw(zscore_clip),
    "skip_anomalies(AdamW)": Method(lambda lr, wd=WEIGHT_DECAY: skip_anomalies(adamw(lr, wd))),
    "AdamW + adagc": before_adamw(adagc),
    "AdamW + qk_clip(100)": after_adamw(lambda: qk_clip(100.0)),
    "AdamW + qk_clip(30)": after_adamw(lambda: qk_clip(30.0)),
    "AdamW, qk-norm model": Method(adamw, normalize_qk=True),
    # update-side stabilizers, with AdamW's hyperparameters
    "stable_adamw": Method(
        lambda lr, wd=WEIGHT_DECAY: jaxstab.stable_adamw(lr, b2=0.95, weight_decay=wd)
    ),
    "spam": Method(spam),
    "AdamW + zscore_clip on the update": after_adamw(zscore_clip),
    # the output-logit cures and Gemma 2's caps, no optimizer change
    "AdamW + z-loss(1e-4)": Method(adamw, z_loss=1e-4),
    "AdamW, soft-capped logits (50 / 30)": Method(
        adamw, attention_softcap=50.0, output_softcap=30.0
    ),
    "adam_atan2": Method(
        lambda lr, wd=WEIGHT_DECAY: jaxstab.adam_atan2(lr, b2=0.95, weight_decay=wd)
    ),
    # combinations that keep the model as it is
    "AdamW + qk_clip(10)": after_adamw(lambda: qk_clip(10.0)),
    "AdamW + qk_clip(30) + z-loss(1e-4)": after_adamw(lambda: qk_clip(30.0))._replace(
        z_loss=1e-4
    ),
    "adam_atan2 + qk_clip(30)": Method(
        lambda lr, wd=WEIGHT_DECAY: optax.chain(
            jaxstab.adam_atan2(lr, b2=0.95, weight_decay=wd), qk_clip(30.0)
        )
    ),
    "AdamW, independent weight decay": Method(adamw, independent_decay=True),
    "AdamW + qk_clip(30), independent weight decay": after_adamw(
        lambda: qk_clip(30.0)
    )._replace(independent_decay=True),
    "spam + qk_clip(30)": Method(
        lambda lr, wd=WEIGHT_DECAY: optax.chain(spam(lr, wd), qk_clip(30.0))
    ),
}


# --------------------------------------------------------------------------------------------
# Training: one compiled function per method runs the whole sweep


class Curves(NamedTuple):
    """Per-step curves of a run (NumPy arrays of length ``steps``) and its final val loss."""

    loss: np.ndarray
    grad_norm: np.ndarray  # global norm of the raw gradient
    max_logit: np.ndarray  # largest causal pre-softmax logit over layers and heads
    max_output_logit: np.ndarray  # largest output (next-byte) logit of the batch
    log_normalizer: np.ndarray  # mean over tokens of logsumexp of the output logits
    val_loss: float


def optimizer(method: Method, rate, steps: int, weight_decay: float = WEIGHT_DECAY):
    """``method``'s transform at peak learning rate ``rate``: warm-up, then cosine decay.

    With ``method.independent_decay`` the weight decay is not scaled by the peak rate (Wortsman
    et al. 2024, section 3.2.2): each step decays by what AdamW's decay is at
    ``DECAY_REFERENCE_RATE``, on the same schedule (AdamW's decoupled decay, ``weight_decay`` times
    the scheduled rate, with ``weight_decay`` divided by ``rate / DECAY_REFERENCE_RATE``).
    """
    unit = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, max(1, int(WARMUP_FRACTION * steps)), steps
    )
    schedule = lambda count: rate * unit(count)
    if method.independent_decay:
        weight_decay = weight_decay * DECAY_REFERENCE_RATE / rate
    return method.optimizer(schedule, weight_decay)


def make_sweep(method: Method, train, val, steps: int, weight_decay: float = WEIGHT_DECAY,
               size: str = "small"):  # fmt: skip
    """``sweep(rates, seeds) -> Curves`` arrays with leading axes (rates x seeds), jitted."""
    model = method.model(size)

    def loss_fn(params, tokens, train=True):
        logits, sown = model.apply({"params": params}, tokens[:, :-1], mutable=[COLLECTION])
        loss = method.loss(logits, tokens[:, 1:], train=train)
        output = (jnp.max(logits), jnp.mean(jax.nn.logsumexp(logits, axis=-1)))
        return loss, (max_logits(sown), output)

    def run(rate, seed):
        key_init, key_data = jax.random.split(jax.random.key(seed))
        params = model.init(key_init, jnp.zeros((1, CONTEXT), jnp.int32))["params"]
        tx = optax.with_extra_args_support(optimizer(method, rate, steps, weight_decay))

        def step(carry, key):
            params, opt_state = carry
            tokens = sample_batch(train, key)
            (loss, (logits, output)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, tokens
            )
            updates, opt_state = tx.update(grads, opt_state, params, max_logits=logits)
            params = optax.apply_updates(params, updates)
            top = jnp.max(jnp.stack([jnp.max(s) for s in jax.tree.leaves(logits)]))
            return (params, opt_state), (loss, jaxstab.global_norm(grads), top, *output)

        keys = jax.random.split(key_data, steps)
        (params, _), curves = jax.lax.scan(step, (params, tx.init(params)), keys)
        val_keys = jax.random.split(jax.random.key(12345), VAL_BATCHES)  # the same for all runs
        val_loss = jnp.mean(
            jax.lax.map(lambda k: loss_fn(params, sample_batch(val, k), False)[0], val_keys)
        )
        return *curves, val_loss

    grid = jax.vmap(jax.vmap(run, in_axes=(None, 0)), in_axes=(0, None))
    return jax.jit(grid)


def sweep(names: Sequence[str], rates: Sequence[float], seeds: Sequence[int], steps: int,
          *, progress: bool = True, weight_decay: float = WEIGHT_DECAY, size: str = "small",
          ) -> dict[str, list[list[Curves]]]:  # fmt: skip
    """``{method: curves[rate][seed]}`` for every method in ``names``."""
    train, val = load_corpus()
    out = {}
    for name in names:
        start = time.perf_counter()
        fn = make_sweep(METHODS[name], train, val, steps, weight_decay, size)
        arrays = fn(jnp.asarray(rates, jnp.float32), jnp.asarray(seeds, jnp.int32))
        *curves, val_loss = (np.asarray(a) for a in arrays)
        out[name] = [
            [Curves(*(c[i, j] for c in curves), float(val_loss[i, j]))
             for j in range(len(seeds))]
            for i in range(len(rates))
        ]  # fmt: skip
        if progress:
            print(f"  {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Metrics


def loss_spikes(loss: np.ndarray) -> int:
    """Spikes: times the 5-step mean loss rises more than 0.3 nats above its running minimum.

    Each excursion counts once (until the smoothed loss comes back under the threshold); a
    non-finite loss counts as one spike that never ends.
    """
    smooth = np.convolve(np.nan_to_num(loss, nan=np.inf), np.ones(SPIKE_WINDOW) / SPIKE_WINDOW,
                         mode="valid")  # fmt: skip
    above = smooth > np.minimum.accumulate(smooth) + SPIKE_NATS
    return int(np.sum(above[1:] & ~above[:-1]) + above[0])


def summarize(curves: list[list[Curves]], rates: Sequence[float], last: int = 100) -> dict:
    """One method's row: seed-averaged figures over the sweep, and its LR sensitivity."""
    final = np.array([[c.val_loss for c in per_rate] for per_rate in curves])  # rates x seeds
    final = np.where(np.isfinite(final), final, np.log(VOCAB))  # a diverged run: chance level
    mean = final.mean(axis=1)
    every = [c for per_rate in curves for c in per_rate]
    return {
        "best_loss": float(mean.min()),
        "best_rate": rates[int(mean.argmin())],
        "top_loss": float(mean[-1]),
        "sensitivity": float(np.mean(final - final.min(axis=0), axis=0).mean()),
        "spikes": sum(loss_spikes(c.loss) for c in every),
        "nonfinite": int(sum(np.sum(~np.isfinite(c.loss)) for c in every)),
        "max_grad_norm": common.nanmax(np.concatenate([c.grad_norm for c in every])),
        "max_logit": common.nanmax(np.concatenate([c.max_logit for c in every])),
        "late_logit": common.nanmax(np.concatenate([c.max_logit[-last:] for c in every])),
        "max_output_logit": common.nanmax(np.concatenate([c.max_output_logit for c in every])),
        "late_log_normalizer": common.nanmax(
            np.array([np.mean(c.log_normalizer[-last:]) for c in every])
        ),
        "final_per_rate": mean,
        "logit_per_rate": np.array([max(np.nanmax(c.max_logit) for c in r) for r in curves]),
    }


COLUMNS = [
    ("method", "method", "{}"),
    ("best_loss", "best val loss", "{:.3f}"),
    ("top_loss", "val loss at top rate", "{:.3f}"),
    ("sensitivity", "LR sensitivity", "{:.3f}"),
    ("ratio", "vs AdamW", "{:.2f}x"),
    ("spikes", "loss spikes", "{:d}"),
    ("nonfinite", "non-finite steps", "{:d}"),
    ("max_grad_norm", "max grad norm", "{:.3g}"),
    ("max_logit", "max logit", "{:.4g}"),
    ("late_logit", "max logit, last 100 steps", "{:.4g}"),
    ("max_output_logit", "max output logit", "{:.4g}"),
    ("late_log_normalizer", "log-normalizer, last 100 steps", "{:.3g}"),
]


def plot(rows: list[dict], rates: Sequence[float], title: str, path: str) -> str:
    """Final val loss and max attention logit against learning rate, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for row in rows:
        axes[0].plot(rates, row["final_per_rate"], "o-", lw=1.2, ms=4, label=row["method"])
        axes[1].plot(rates, row["logit_per_rate"], "o-", lw=1.2, ms=4)
    axes[0].set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss")
    axes[1].set(xscale="log", yscale="log", xlabel="peak learning rate",
                ylabel="max attention logit (causal)")  # fmt: skip
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3, which="both", lw=0.4)
    fig.suptitle(title)
    return common.save_figure(fig, path)


def run(
    steps: int = 500,
    seed: int = 0,
    out_dir: str = "demo_out",
    names: Sequence[str] | None = None,
    progress: bool = True,
    *,
    rates: Sequence[float] = SWEEP_RATES,
    seeds: int = 2,
    weight_decay: float = WEIGHT_DECAY,
    size: str = "small",
) -> dict:
    start = time.perf_counter()
    names = list(names or METHODS)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    results = sweep(
        names, rates, range(seed, seed + seeds), steps, progress=progress,
        weight_decay=weight_decay, size=size,
    )  # fmt: skip
    rows = [{"method": name, **summarize(curves, rates)} for name, curves in results.items()]
    base = next((r["sensitivity"] for r in rows if r["method"] == "AdamW"), None)
    for row in rows:
        row["ratio"] = row["sensitivity"] / base if base else None
    title = (
        f"Char-level GPT on the stdlib, AdamW, {steps} steps: learning-rate sweep "
        f"({seeds} seed{'s' * (seeds > 1)})"
    )
    figure = plot(rows, rates, title, os.path.join(out_dir, f"transformer_lm_{size}.png"))
    layers, width, heads = SIZES[size]
    about = (
        f"{layers} layers, width {width}, {heads} heads, context {CONTEXT}, batch {BATCH}; "
        f"AdamW (b2 0.95, weight decay {weight_decay}), warm-up {WARMUP_FRACTION:.0%} then "
        f"cosine; peak "
        f"rates {', '.join(f'{r:g}' for r in rates)}. Val loss in nats/byte, seed-averaged; "
        "LR sensitivity: mean over rates of final loss minus the best (lower is flatter); "
        f"spikes: {SPIKE_WINDOW}-step mean loss > {SPIKE_NATS} nats above its running min; "
        "max logit: the largest causal pre-softmax attention logit q.k/sqrt(d) of any step; "
        "max output logit: the largest next-byte logit of any step; log-normalizer: the mean "
        "over tokens of logsumexp of the output logits, over the last 100 steps (the largest "
        "run's; its drift is the output-logit divergence the z-loss cures)."
    )
    result = common.scenario_result(
        "transformer_lm", title, about, rows, COLUMNS, results, figure, start
    )
    return {**result, "per_rate": per_rate_table(rows, rates)}


def per_rate_table(rows: list[dict], rates: Sequence[float]) -> str:
    """Seed-averaged final val loss of each method at each rate: where its sensitivity is."""
    keys = [f"{r:g}" for r in rates]
    columns = [("method", "method", "{}")]
    columns += [(key, f"val loss at {key}", "{:.3f}") for key in keys]
    table = [
        {"method": row["method"], **dict(zip(keys, row["final_per_rate"], strict=True))}
        for row in rows
    ]
    return common.table(table, columns)


def demo(steps: int = 180, seed: int = 0, out_dir: str = "demo_out") -> dict:
    """The ``make demo`` scenario: AdamW and the recommended combination, three rates spanning
    100x, one seed."""
    return run(steps, seed, out_dir, DEMO_METHODS, progress=False, rates=DEMO_RATES, seeds=1)


def main(argv=None):
    parser = common.arg_parser(__doc__.split("\n")[0], steps=500)
    parser.add_argument("--sweep", action="store_true", help="all methods, 5 rates, 2 seeds")
    parser.add_argument("--rates", type=float, nargs="*", default=list(SWEEP_RATES))
    parser.add_argument("--seeds", type=int, default=2, help="seeds per rate")
    parser.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY,
                        help="AdamW's (and the stabilizers') decoupled weight decay")  # fmt: skip
    sizes = ", ".join(f"{name} {size}" for name, size in SIZES.items())
    parser.add_argument("--size", choices=list(SIZES), default="small",
                        help=f"(layers, width, heads): {sizes}")  # fmt: skip
    args = parser.parse_args(argv)
    names = None if args.sweep else args.methods
    result = run(args.steps, args.seed, args.out, names, rates=args.rates, seeds=args.seeds,
                 weight_decay=args.weight_decay, size=args.size)  # fmt: skip
    print(result["title"], result["about"], result["table"], result["per_rate"],
          f"plot: {result['figure']}", f"({result['seconds']:.0f} s)", sep="\n")  # fmt: skip


if __name__ == "__main__":
    main()
