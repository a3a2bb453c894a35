"""kill -9 in the middle of a stage, rerun: the run completes and its artifacts equal those of an
uninterrupted run. Uses real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_model
from tests.pipeline.test_pipeline import WIDE, write_profile


def _cmd(profile: Path, model: Path, out: Path, calib: Path, evals: Path) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.cli", "export", "--target", str(profile), "--model", str(model),
        "--out", str(out), "--calib", str(calib), "--num-samples", "8", "--seq-len", "64",
        "--eval", str(evals), "--eval-samples", "4", "--eval-seq-len", "128",
    ]  # fmt: skip


def _kill_when(cmd: list[str], ready: callable, timeout: float = 300) -> None:  # type: ignore[valid-type]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"run finished (exit {proc.returncode}) before it could be killed")
            if time.monotonic() > deadline:
                pytest.fail("stage never started")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tokenizer, wiki_valid: Path, wiki_test: Path) -> tuple[Path, Path, Path]:
    """(profile, model, out) of one uninterrupted run, the reference both kill points compare with."""
    base = tmp_path_factory.mktemp("resume")
    profile = write_profile(base)
    model = base / "tiny-llama"
    tiny_model("llama", **WIDE).save_pretrained(model, safe_serialization=True)
    tokenizer.save_pretrained(model)
    clean = base / "clean"
    subprocess.run(_cmd(profile, model, clean, wiki_valid, wiki_test), check=True, capture_output=True)
    return profile, model, clean


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["prune", "export"])
def test_kill9_then_rerun_equals_uninterrupted(
    stage: str, tmp_path: Path, clean_run: tuple[Path, Path, Path], wiki_valid: Path, wiki_test: Path
) -> None:
    profile, model, clean = clean_run
    resumed = tmp_path / "resumed"

    if stage == "prune":  # killed after calibration was written, while pruning
        ready = lambda: (resumed / "calibration.safetensors").exists()  # noqa: E731
    else:  # killed after the prune stage finished, while exporting
        ready = lambda: (resumed / "manifests" / "prune.json").exists()  # noqa: E731
    _kill_when(_cmd(profile, model, resumed, wiki_valid, wiki_test), ready)
    assert not (resumed / "report.json").exists()

    r = subprocess.run(_cmd(profile, model, resumed, wiki_valid, wiki_test), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((d / "report.json").read_text()) for d in (clean, resumed))
    assert a["prune"]["removed_layers"] == b["prune"]["removed_layers"]
    assert b["stages"]["prune"]["cached"] is (stage == "export")
    assert (clean / "pruned_model" / "model.safetensors").read_bytes() == (
        resumed / "pruned_model" / "model.safetensors"
    ).read_bytes()
    for rt in ("onnxruntime", "executorch"):
        with (
            np.load(clean / "validation" / f"{rt}_generation.npz") as ga,
            np.load(resumed / "validation" / f"{rt}_generation.npz") as gb,
        ):
            np.testing.assert_allclose(ga["prefill"], gb["prefill"], atol=1e-6)
            np.testing.assert_allclose(ga["steps"], gb["steps"], atol=1e-6)
            assert (ga["tokens"] == gb["tokens"]).all()
    assert b["validation"]["passed"]
    assert not [p for p in resumed.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_source_digest_moves_with_the_code_only(tmp_path: Path) -> None:
    """A stage's key holds its package's source: an edit to it redoes the stage, an edit elsewhere does not."""
    from pipeline.manifest import source_digest

    (tmp_path / "exporters" / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "exporters" / "a.py").write_text("x = 1\n")
    (tmp_path / "exporters" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "other" / "c.py").write_text("z = 3\n")
    before = source_digest("exporters", root=tmp_path)
    assert source_digest("exporters", root=tmp_path) == before
    (tmp_path / "other" / "c.py").write_text("z = 4\n")
    assert source_digest("exporters", root=tmp_path) == before
    (tmp_path / "exporters" / "sub" / "b.py").write_text("y = 3\n")
    assert source_digest("exporters", root=tmp_path) != before
    # the real packages have sources, and distinct ones
    assert source_digest("exporters") != source_digest("pipeline") != source_digest()
