"""The healthy/corrupted-run harness of benchmarks/recovery_health.py, on a short run."""

from __future__ import annotations

import numpy as np

from benchmarks import recovery_health


def test_a_nan_batch_is_skipped_and_nothing_is_poisoned():
    rows = recovery_health.measure(
        "batchnorm", 150, ["nan"], [0], {"every": 20, "warmup_steps": 20}
    )
    by = {(r["scenario"], r["controller"]): r for r in rows}
    recovered, plain = by["nan", "spike_recovery"], by["nan", "none"]
    assert recovered["skipped"] == 1 and recovered["rollbacks"] == 0
    assert recovered["finite"] and not plain["finite"]  # batch_stats too
    assert abs(recovered["vs_clean"]) < 2.0
    assert by["healthy", "spike_recovery"]["skipped"] == 0


def test_skip_batches_moves_the_data_position():
    work = recovery_health.WORKLOADS["regression"]()
    run = recovery_health.make_run(
        work, 60, recovery_health.jaxstab.spike_recovery(
            every=10, warmup_steps=10, patience=2, alarm_steps=2, skip_batches=7
        ),
    )  # fmt: skip
    _, (_, skipped, rolled, _), _ = run(0, (30, -1, -1, -1))
    assert int(np.sum(skipped)) == 1 and int(np.sum(rolled)) == 0
    _, (_, skipped, rolled, _), rstate = run(0, (-1, 25, 60, -1))  # a long burst
    assert int(np.sum(rolled)) >= 1 and int(rstate.rollbacks_total) >= 1
