"""Emulated aarch64 validation (targets/emulate.py): the artifact runs on the target ISA under qemu-user.

The end-to-end tests build the arm64 root (debootstrap + PyPI's aarch64 wheels, ~30 s, cached in
PRUNEFIT_EMULATION_ROOT or ~/.cache) and skip with the reason when qemu-user or debootstrap is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import EmulationSkippedError
from pipeline import cli
from targets import emulate
from targets.profile import load_profile
from tests.conftest import run_tiny_pipeline
from tests.pipeline.test_pipeline import write_profile

ROOT = Path(__file__).resolve().parents[2]


def _aarch64_profile(base: Path, features: list[str], **kw: object) -> Path:
    return write_profile(
        base,
        name="arm",
        cpu={"arch": "aarch64", "cores": 2, "features": features},
        memory_budget_mib=400,
        runtimes=["onnxruntime"],
        **kw,
    )


def test_core_follows_the_profile_features(tmp_path: Path) -> None:
    assert emulate.core_for(load_profile(_aarch64_profile(tmp_path, ["neon"]))) == "cortex-a72"
    assert emulate.core_for(load_profile(_aarch64_profile(tmp_path, ["neon", "fp16", "dotprod"]))) == "cortex-a76"
    assert emulate.core_for(load_profile("rpi4")) == "cortex-a72"
    assert emulate.core_for(load_profile("rpi5")) == "cortex-a76"
    with pytest.raises(emulate.ConfigError, match="aarch64"):
        emulate.core_for(load_profile(write_profile(tmp_path)))  # an x86_64 profile


def test_cpu_files_describe_the_emulated_core(tmp_path: Path) -> None:
    root = emulate.EmulatedRoot(tmp_path)
    emulate._cpu_files(root, emulate.CORES["cortex-a72"], 4)
    info = (tmp_path / "proc" / "cpuinfo").read_text()
    assert info.count("processor\t:") == 4 and "CPU part\t: 0xd08" in info and "asimddp" not in info
    assert (tmp_path / "sys/devices/system/cpu/possible").read_text() == "0-3\n"
    emulate._cpu_files(root, emulate.CORES["cortex-a76"], 1)
    assert "asimddp" in (tmp_path / "proc" / "cpuinfo").read_text()
    assert (tmp_path / "sys/devices/system/cpu/online").read_text() == "0\n"


def test_missing_qemu_is_a_clear_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emulate.shutil, "which", lambda name: None)
    with pytest.raises(emulate.EmulationUnavailable, match="apt-get install qemu-user-static"):
        emulate.find_qemu()
    out = tmp_path / "out"
    out.mkdir()
    _aarch64_profile(tmp_path, ["neon"]).rename(out / "profile.yaml")
    # a skip checks nothing: it exits with its own code unless the user accepts it explicitly
    assert emulate.main([str(out)]) == EmulationSkippedError.exit_code == 11
    assert emulate.main([str(out), "--require"]) == EmulationSkippedError.exit_code
    assert emulate.main([str(out), "--allow-skip"]) == 0
    assert cli.main(["emulate", "--out", str(out)]) == EmulationSkippedError.exit_code
    assert cli.main(["emulate", "--out", str(out), "--allow-skip"]) == 0


def test_executorch_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(emulate.EmulationUnavailable, match="CUDA build"):
        emulate.run(emulate.EmulationConfig(tmp_path, runtime="executorch"))


def _qemu_ready() -> str | None:
    if not (shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")):
        return "qemu-user is not installed (apt-get install qemu-user-static)"
    root = emulate.EmulatedRoot(emulate.default_root_dir())
    if not root.python.is_file() and not shutil.which("debootstrap"):
        return "debootstrap is not installed to build the arm64 root (apt-get install debootstrap)"
    return None


needs_qemu = pytest.mark.skipif(_qemu_ready() is not None, reason=str(_qemu_ready()))


@pytest.mark.slow
@needs_qemu
def test_fp32_onnx_gives_the_same_tokens_on_aarch64(
    tmp_path: Path, tokenizer, wiki_valid: Path, wiki_test: Path
) -> None:
    """A Pi 4-like core (no dotprod): the aarch64 build of onnxruntime gives the local run's tokens."""
    out = run_tiny_pipeline(tmp_path, _aarch64_profile(tmp_path, ["neon"]), tokenizer, wiki_valid, wiki_test)
    proc = subprocess.run(
        [sys.executable, "-m", "targets.emulate", str(out), "--require"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS emulated[onnxruntime]" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    run = next(r for r in report["device_runs"] if r.get("emulated"))
    assert run["emulated"]["cpu"] == "cortex-a72" and run["label"].endswith("(emulated)")
    assert run["measured"]["new_tokens"] == 32 and run["measured"]["threads"] == 1
    assert run["tokens_equal_to_local_run"] is True
    assert run["max_abs_logit_diff_vs_local_run"] <= 1e-4
    assert all(g["passed"] for g in run["gates"])
    assert "emulated" in (out / "report.md").read_text()


@pytest.mark.slow
@needs_qemu
def test_quantized_onnx_on_a_dotprod_core(tmp_path: Path, tokenizer, wiki_valid: Path, wiki_test: Path) -> None:
    """int8 on a Cortex-A76 (dotprod kernels): held to top-1 agreement with the local int8 run."""
    profile = _aarch64_profile(tmp_path, ["neon", "fp16", "dotprod"], quantize={"onnxruntime": "int8"})
    out = run_tiny_pipeline(tmp_path, profile, tokenizer, wiki_valid, wiki_test)
    res = emulate.run(emulate.EmulationConfig(out))
    assert res.core == "cortex-a76"
    assert [g.name for g in res.gates] == ["emulated[onnxruntime]"]
    assert res.comparison["argmax_agreement_vs_local_run"] >= 0.85, res.comparison
    assert res.passed
