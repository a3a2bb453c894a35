"""The memory model's overhead constants against the calibration data kept in the repo.

benchmarks/memory_calibration.py collects measured model peaks (default model at several budgets,
schemes and contexts; tiny models at several widths) with the terms the memory model predicted.
The committed RUNTIME_COSTS are held to what they reach on that data (the default model within
+-5%, tiny models within +5/-15%), so a change to the memory model that breaks the calibration
fails here, without re-running anything.
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


def _errors(runtime: str) -> list[tuple[dict, float]]:
    c = RUNTIME_COSTS[runtime]  # type: ignore[index]
    out = []
    for p in (p for p in _points() if p["runtime"] == runtime):
        w = p["weights_mib"]
        predicted = w + p["kv_held_mib"] + p["activations_mib"] + c.loaded_overhead_mib(w)
        out.append((p, p["measured_model_peak_mib"] / predicted - 1.0))
    return out


@pytest.mark.parametrize("runtime", sorted(RUNTIME_COSTS))
def test_default_model_points_within_5_percent(runtime: str) -> None:
    """The points the pruner's decisions rest on (SmolLM2 on the shipped profiles)."""
    for p, err in _errors(runtime):
        if p["source"] != "tiny":
            assert abs(err) <= 0.05, f"{p['source']}/{p['scheme']}: {err:+.1%}"


@pytest.mark.parametrize("runtime", sorted(RUNTIME_COSTS))
def test_tiny_model_points_are_never_underpredicted(runtime: str) -> None:
    """Tiny models (vocab 512): within +5% / -15%. The goal is +-10%; ExecuTorch's tiny points sit at
    -9% to -13% (over-predicted, so the pruner errs on the safe side): one weight-proportional
    transient cannot fit both the default model, whose tied 49152 x 576 lm_head is copied while
    loading, and models whose weights are all block GEMMs (see benchmarks/results/memory_calibration.md)."""
    for p, err in _errors(runtime):
        if p["source"] == "tiny":
            assert -0.15 <= err <= 0.05, f"{p['model']}: {err:+.1%}"
