"""The memory model's overhead constants against the calibration data kept in the repo.

benchmarks/memory_calibration.py collects measured model peaks (default model at several budgets,
schemes and contexts; tiny models at several widths) with the terms the memory model predicted.
The committed RUNTIME_COSTS must predict every point within +-10% (issue 6's goal), so a change to
the memory model that breaks the calibration fails here, without re-running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from targets.budget import RUNTIME_COSTS

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "memory_calibration.json"


def _points() -> list[dict]:
    return json.loads(DATA.read_text())["points"]


def test_calibration_data_cover_both_runtimes_and_both_ends() -> None:
    pts = _points()
    for rt in RUNTIME_COSTS:
        weights = [p["weights_mib"] for p in pts if p["runtime"] == rt]
        assert len(weights) >= 4, rt
        assert min(weights) < 100 < 300 < max(weights), (rt, weights)  # tiny models and the default model


@pytest.mark.parametrize("runtime", sorted(RUNTIME_COSTS))
def test_committed_costs_predict_every_point_within_10_percent(runtime: str) -> None:
    c = RUNTIME_COSTS[runtime]  # type: ignore[index]
    for p in (p for p in _points() if p["runtime"] == runtime):
        w = p["weights_mib"]
        predicted = w + p["kv_held_mib"] + p["activations_mib"] + c.session_mib + c.weight_transient_ratio * w
        err = p["measured_model_peak_mib"] / predicted - 1.0
        where = f"{p['source']}/{p['model']}/{p['scheme']}"
        got = p["measured_model_peak_mib"]
        assert abs(err) <= 0.10, f"{where}: measured {got:.1f} vs {predicted:.1f} MiB ({err:+.1%})"
