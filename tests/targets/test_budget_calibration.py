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

from core.runtimes import RUNTIMES, RuntimeCost
from core.schemes import component_costs, cost_group, effective_head, runtime_cost

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "memory_calibration.json"


def _data() -> dict:
    return json.loads(DATA.read_text())


def _points() -> list[dict]:
    return _data()["points"]


def _schemes(p: dict) -> tuple[str | None, str | None]:
    """(linear, effective lm_head) schemes of a point, None for fp32; a heads-apart point names its head."""
    linear = None if p["scheme"] == "fp32" else p["scheme"]
    return linear, effective_head(linear, p.get("head_scheme"))


def _costs(p: dict) -> tuple[RuntimeCost, RuntimeCost]:
    return component_costs(p["runtime"], *_schemes(p))


def _group(p: dict) -> str:
    linear, head = _schemes(p)
    return cost_group(p["runtime"], linear or head)


def _predicted(p: dict) -> float:
    c, h = _costs(p)
    if p["phase"] == "load":  # a preallocated KV cache (ExecuTorch) is resident from load on
        kv = p.get("kv_at_load", 0.0) * p.get("kv_mib", 0.0)
        kv += p.get("act_at_load", 0.0) * p.get("activations_mib", 0.0)  # ExecuTorch's planned activations too
        blocks = c.load_transient_mib(p["block_weights_mib"], 0.0)
        head = h.load_transient_mib(0.0, p["head_weights_mib"])
        return p["weights_mib"] + kv + c.session_mib + blocks + head
    packed = c.run_resident_mib(p["block_weights_mib"], 0.0) + h.run_resident_mib(0.0, p["head_weights_mib"])
    again = (c.logits_copies - 1.0) * p.get("logits_mib", 0.0)  # the chunk's logits held again (onnxruntime)
    run = packed + c.kv_copies * p["kv_mib"] + p["activations_mib"] + again
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
    positions, Gemma 3 270M, the fitting benchmark's artifacts; the worst real-model point is -6.1%,
    ExecuTorch 8da4w's load at 512, onnxruntime's -5.0%, int8w at 512) or, for a model of a few MiB
    (the 0.8- and 3.5-MiB tiny Llamas), within 2 MiB.
    What is under-predicted is covered by the margin (next test). Heads-apart points are not fitted
    (two groups' constants predict them); they are held to the margin only."""
    for p in (p for p in _points() if p["runtime"] == runtime and "head_scheme" not in p):
        predicted = _predicted(p)
        err = p["measured_mib"] / predicted - 1.0
        where = f"{p['source']}/{p['model']}/{p['scheme']}/{p['context']}/{p['phase']}: {err:+.1%}"
        assert abs(err) <= 0.10 or abs(p["measured_mib"] - predicted) <= 2.0, where


@pytest.mark.parametrize("group", sorted({_group(p) for p in _points()}))
def test_prediction_margin_covers_every_real_model_point(group: str) -> None:
    """What fitting holds to the budget (the prediction + the constants' ``prediction_margin`` of the
    model's part) is at least every real model's measured peak in the data, per group of constants,
    and the margin is no larger than the group's worst under-prediction needs (rounded up to 0.1%):
    a plan that fits by the model fits by them, and fp32 is not charged int8w's misses. A heads-apart
    point (lm_head in another scheme, e.g. Gemma 3 270M's fp32 blocks + 8da8w head) is held to the
    larger of its two groups' margins, as ``targets.budget.estimate`` holds such a plan."""
    own = [p for p in _points() if _group(p) == group and "head_scheme" not in p]
    margin = runtime_cost(*_key(group)).prediction_margin
    real = [p["measured_mib"] / _predicted(p) - 1.0 for p in own if p["source"] != "tiny"]
    mixed = [p for p in _points() if "head_scheme" in p and group in {_group(p), _head_group(p)}]
    covered = [p["measured_mib"] / _predicted(p) - 1.0 for p in mixed if _cover(p) == margin]
    assert real and max(real) <= margin <= max([*real, *covered, 0.0]) + 0.0011, (group, margin, max(real))
    for p in mixed:
        assert p["measured_mib"] / _predicted(p) - 1.0 <= _cover(p), (p["source"], p["runtime"], p["phase"])
    assert _data()["prediction_margin"][group] == pytest.approx(margin), "re-run benchmarks/memory_calibration.py"


def _key(group: str) -> tuple[str, str | None]:
    runtime, _, scheme = group.partition("/")
    return runtime, scheme or None


def _head_group(p: dict) -> str:
    return cost_group(p["runtime"], _schemes(p)[1])


def _cover(p: dict) -> float:
    """The margin a point's plan is held to: the larger of its program's and its head's."""
    c, h = _costs(p)
    return max(c.prediction_margin, h.prediction_margin)


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
