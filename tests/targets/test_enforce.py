"""Budget enforcement: an artifact run is confined to the model's share of the budget in a memory
cgroup; over budget it is killed by the kernel and reported as a failed gate, not a crash."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporters import get_exporter
from exporters.base import ExportConfig
from targets import confine
from targets.validate import Validator
from tests.conftest import ENFORCE_WIDE, tiny_model
from tests.pipeline.test_prune import profile

# ~95 MiB of fp32 weights: far over a 4 MiB budget even with the cgroup's slack (CGROUP_SLACK_MIB)
WIDE = ENFORCE_WIDE


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = tiny_model("llama", **WIDE)
    out = tmp_path_factory.mktemp("enforce")
    art = get_exporter("onnxruntime").export(model, ExportConfig(seq_len=16), out)
    return model, art.path


def _run(exported, budget: int, tmp_path: Path):
    model, path = exported
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    prof = profile(budget, runtimes=["onnxruntime"], context_length=64, prefill_tokens=16)
    return Validator(prof, model, ids, tmp_path, {}, enforce=True).run_all({"onnxruntime": path})


def test_over_budget_run_is_killed_and_reported(exported, tmp_path: Path) -> None:
    ok, why = confine.available()
    if not ok:
        pytest.skip(why)
    # the weights alone are ~95 MiB in fp32; a 4 MiB budget (+ the cgroup slack) cannot hold them
    report = _run(exported, 4, tmp_path)
    mem = next(g for g in report.gates if g.name == "memory[onnxruntime]")
    assert not mem.passed and "killed by the kernel" in mem.detail
    assert report.runtimes == []  # no measured row for a run that did not finish
    assert not report.passed
    # issue 21.6: the gate's value is what the run needed at least (its share, the slack, the rest of
    # the budget: more than the budget), the report has a row for it, and the gates it could not
    # check say so with no threshold
    assert mem.value > 4 and mem.threshold == 4.0
    (killed,) = report.killed
    assert killed.runtime == "onnxruntime" and killed.model_share_mib <= 4 < killed.cgroup_limit_mib
    assert killed.fill is None  # killed while loading: no position filled
    for g in report.gates:
        if g.name != "memory[onnxruntime]":
            assert g.threshold is None and "not checked" in g.detail
    from targets.markdown import render_markdown
    from tests.targets.test_report import minimal_report

    row = next(line for line in render_markdown(minimal_report(report)).splitlines() if "killed" in line)
    assert "onnxruntime" in row and "cgroup limit" in row


def test_within_budget_run_is_confined_and_passes(exported, tmp_path: Path) -> None:
    ok, why = confine.available()
    if not ok:
        pytest.skip(why)
    report = _run(exported, 400, tmp_path)
    rt = report.runtimes[0]
    assert rt.measured["confined"] and not rt.measured["oom_killed"]
    assert rt.measured["cgroup_peak_mib"] <= rt.measured["cgroup_limit_mib"]
    assert report.passed, [g.detail for g in report.gates if not g.passed]


def test_page_cache_at_the_limit_is_reclaimed_and_reported_not_killed(tmp_path: Path) -> None:
    """Issue 21.6: a run whose cgroup peak read exactly its limit without being killed. Reading a
    file larger than the limit fills the group's page cache to the limit; the kernel reclaims it
    instead of killing, and the run says how often it hit the limit."""
    ok, why = confine.available()
    if not ok:
        pytest.skip(why)
    big = tmp_path / "weights.bin"
    with big.open("wb") as fh:
        for _ in range(96):
            fh.write(b"\1" * 2**20)
    from targets.validate import _evict_from_page_cache

    _evict_from_page_cache(big)  # cached by this process, its pages would be free for the run
    run = confine.run_confined(["sh", "-c", f"cat '{big}' > /dev/null"], 32.0, timeout=60)
    assert run.returncode == 0 and not run.oom_killed
    assert run.peak_mib == pytest.approx(32.0, abs=1.0) and run.at_limit  # at the limit, really
    assert run.limit_hits is not None  # counted (v2: > 0; cgroup v1 often reclaims without counting)
    # well under its limit, a run is not reported as held there
    assert not confine.run_confined(["true"], 32.0, timeout=60).at_limit
    from targets.markdown import _at_limit

    rt = {"runtime": "onnxruntime", "measured": {"cgroup_limit_mib": 32.0, "cgroup_limit_hits": run.limit_hits,
                                                 "cgroup_at_limit": run.at_limit, "model_peak_mib": 5.0}}  # fmt: skip
    (note,) = [line for line in _at_limit([rt]) if line]
    assert "held at its cgroup limit" in note and "Not killed" in note and "5.0" in note
