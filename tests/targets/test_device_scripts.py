"""The on-device scripts, against fake ssh/scp/adb on PATH that run the "device" side locally.

The fakes execute the remote command the way a remote shell would (``sh -c`` on the one quoted
string ssh/adb receive), so the real runner runs on the real artifact and the merge step is real.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_tiny_pipeline
from tests.pipeline.test_pipeline import write_profile

ROOT = Path(__file__).resolve().parents[2]
SSH_SCRIPT = ROOT / "scripts" / "validate_ssh.sh"
ADB_SCRIPT = ROOT / "scripts" / "validate_android.sh"

FAKE_SSH = """#!/usr/bin/env bash
# fake ssh: log, skip options up to --, drop the host, run the one command string locally
echo "ssh $*" >> "$FAKE_LOG"
while [ "$1" != "--" ]; do shift; done; shift; shift
exec sh -c "$1"
"""
FAKE_SCP = """#!/usr/bin/env bash
# fake scp: log, skip options up to --, strip host: prefixes, copy locally
echo "scp $*" >> "$FAKE_LOG"
while [ "$1" != "--" ]; do shift; done; shift
args=(); for a in "$@"; do [ "$a" = -r ] || args+=("${a#*:}"); done
exec cp -r "${args[@]}"
"""
FAKE_ADB = """#!/usr/bin/env bash
# fake adb: log; -s SERIAL; push SRC... DST; pull SRC DST; shell CMD (one string, run locally)
echo "adb $*" >> "$FAKE_LOG"
[ "$1" = "-s" ] && shift 2
case "$1" in
  devices) printf 'List of devices attached\\nemulator-5554\\tdevice\\n' ;;
  push) shift; exec cp -r "$@" ;;
  pull) shift; exec cp "$@" ;;
  shell) shift; exec sh -c "$*" ;;
esac
"""


def _fake_bin(tmp_path: Path) -> Path:
    d = tmp_path / "fakebin"
    d.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP), ("adb", FAKE_ADB)):
        f = d / name
        f.write_text(text)
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return d


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tokenizer, wiki_valid: Path, wiki_test: Path) -> Path:
    """A finished tiny run (onnxruntime only, unpruned: generous budget)."""
    base = tmp_path_factory.mktemp("device")
    profile = write_profile(base, memory_budget_mib=400, runtimes=["onnxruntime"])
    return run_tiny_pipeline(base, profile, tokenizer, wiki_valid, wiki_test)


@pytest.fixture(scope="module")
def genai_artifacts(tmp_path_factory: pytest.TempPathFactory, tokenizer, wiki_valid: Path, wiki_test: Path) -> Path:
    """A finished tiny run with onnx_format: genai (the folder onnxruntime-genai's apps load)."""
    pytest.importorskip("onnxruntime_genai")
    base = tmp_path_factory.mktemp("device-genai")
    profile = write_profile(base, memory_budget_mib=400, runtimes=["onnxruntime"], onnx_format="genai")
    return run_tiny_pipeline(base, profile, tokenizer, wiki_valid, wiki_test)


def _env(tmp_path: Path) -> dict[str, str]:
    fake = _fake_bin(tmp_path)
    return {
        **os.environ,
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "PRUNEFIT_PYTHON": sys.executable,
    }


def test_ssh_script_runs_on_device_and_merges(artifacts: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote dir"  # a space: every argument must survive quoting
    r = subprocess.run(
        ["bash", str(SSH_SCRIPT), "--python", sys.executable, "--remote-dir", str(remote), "pi@raspberrypi",
         str(artifacts)],
        capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (remote / "runner.py").is_file() and (remote / "measure.py").is_file() and (remote / "model.onnx").is_file()
    report = json.loads((artifacts / "report.json").read_text())
    run = next(d for d in report["device_runs"] if d["label"] == "raspberrypi")
    assert run["runtime"] == "onnxruntime" and run["tokens_equal_to_local_run"] is True
    assert run["max_abs_logit_diff_vs_local_run"] < 1e-5
    assert run["measured"]["decode_tokens_per_s"] > 0 and run["measured"]["threads"] == 1
    assert "## On devices" in (artifacts / "report.md").read_text()
    calls = (tmp_path / "calls.log").read_text()
    assert "BatchMode=yes" in calls and "pi@raspberrypi" in calls


def test_ssh_dry_run_quotes_and_touches_nothing(artifacts: Path, tmp_path: Path) -> None:
    evil = "pi@host;touch PWNED"
    r = subprocess.run(
        ["bash", str(SSH_SCRIPT), "--dry-run", "--remote-dir", "/tmp/x y", evil, str(artifacts)],
        capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "calls.log").exists()  # nothing was executed
    assert not (tmp_path / "PWNED").exists()
    assert "pi@host\\;touch\\ PWNED" in r.stdout  # printf %q quoting
    assert "runner.py" in r.stdout and "targets.device merge" in r.stdout


def test_ssh_script_fails_clearly(artifacts: Path, tmp_path: Path) -> None:
    env = {**_env(tmp_path), "PRUNEFIT_SSH": "no-such-ssh"}
    r = subprocess.run(
        ["bash", str(SSH_SCRIPT), "pi@h", str(artifacts)], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 3 and "no-such-ssh is not installed" in r.stderr
    r = subprocess.run(
        ["bash", str(SSH_SCRIPT), "pi@h", str(tmp_path)], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 2 and "model.onnx is missing" in r.stderr


def test_android_script_runs_on_device_and_merges(artifacts: Path, tmp_path: Path) -> None:
    remote = tmp_path / "device tmp"
    r = subprocess.run(
        ["bash", str(ADB_SCRIPT), "--serial", "emulator-5554", "--runtime", "onnxruntime", "--python",
         sys.executable, "--remote-dir", str(remote), str(artifacts)],
        capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((artifacts / "report.json").read_text())
    run = next(d for d in report["device_runs"] if d["label"] == "emulator-5554")
    assert run["tokens_equal_to_local_run"] is True
    calls = (tmp_path / "calls.log").read_text()
    assert "adb -s emulator-5554 push" in calls


def test_android_native_runner_reports_peak(artifacts: Path, tmp_path: Path) -> None:
    """--runner: a native binary (here a stand-in that allocates ~64 MiB and reads the model) runs
    under the constant sampling loop; its peak RSS and wall time come back."""
    fake_runner = tmp_path / "runner-bin"
    fake_runner.write_text(
        f"#!{sys.executable}\nimport sys, time\nblob = bytearray(64 * 2**20)\nopen(sys.argv[1], 'rb').read()\n"
        "time.sleep(0.3)\n"
    )
    r = subprocess.run(
        ["bash", str(ADB_SCRIPT), "--serial", "pixel", "--runtime", "onnxruntime", "--runner", str(fake_runner),
         "--remote-dir", str(tmp_path / "dev"), str(artifacts), "--", "{model}"],
        capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((artifacts / "report.json").read_text())
    run = next(d for d in report["device_runs"] if d["label"] == "pixel")
    assert run["measured"]["exit_code"] == 0 and run["measured"]["wall_s"] >= 0.3
    assert 64 <= run["measured"]["model_peak_mib"] < 400


def test_android_script_without_device_fails_clearly(artifacts: Path, tmp_path: Path) -> None:
    env = {**_env(tmp_path), "PRUNEFIT_ADB": "no-such-adb"}
    r = subprocess.run(
        ["bash", str(ADB_SCRIPT), "--runtime", "onnxruntime", str(artifacts)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 3 and "no-such-adb is not installed" in r.stderr


@pytest.mark.parametrize("script", ["ssh", "adb"])
def test_scripts_push_the_genai_folder_and_run_it_with_the_generator(
    script: str, genai_artifacts: Path, tmp_path: Path
) -> None:
    """onnx_format: genai: the whole folder goes to the device (graph, data, genai_config.json,
    tokenizer), runner.py runs it through onnxruntime-genai's Generator as the local validation did,
    and the merge compares it with that local Generator run (same tokens, same logits)."""
    remote = tmp_path / "remote"
    if script == "ssh":
        cmd = ["bash", str(SSH_SCRIPT), "--python", sys.executable, "--remote-dir", str(remote), "pi@board",
               str(genai_artifacts)]  # fmt: skip
        label = "board"
    else:
        cmd = ["bash", str(ADB_SCRIPT), "--serial", "phone", "--runtime", "onnxruntime", "--python", sys.executable,
               "--remote-dir", str(remote), str(genai_artifacts)]  # fmt: skip
        label = "phone"
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    pushed = {p.name for p in (remote / "genai").iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= pushed
    assert (remote / "onnxruntime-genai_inputs.npy").is_file()
    report = json.loads((genai_artifacts / "report.json").read_text())
    run = next(d for d in report["device_runs"] if d["label"] == label)
    assert run["runtime"] == "onnxruntime" and run["backend"] == "onnxruntime-genai"
    assert run["tokens_equal_to_local_run"] is True and run["max_abs_logit_diff_vs_local_run"] < 1e-5


@pytest.mark.parametrize("mode", ["file", "mmap"])
def test_scripts_load_the_program_as_the_profile_says(artifacts: Path, tmp_path: Path, mode: str) -> None:
    """``executorch_load_mode: mmap`` reaches the device's runner as ``--no-mlock`` (the app's
    LOAD_MODE_MMAP), so the device measures what the memory model counted; ``file`` does not."""
    out = tmp_path / "run"
    shutil.copytree(artifacts, out)
    (out / "model.pte").write_bytes(b"\0")  # a dry run reads no artifact
    shutil.copy(out / "validation" / "onnxruntime_inputs.npy", out / "validation" / "executorch_inputs.npy")
    profile = yaml.safe_load((out / "profile.yaml").read_text())
    (out / "profile.yaml").write_text(yaml.safe_dump({**profile, "executorch_load_mode": mode}))
    env = _env(tmp_path)
    for script, target in ((ADB_SCRIPT, []), (SSH_SCRIPT, ["pi@raspberrypi"])):
        r = subprocess.run(
            ["bash", str(script), "--dry-run", "--runtime", "executorch", *target, str(out)],
            capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert ("--no-mlock" in r.stdout) == (mode == "mmap"), r.stdout
