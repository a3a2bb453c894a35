"""The export stage's runtimes side by side (pipeline/exporting.py): when they overlap, and that a
child that dies costs only time."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import pipeline.exporting as exporting
from core import cpus
from exporters.base import ExportConfig
from pipeline.rewrite import load_pruned
from tests.conftest import tiny_model

CFG = ExportConfig(seq_len=8, max_cache_len=64)
JOBS = [("onnxruntime", CFG), ("executorch", CFG)]


def test_overlap_needs_two_exports_two_cpus_and_the_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    monkeypatch.delenv("PRUNEFIT_SERIAL_EXPORT", raising=False)
    monkeypatch.setattr(exporting, "available_cpus", lambda: cpus.Cpus(2, "affinity"))
    monkeypatch.setattr(exporting, "_mem_available", lambda: 2**30)
    assert exporting.overlap_reason(JOBS, model) is None
    assert exporting.overlap_reason(JOBS[:1], model) == "one export to run"
    monkeypatch.setattr(exporting, "_mem_available", lambda: 1000)  # two exports' memory is not there
    assert "GiB wanted for two exports" in (exporting.overlap_reason(JOBS, model) or "")
    monkeypatch.setattr(exporting, "_mem_available", lambda: 2**30)
    monkeypatch.setattr(exporting, "available_cpus", lambda: cpus.Cpus(1, "a cgroup CPU quota of 1 CPUs"))
    assert exporting.overlap_reason(JOBS, model) == "one CPU (a cgroup CPU quota of 1 CPUs)"
    monkeypatch.setenv("PRUNEFIT_SERIAL_EXPORT", "1")
    assert exporting.overlap_reason(JOBS, model) == "PRUNEFIT_SERIAL_EXPORT is set"


def _dies(*args: object) -> None:  # the child's export, as the OOM killer would end it
    os._exit(137)


@pytest.mark.slow
def test_a_child_that_dies_is_redone_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("PRUNEFIT_SERIAL_EXPORT", raising=False)
    monkeypatch.setattr(exporting, "overlap_reason", lambda jobs, model: None)  # overlap even on one CPU
    monkeypatch.setattr(exporting, "_child_export", _dies)
    tiny_model("llama", num_hidden_layers=1).save_pretrained(tmp_path / "pruned_model")
    model = load_pruned(tmp_path / "pruned_model")
    done: dict[str, Path] = {}
    idle: list[tuple[set[str], list[str]]] = []  # (still exporting, done by then)
    with caplog.at_level(logging.WARNING, logger="pipeline.exporting"):
        exporting.run_exports(
            model, JOBS, tmp_path, lambda rt, art, wall: done.__setitem__(rt, art.path),
            lambda exporting: idle.append((exporting, list(done))),
        )  # fmt: skip
    # the work done while the child exported (the pipeline validates) came after this process's exports
    assert idle == [({"executorch"}, ["onnxruntime"])]
    assert done == {"onnxruntime": tmp_path / "model.onnx", "executorch": tmp_path / "model.pte"}
    assert all(p.is_file() for p in done.values())
    assert "the executorch export process died" in caplog.text
