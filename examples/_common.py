"""What the example scripts share: digits data, a compiled training loop, tables and plots.

The training loop runs every step of a run inside one ``jax.lax.scan`` and compiles once per
model: the methods being compared (optax transforms) are branches of a ``jax.lax.switch``, so
adding a method costs a run, not a compile. Every method sees the same batches.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import jaxstab
from jaxstab.diagnostics import layer_norms

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm.auto import tqdm

# --------------------------------------------------------------------------------------------
# Data


def load_digits(seed: int = 0, *, images: bool = False, test_fraction: float = 0.2):
    """scikit-learn's bundled 8x8 digits (no download): ``x_train, y_train, x_test, y_test``.

    Pixels are scaled to [0, 1]; ``images=True`` gives ``(n, 8, 8, 1)`` arrays, else ``(n, 64)``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = (data.images / 16.0).astype(np.float32)
    x = x[..., None] if images else x.reshape(len(x), -1)
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return jnp.asarray(x[train]), jnp.asarray(y[train]), jnp.asarray(x[test]), jnp.asarray(y[test])


def batch_sampler(x, y, batch_size: int) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """``sample(key) -> (x, y)``: a batch drawn uniformly with replacement, inside ``jit``."""

    def sample(key):
        idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
        return x[idx], y[idx]

    return sample


def cross_entropy(logits, labels) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels) -> float:
    """Share of correct predictions; a non-finite model scores like a constant guess."""
    logits = jnp.where(jnp.isfinite(logits), logits, 0.0)
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


# --------------------------------------------------------------------------------------------
# Training


class Method(NamedTuple):
    """One way to train: a name, the optax transform, which steps it "touched".

    ``touched(grad_norm) -> bool`` is for transforms without telemetry (optax's); jaxstab's
    report it themselves (``clipped``, ``skipped``, ``clip_fraction`` in their telemetry).
    """

    name: str
    tx: optax.GradientTransformation
    touched: Callable[[jax.Array], jax.Array] | None = None


class Run(NamedTuple):
    """One method's result: final parameters and model state, and per-step curves (NumPy)."""

    params: Any
    model_state: Any
    loss: np.ndarray
    grad_norm: np.ndarray  # global norm of the raw gradient, before any transform
    touched: np.ndarray  # bool: the transform clipped or skipped this step
    layers: dict[str, np.ndarray]  # jaxstab.layer_norms of the raw gradient per step, if asked

    @property
    def nonfinite_steps(self) -> int:
        return int(np.sum(~(np.isfinite(self.loss) & np.isfinite(self.grad_norm))))

    @property
    def diverged_at(self) -> int | None:
        bad = np.flatnonzero(~(np.isfinite(self.loss) & np.isfinite(self.grad_norm)))
        return int(bad[0]) if bad.size else None


def touched_by_telemetry(opt_state) -> jax.Array:
    """Whether any jaxstab transform in ``opt_state`` clipped or skipped this step."""
    flags = [jnp.zeros((), bool)]
    for key, value in jaxstab.telemetry(opt_state).items():
        field = key.rsplit("/", 1)[-1]
        if field in ("clipped", "skipped"):
            flags.append(value.astype(bool))
        elif field == "clip_fraction":
            flags.append(value > 0)
    return jnp.any(jnp.stack(flags))


def train(
    loss_fn: Callable,
    params,
    methods: Sequence[Method],
    sample: Callable[[jax.Array], Any],
    *,
    steps: int,
    seed: int,
    model_state=None,
    grad_scale: Callable[[str], np.ndarray] | None = None,
    log_layers: bool = False,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, Run]:
    """Trains a copy of ``params`` with each method; returns ``{method name: Run}``.

    Args:
      loss_fn: ``loss_fn(params, model_state, batch) -> (loss, new_model_state)``.
      params: initial parameters, shared by all methods.
      methods: the methods to compare.
      sample: ``sample(key) -> batch``, called inside the compiled loop.
      steps, seed: run length; the batches (same for every method) follow from ``seed``.
      model_state: e.g. batch-norm statistics, carried along (None if the model has none).
      grad_scale: ``grad_scale(name) -> (steps,)`` multipliers applied to the raw gradients
        (simulated bad batches); default all ones.
      log_layers: also record ``jaxstab.layer_norms`` of the raw gradient at every step.
      desc, progress: the tqdm bar.
    """
    txs = [m.tx for m in methods]

    def step(carry, inputs):
        params, model_state, opt_states, idx = carry
        key, scale = inputs
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, new_model_state), grads = grad_fn(params, model_state, sample(key))
        grads = jax.tree.map(lambda g: g * scale, grads)
        norm = jaxstab.global_norm(grads)

        def branch(i):
            def update(grads, opt_states, params):
                updates, state = txs[i].update(grads, opt_states[i], params)
                hook = methods[i].touched
                touched = touched_by_telemetry(state) if hook is None else hook(norm)
                return updates, (*opt_states[:i], state, *opt_states[i + 1 :]), touched

            return update

        branches = [branch(i) for i in range(len(txs))]
        updates, opt_states, touched = jax.lax.switch(idx, branches, grads, opt_states, params)
        params = optax.apply_updates(params, updates)
        layers = layer_norms(grads) if log_layers else {}
        return (params, new_model_state, opt_states, idx), (loss, norm, touched, layers)

    @jax.jit
    def run_all(idx, params, model_state, opt_states, keys, scales):
        carry = (params, model_state, opt_states, idx)
        (params, model_state, _, _), curves = jax.lax.scan(step, carry, (keys, scales))
        return params, model_state, curves

    opt_states = tuple(tx.init(params) for tx in txs)
    keys = jax.random.split(jax.random.key(seed), steps)
    runs = {}
    for i, method in enumerate(tqdm(methods, desc=desc, disable=not progress, leave=False)):
        scales = np.ones(steps, np.float32) if grad_scale is None else grad_scale(method.name)
        out_params, out_state, (loss, norm, touched, layers) = run_all(
            jnp.int32(i), params, model_state, opt_states, keys, jnp.asarray(scales)
        )
        curves = [np.asarray(c) for c in (loss, norm, touched)]
        layers = {k: np.asarray(v) for k, v in layers.items()}
        runs[method.name] = Run(out_params, out_state, *curves, layers)
    return runs


# --------------------------------------------------------------------------------------------
# Tables


def nanmax(x: np.ndarray) -> float:
    """Largest value ignoring NaN (Inf counts); NaN when there is nothing else."""
    x = x[~np.isnan(x)]
    return float(x.max()) if x.size else float("nan")


def _format(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return str(float(value))
    return spec.format(value)


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table of ``rows`` (dicts); ``columns`` are ``(key, header, format spec)``."""
    cells = [[header for _, header, _ in columns]]
    cells += [[_format(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(columns))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


# --------------------------------------------------------------------------------------------
# Plots


def running_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (NaN/Inf propagate: a diverged run stays diverged)."""
    if window <= 1:
        return x
    c = np.cumsum(np.concatenate([[0.0], x.astype(np.float64)]))
    out = (c[window:] - c[:-window]) / window
    return np.concatenate([np.cumsum(x[: window - 1]) / np.arange(1, window), out])


def save_figure(fig, path: str) -> str:
    """Writes ``fig`` to ``path`` (folders made as needed), closes it and returns the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(runs: dict[str, Run], title: str, path: str, *, extra: Callable | None = None) -> str:
    """Log-scale gradient norm and loss against step, one line per method; saved to ``path``.

    A run that turned non-finite is marked with an ``x`` at the step where it blew up. The loss
    axis stops a little above the runs that did not diverge; ``extra(ax)``, if given, draws a
    third panel.
    """
    n = 3 if extra else 2
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), layout="constrained")
    steps = len(next(iter(runs.values())).loss)
    window = max(1, steps // 100)
    plottable = lambda y: np.where(np.isfinite(y) & (y > 0), y, np.nan)  # log scale: y > 0
    curves = {
        name: (plottable(run.grad_norm), plottable(running_mean(run.loss, window)))
        for name, run in runs.items()
    }
    alive = [np.nanmax(c[1]) for k, c in curves.items() if runs[k].diverged_at is None]
    loss_top = 30 * max(alive) if alive and np.all(np.isfinite(alive)) else None
    for name, run in runs.items():
        at = run.diverged_at
        label = name if at is None else f"{name} (diverged at step {at})"
        for j, (ax, y) in enumerate(zip(axes, curves[name], strict=False)):
            (line,) = ax.plot(y, lw=1.0, alpha=0.85, label=label)
            if at is not None and np.any(np.isfinite(y[: at + 1])):
                peak = np.nanmax(y[: at + 1])
                if j == 1 and loss_top is not None:
                    peak = min(peak, loss_top)
                ax.plot(at, peak, "x", ms=11, mew=2.5, color=line.get_color(), clip_on=False)
    axes[0].set(yscale="log", xlabel="step", ylabel="gradient norm (raw)")
    ylabel = "training loss" + (f" (mean of {window} steps)" if window > 1 else "")
    axes[1].set(yscale="log", xlabel="step", ylabel=ylabel)
    if loss_top is not None and axes[1].get_ylim()[1] > loss_top:
        low = min(np.nanmin(c[1]) for c in curves.values() if np.any(np.isfinite(c[1])))
        axes[1].set_ylim(low / 1.5, loss_top)
    axes[0].legend(fontsize=8)
    for ax in axes[:2]:
        ax.grid(alpha=0.3, which="both", lw=0.4)
    if extra:
        extra(axes[2])
    fig.suptitle(title)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Command line


def scenario_result(name, title, about, rows, columns, runs, figure, start) -> dict:
    """What every scenario's ``run`` returns: texts, table rows, curves, plot path, seconds."""
    return {
        "name": name, "title": title, "about": about, "rows": rows, "runs": runs,
        "table": table(rows, columns), "figure": figure,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def scenario_main(run: Callable[..., dict], doc: str, *, steps: int) -> None:
    """The command line of a scenario script: parse the flags, run, print the results."""
    args = arg_parser(doc.split("\n")[0], steps=steps).parse_args()
    result = run(args.steps, args.seed, args.out, args.methods)
    print(result["title"], result["about"], result["table"], f"plot: {result['figure']}", sep="\n")


def arg_parser(description: str, *, steps: int) -> argparse.ArgumentParser:
    """The flags every example takes: ``--steps``, ``--seed``, ``--out``, ``--methods``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="training steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_out", help="folder for the plot")
    parser.add_argument("--methods", nargs="*", help="only these methods (default: all)")
    return parser


def select(methods: Sequence, names: Sequence[str] | None) -> list:
    """The methods named in ``names`` (all of them when ``names`` is None)."""
    if not names:
        return list(methods)
    known = [m.name for m in methods]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {known}")
    return [m for m in methods if m.name in names]
