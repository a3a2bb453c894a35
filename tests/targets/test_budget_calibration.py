"""The memory model's overhead constants against the calibration data kept in the repo.

benchmarks/memory_calibration.py collects measured model peaks (default model at several budgets,
schemes and contexts; tiny models at several widths) with the terms the memory model predicted.
The committed runtime and scheme constants (core/runtimes.py, core/schemes.py) are held to what
they reach on that data (the default model within +-5%, tiny models within +-10%), so a change to
the memory model that breaks the calibration fails here, without re-running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.runtimes import RUNTIMES
from core.schemes import runtime_cost

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "memory_calibration.json"


def _points() -> list[dict]:
    return json.loads(DATA.read_text())["points"]


def test_calibration_data_cover_both_runtimes_and_both_ends() -> None:
    pts = _points()
    for rt in RUNTIMES:
        weights = [p["weights_mib"] for p in pts if p["runtime"] == rt]
        assert len(weights) >= 4, rt
        assert min(weights) < 100 < 300 < max(weights), (rt, weights)  # tiny models and the default model


def _errors(runtime: str) -> list[tuple[dict, float]]:
    out = []
    for p in (p for p in _points() if p["runtime"] == runtime):
        c = runtime_cost(runtime, None if p["scheme"] == "fp32" else p["scheme"])  # type: ignore[arg-type]
        overhead = c.loaded_overhead_mib(p["block_weights_mib"], p["head_weights_mib"])
        predicted = p["weights_mib"] + p["kv_held_mib"] + p["activations_mib"] + overhead
        out.append((p, p["measured_model_peak_mib"] / predicted - 1.0))
    return out


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_default_model_points_within_5_percent(runtime: str) -> None:
    """The points the pruner's decisions rest on (SmolLM2 on the shipped profiles)."""
    for p, err in _errors(runtime):
        if p["source"] != "tiny":
            assert abs(err) <= 0.05, f"{p['source']}/{p['scheme']}: {err:+.1%}"


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_tiny_model_points_within_10_percent(runtime: str) -> None:
    """Tiny models (vocab 512), whose weights are almost all block GEMMs: the issue's +-10% goal.
    Before the transient was split into block and lm_head terms, ExecuTorch's tiny points sat at
    -9% to -13%."""
    for p, err in _errors(runtime):
        if p["source"] == "tiny":
            assert abs(err) <= 0.10, f"{p['model']}: {err:+.1%}"
