"""The typed report: a report.json of another schema version, or one that does not match the
schema, is refused with what to run; a valid one round-trips and re-renders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import ConfigError
from targets.gates import Gate
from targets.report import load_report, rerender, write_report
from targets.results import Report, ValidationResult


def minimal_report(validation: ValidationResult | None = None) -> Report:
    """The smallest report that renders, around ``validation`` (default: one passing memory gate)."""
    plan = {
        "method": "depth",
        "steps": [],
        "removed_layers": [],
        "kept_layers": [0],
        "params_before": 1,
        "params_after": 1,
        "wall_s": 0.0,
        "before": {"per_runtime": []},
        "after": {"per_runtime": []},
    }
    prof = {
        "name": "t",
        "device": "t",
        "cpu": {"arch": "x86_64", "features": []},
        "ram_mib": 1,
        "memory_budget_mib": 4,
        "context_length": 64,
        "prefill_tokens": 16,
        "batch_size": 1,
        "threads": 1,
        "precision": "fp32",
    }
    val = validation or ValidationResult(profile="t", gates=[Gate("memory[onnxruntime]", True, 3.0, 4.0, "fits")])
    return Report(profile=prof, prune=plan, validation=val, model="tiny", eval_source="-", calib_source="-",
                  stages={}, versions={}, artifacts={})  # fmt: skip


def test_report_round_trips_and_rerenders(tmp_path: Path) -> None:
    write_report(tmp_path, minimal_report())
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema_version"] == 3 and data["validation"]["passed"] is True
    assert load_report(tmp_path) == minimal_report()
    assert "| memory[onnxruntime] | pass | fits |" in rerender(tmp_path).read_text()


def test_other_schema_or_shape_is_refused_with_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run `prunefit export` first"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": 1, "validation": {}}))
    with pytest.raises(ConfigError, match=r"schema 1.*prunefit validate"):
        load_report(tmp_path)
    data = minimal_report().model_dump()
    data["validation"]["typo"] = 1
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="does not match the report schema"):
        load_report(tmp_path)
