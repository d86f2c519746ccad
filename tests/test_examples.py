"""Smoke tests of the example scripts with tiny settings: the unprotected run blows up, the
protected one stays finite and learns."""

import math
import os
import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import conv_batchnorm
import deep_mlp
import demo
import exploding_rnn
import jax
import jax.numpy as jnp
import numpy as np
import recovery_batchnorm
import spike_recovery
import transformer_lm

import jaxstab


def _rows(result):
    assert os.path.getsize(result["figure"]) > 10_000  # a real PNG
    assert result["table"].count("\n") == len(result["rows"]) + 1
    return {row["method"]: row for row in result["rows"]}


def test_exploding_rnn(tmp_path):
    clip = "jaxstab.clip_by_global_norm(1)"
    result = exploding_rnn.run(60, 0, str(tmp_path), ["none", clip], progress=False)
    rows = _rows(result)
    assert rows["none"]["nonfinite"] > 0
    assert rows[clip]["nonfinite"] == 0
    assert rows[clip]["max_grad_norm"] > 1e3  # the gradient did explode
    assert rows[clip]["final_loss"] < exploding_rnn.INITIAL_LOSS  # and training went on
    assert rows[clip]["touched"] > 0


def test_deep_mlp(tmp_path):
    result = deep_mlp.run(40, 0, str(tmp_path), ["none", "clip_by_global_norm(1)"], False)
    rows = _rows(result)
    assert rows["none"]["nonfinite"] > 0
    assert rows["none"]["grad_norm0"] > 1e4
    assert rows["clip_by_global_norm(1)"]["nonfinite"] == 0
    assert rows["clip_by_global_norm(1)"]["accuracy"] > 0.3  # chance: 0.1
    layers = result["runs"]["none"].layers  # jaxstab.layer_norms, logged every step
    assert "Block_15/Dense_1" in layers and layers["head/kernel"].shape == (40,)


def test_conv_batchnorm(tmp_path):
    result = conv_batchnorm.run(60, 0, str(tmp_path), ["Batch Renorm, batch 4"], False)
    (row,) = _rows(result).values()
    assert row["nonfinite"] == 0
    assert row["online"] > 0.3 and row["offline"] > 0.3


def test_demo_with_grad_spikes(tmp_path, capsys):
    (result,) = demo.main(["--out", str(tmp_path), "--only", "grad_spikes", "--scale", "0.2"])
    rows = _rows(result)
    assert all(row["nonfinite"] == 0 for row in rows.values())
    assert rows["clean (no spikes)"]["touched"] == 0
    assert rows["none"]["accuracy"] < 0.5
    for name in ("zscore_clip", "quantile_clip(0.9)", "adagc", "skip_anomalies"):
        assert rows[name]["touched_spikes"] == "3/3", name
        assert rows[name]["accuracy"] > rows["none"]["accuracy"] + 0.2, name
    assert rows["skip_anomalies"]["touched"] < rows["clip_by_global_norm(1)"]["touched"] / 4
    summary = (tmp_path / "summary.md").read_text()
    assert result["table"] in summary and "](grad_spikes.png)" in summary
    assert "| skip_anomalies" in capsys.readouterr().out
    assert not math.isnan(rows["clean (no spikes)"]["max_loss"])


def test_transformer_lm_sweep(tmp_path):
    """Two rates 100x apart: AdamW's logits run away at the top rate, QK-Clip holds them."""
    names = ["AdamW", "AdamW + qk_clip(30)"]
    result = transformer_lm.run(40, 0, str(tmp_path), names, False, rates=(3e-3, 3e-1), seeds=1)
    rows = _rows(result)
    adamw, clipped = rows["AdamW"], rows["AdamW + qk_clip(30)"]
    assert adamw["nonfinite"] == 0 and clipped["nonfinite"] == 0
    assert adamw["best_loss"] < 0.8 * np.log(256)  # it learns (chance: log 256 nats)
    assert adamw["max_logit"] > 10 * clipped["max_logit"]
    assert adamw["ratio"] == 1.0 and clipped["sensitivity"] >= 0
    per_rate = result["per_rate"].splitlines()
    assert "val loss at 0.003" in per_rate[0] and "val loss at 0.3" in per_rate[0]
    assert f"{adamw['top_loss']:.3f}" in next(r for r in per_rate if r.startswith("| AdamW "))


@pytest.mark.parametrize("rate", [1e-2, 0.3])
def test_transformer_lm_independent_weight_decay_does_not_scale_with_the_rate(rate):
    """With zero gradients only the decay moves the weights: AdamW's grows with the peak rate,
    the independent one is AdamW's at the reference rate whatever the peak."""
    params = {"w": jnp.ones(3)}
    zeros = {"w": jnp.zeros(3)}

    def decay_after(name, rate):
        tx = transformer_lm.optimizer(transformer_lm.METHODS[name], rate, steps=100)
        state = tx.init(params)
        for _ in range(20):
            updates, state = tx.update(zeros, state, params)
        return float(updates["w"][0])

    reference = decay_after("AdamW", transformer_lm.DECAY_REFERENCE_RATE)
    independent = decay_after("AdamW, independent weight decay", rate)
    np.testing.assert_allclose(independent, reference, rtol=1e-6)
    scaled = reference * rate / transformer_lm.DECAY_REFERENCE_RATE
    np.testing.assert_allclose(decay_after("AdamW", rate), scaled, rtol=1e-5)


def test_transformer_lm_sizes_build_the_model_they_name():
    tokens = jnp.zeros((1, transformer_lm.CONTEXT), jnp.int32)
    for size, (layers, width, heads) in transformer_lm.SIZES.items():
        model = transformer_lm.METHODS["AdamW"].model(size)
        params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        assert sum(k.startswith("Block_") for k in params) == layers
        assert params["Block_0"]["attn"]["query"]["kernel"].shape == (width, heads, width // heads)


def test_transformer_lm_methods_change_the_loss_and_the_model_as_named():
    """The z-loss enters the training loss only; the caps bound what the softmaxes see while
    the raw attention logits are still recorded."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 256)) * 40, jnp.float32)
    targets = jnp.zeros((2, 5), jnp.int32)
    z = transformer_lm.METHODS["AdamW + z-loss(1e-4)"]
    plain = transformer_lm.METHODS["AdamW"].loss(logits, targets)
    np.testing.assert_allclose(
        z.loss(logits, targets), plain + jaxstab.z_loss(logits, 1e-4), rtol=1e-6
    )
    assert z.loss(logits, targets, train=False) == plain
    capped = transformer_lm.METHODS["AdamW, soft-capped logits (50 / 30)"]
    assert capped.loss(logits, targets) < plain  # logits of 40 sigma squashed to |x| < 30
    model = capped.model()
    tokens = jnp.zeros((1, transformer_lm.CONTEXT), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    params = jax.tree.map(lambda p: 8 * p, params)  # attention logits well past 50
    _, sown = model.apply({"params": params}, tokens, mutable=["attention_logits"])
    assert float(jnp.max(jnp.stack(jax.tree.leaves(sown)))) > 50.0  # raw, not capped


def test_loss_spikes_counts_excursions_once():
    loss = np.linspace(3.0, 2.0, 100)
    assert transformer_lm.loss_spikes(loss) == 0
    loss[40:50] += 1.0  # one excursion of 10 steps
    loss[70:72] += 0.2  # under 0.3 nats: noise
    assert transformer_lm.loss_spikes(loss) == 1
    loss[90:] = np.nan
    assert transformer_lm.loss_spikes(loss) == 2


def test_spike_recovery_rolls_back_over_a_burst(tmp_path):
    methods = ["clean (no burst)", "AdamW + spike_recovery"]
    result = spike_recovery.run(
        300, 0, str(tmp_path), methods, progress=False, seeds=1, burst_length=10
    )
    rows = _rows(result)
    recovered = rows["AdamW + spike_recovery"]
    assert recovered["rollbacks"] >= 1 and recovered["steps_lost"] > 0
    assert recovered["skipped_batches"] >= 10  # the loop jumped over the burst
    runs = result["runs"]["AdamW + spike_recovery"][0]
    assert len(runs["loss"]) == 300 + recovered["steps_lost"]  # lost steps were redone
    assert abs(recovered["vs_clean"]) < 10


def test_recovery_batchnorm_skips_the_nan_batch_and_rolls_back_the_burst():
    rows = {r["method"]: r for r in recovery_batchnorm.run(steps=320)["rows"]}
    recovered, plain = rows["AdamW + spike_recovery"], rows["AdamW"]
    assert recovered["skipped"] == 1 and recovered["rollbacks"] >= 1
    assert recovered["stats_finite"] == "yes"
    assert plain["accuracy"] < 0.3 < 0.9 < recovered["accuracy"]
