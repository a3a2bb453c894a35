"""The memory model's constants against the calibration data kept in the repo.

benchmarks/memory_calibration.py collects, per validated artifact, the load peak and the run peak
at full context (the context fill's largest call) with the terms the memory model predicted: the
default model filled to 1024, 2048 and 4096 positions on both runtimes, tiny models at several
widths. The committed runtime and scheme constants (core/runtimes.py, core/schemes.py) are held to
what they reach on that data, so a change to the memory model that breaks the calibration fails
here, without re-running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.runtimes import RUNTIMES
from core.schemes import cost_group, runtime_cost

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "memory_calibration.json"


def _data() -> dict:
    return json.loads(DATA.read_text())


def _points() -> list[dict]:
    return _data()["points"]


def _predicted(p: dict) -> float:
    c = runtime_cost(p["runtime"], None if p["scheme"] == "fp32" else p["scheme"])
    if p["phase"] == "load":  # a preallocated KV cache (ExecuTorch) is resident from load on
        kv = p.get("kv_at_load", 0.0) * p.get("kv_mib", 0.0)
        transients = c.load_transient_mib(p["block_weights_mib"], p["head_weights_mib"])
        return p["weights_mib"] + kv + c.session_mib + transients
    packed = c.run_resident_mib(p["block_weights_mib"], p["head_weights_mib"])
    run = packed + c.kv_copies * p["kv_mib"] + p["activations_mib"]
    return p["weights_mib"] + c.session_mib + run


def test_calibration_data_cover_both_runtimes_both_phases_and_three_contexts() -> None:
    pts = _points()
    for rt in RUNTIMES:
        for phase in ("load", "run"):
            weights = [p["weights_mib"] for p in pts if p["runtime"] == rt and p["phase"] == phase]
            assert len(weights) >= 4, (rt, phase)
            assert min(weights) < 100 < 300 < max(weights), (rt, phase, weights)  # tiny models and the default
        runs = [p for p in pts if p["runtime"] == rt and p["phase"] == "run"]
        full = {p["context"] for p in runs if p["source"] == "full-context"}
        assert {1024, 2048, 4096} <= full, (rt, full)


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_every_point_within_10_percent(runtime: str) -> None:
    """Issues 17 and 20's goal: every point within +-10% (the default model filled to 512-4096
    positions, Gemma 3 270M, the fitting benchmark's artifacts; the worst real-model point is -7.9%,
    onnxruntime int8w at 512) or, for a model of a few MiB (the 0.8- and 3.5-MiB tiny Llamas), within 2 MiB.
    What is under-predicted is covered by the margin (next test)."""
    for p in (p for p in _points() if p["runtime"] == runtime):
        predicted = _predicted(p)
        err = p["measured_mib"] / predicted - 1.0
        where = f"{p['source']}/{p['model']}/{p['scheme']}/{p['context']}/{p['phase']}: {err:+.1%}"
        assert abs(err) <= 0.10 or abs(p["measured_mib"] - predicted) <= 2.0, where


@pytest.mark.parametrize("group", sorted({cost_group(p["runtime"], p["scheme"]) for p in _points()}))
def test_prediction_margin_covers_every_real_model_point(group: str) -> None:
    """What fitting holds to the budget (the prediction + the constants' ``prediction_margin`` of the
    model's part) is at least every real model's measured peak in the data, per group of constants,
    and the margin is no larger than the group's worst under-prediction needs (rounded up to 0.1%):
    a plan that fits by the model fits by them, and fp32 is not charged int8w's misses."""
    pts = [p for p in _points() if cost_group(p["runtime"], p["scheme"]) == group]
    margin = runtime_cost(pts[0]["runtime"], None if pts[0]["scheme"] == "fp32" else pts[0]["scheme"]).prediction_margin
    real = [p["measured_mib"] / _predicted(p) - 1.0 for p in pts if p["source"] != "tiny"]
    assert real and max(real) <= margin <= max(max(real), 0.0) + 0.0011, (group, margin, max(real))
    assert _data()["prediction_margin"][group] == pytest.approx(margin), "re-run benchmarks/memory_calibration.py"


def test_held_out_contexts_are_predicted_within_10_percent() -> None:
    """Out of sample: the constants fitted without the held-out contexts' points predict them."""
    data = _data()
    assert data["holdout_contexts"], "the committed calibration was fitted with nothing held out"
    held = [p for p in data["points"] if "holdout_error" in p]
    assert {p["runtime"] for p in held} == set(RUNTIMES)
    assert all(abs(p["holdout_error"]) <= 0.10 for p in held), [(p["runtime"], p["holdout_error"]) for p in held]


def test_committed_constants_are_the_fitted_ones() -> None:
    """The constants in core/ are the benchmark's fit (rounded), not hand-tuned beside it."""
    fitted = _data()["fit"]
    for group, f in fitted.items():
        runtime, _, scheme = group.partition("/")
        c = runtime_cost(runtime, scheme or None)  # type: ignore[arg-type]
        assert c.kv_copies == pytest.approx(f["kv_copies"], abs=0.01), group
        assert c.session_mib == pytest.approx(f["session_mib"], abs=0.5), group
