"""The healthy-run harness of benchmarks/guard_health.py, on a short run."""

from __future__ import annotations

import math

import pytest

from benchmarks import guard_health


def test_each_guard_reports_what_it_did_on_a_healthy_run():
    rows = guard_health.measure(
        "regression", 160, ["skip_anomalies", "zscore_clip", "clip_by_global_norm(1)"], [0]
    )
    by = {r["guard"]: r for r in rows}
    assert set(by) == {"adamw", "skip_anomalies", "zscore_clip", "clip_by_global_norm(1)"}
    assert all(r["finite"] for r in rows)
    # The margin (raw gradient norm over the telemetry's threshold) and the guard's own record of
    # acting are computed apart; they must agree.
    for guard in ("skip_anomalies", "zscore_clip"):
        assert (by[guard]["margin"] > 1) == (by[guard]["acted"] > 0), by[guard]
    assert by["skip_anomalies"]["acted"] == 0  # batch-4 regression: heavy-tailed, healthy
    assert by["skip_anomalies"]["vs_adamw"] == pytest.approx(0.0, abs=1e-3)
    assert by["clip_by_global_norm(1)"]["acted"] > 0  # its norms sit above 1 from the start
    assert math.isnan(by["clip_by_global_norm(1)"]["margin"])
    assert "| regression | skip_anomalies | 0 (0.00%) | - | " in guard_health.table(rows)
