"""Issue 20: validation certifies the memory at the profile's full context. Each artifact's cache is
filled to ``context_length`` (prompt in prefill chunks, then decode steps) in its real runtime; a
context longer than ``fill_max_positions`` is filled that far and extrapolated with the measured
slope; a run killed on the way says at which position and what it needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import ProfileError
from exporters import get_exporter
from exporters.base import ExportConfig
from targets import confine
from targets.fill import FillPlan, fill_plan, line, summarize
from targets.measurement import FillPoint
from targets.validate import Validator
from tests.conftest import tiny_model
from tests.pipeline.test_prune import profile

# 8 layers x 4 KV heads x head_dim 64: 16 KiB of KV cache per position (64 MiB at 4096), ~21 MiB of weights
KV_HEAVY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=4096)  # fmt: skip


def _points(slope: float, n: int = 16, chunk: int = 64, base: float = 10.0) -> list[FillPoint]:
    pts = [FillPoint(positions=(i + 1) * chunk, kind="prefill", peak_mib=base + slope * (i + 1) * chunk,
                     rss_mib=0.0, s=float(i)) for i in range(n)]  # fmt: skip
    return [*pts, FillPoint(positions=n * chunk + 1, kind="decode", peak_mib=pts[-1].peak_mib, rss_mib=0.0, s=n)]


def test_line_fits_the_later_chunks_and_extrapolates_to_the_context() -> None:
    pts = _points(0.01)
    pts[0] = pts[0].model_copy(update={"peak_mib": 500.0})  # an early chunk under the load's peak: not fitted
    intercept, slope, used = line(pts)
    assert slope == pytest.approx(0.01) and intercept == pytest.approx(10.0) and used == 8
    plan = FillPlan(context=4096, positions=1024, mode="extrapolated")
    s = summarize(plan, pts, run_peak_mib=30.0)
    assert s.peak_at_context_mib == pytest.approx(10.0 + 0.01 * 4096)  # the line at 4096, above what was measured
    assert s.positions_filled == 1025 and s.slope_mib_per_1k == pytest.approx(10.0)
    # a load peak above the line's value at the context stays the peak
    assert summarize(plan, pts, run_peak_mib=900.0).peak_at_context_mib == 900.0
    # filled to the context: the measured peak, nothing extrapolated
    full = FillPlan(context=1025, positions=1025, mode="filled")
    assert summarize(full, pts, run_peak_mib=700.0).peak_at_context_mib == 700.0


def test_fill_plan_extrapolates_past_fill_max_positions_and_rejects_too_few_points() -> None:
    assert fill_plan(profile(100, context_length=4096)).mode == "filled"  # default limit 8192
    p = profile(100, context_length=32768, fill_max_positions=2048)
    assert fill_plan(p) == FillPlan(context=32768, positions=2048, mode="extrapolated")
    with pytest.raises((ValueError, ProfileError), match="fill_max_positions"):
        profile(100, context_length=4096, prefill_tokens=128, fill_max_positions=256)  # 2 chunks: no slope


@pytest.fixture(scope="module")
def kv_heavy(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = tiny_model("llama", **KV_HEAVY)
    out = tmp_path_factory.mktemp("fill")
    art = get_exporter("onnxruntime").export(model, ExportConfig(seq_len=64, max_cache_len=4096), out)
    return model, art.path


def _validate(kv_heavy, tmp_path: Path, budget: int, enforce: bool, **kw: object):
    model, path = kv_heavy
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    prof = profile(budget, runtimes=["onnxruntime"], context_length=4096, prefill_tokens=64, decode_tokens=4, **kw)
    return Validator(prof, model, ids, tmp_path, {}, enforce=enforce).run_all({"onnxruntime": path})


def test_extrapolated_peak_matches_the_filled_one(kv_heavy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same artifact filled to 4096 and filled to 1024 then extrapolated: the extrapolation is
    within 10% of the measurement, and the run and the report say which was done."""
    filled = _validate(kv_heavy, tmp_path / "full", 4000, enforce=False).runtimes[0]
    with caplog.at_level("WARNING", logger="targets.validate"):
        part_report = _validate(kv_heavy, tmp_path / "part", 4000, enforce=False, fill_max_positions=1024)
    assert "extrapolated from the measured slope" in caplog.text
    part = part_report.runtimes[0]
    gate = next(g for g in part_report.gates if g.name == "memory[onnxruntime]")
    assert "extrapolated from 1024 of 4096 positions" in gate.detail
    assert filled.fill is not None and part.fill is not None
    assert filled.fill.mode == "filled" and filled.fill.positions_filled == 4096
    assert part.fill.mode == "extrapolated" and part.fill.positions_filled == 1024 and part.fill.points_fitted >= 3
    measured_at_1024 = max(p.peak_mib for p in part.fill.trace)
    # the cache at 4096 is 64 MiB a copy: the peak at full context is well above what 1024 positions held
    assert filled.fill.peak_at_context_mib > measured_at_1024 + 64
    assert part.fill.peak_at_context_mib == pytest.approx(filled.fill.peak_at_context_mib, rel=0.10)
    # and the memory model's prediction for the full context is within 10% of the filled peak too
    assert filled.prediction_error == pytest.approx(0.0, abs=0.10)


def test_run_killed_while_filling_reports_the_position_and_what_it_needed(kv_heavy, tmp_path: Path) -> None:
    ok, why = confine.available()
    if not ok:
        pytest.skip(why)
    # ~21 MiB of weights load in 96 MiB; onnxruntime's cache at 4096 positions needs ~3 x 64 MiB more
    report = _validate(kv_heavy, tmp_path, 96, enforce=True)
    (killed,) = report.killed
    assert killed.fill is not None and killed.fill.killed_at is not None
    assert 64 <= killed.fill.killed_at < 4096
    mem = next(g for g in report.gates if g.name == "memory[onnxruntime]")
    assert not mem.passed and f"at {killed.fill.killed_at} of 4096 positions filled" in mem.detail
    assert mem.value > 96 + 64  # the fill's slope says it needed at least one more cache beyond the budget
