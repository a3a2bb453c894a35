"""CLI error paths: each bad input is a typed error with its own exit code, a message naming the
problem and the fix, no traceback, and no half-written artifacts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import BudgetError, CalibrationError, ModelLoadError, ProfileError
from pipeline import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, check=False)


def test_profiles_lists_every_profile() -> None:
    r = run_cli("profiles")
    assert r.returncode == 0
    for name in ("android", "rpi4", "rpi5", "jetson-orin-nano"):
        assert name in r.stdout


def test_make_unknown_target_lists_valid_ones() -> None:
    r = subprocess.run(["make", "-s", "check-target", "TARGET=toaster"], capture_output=True, text=True, check=False)
    assert r.returncode != 0
    assert "Unknown TARGET 'toaster'" in r.stdout and "android" in r.stdout and "rpi5" in r.stdout


def test_unknown_target(tmp_path: Path) -> None:
    r = run_cli("export", "--target", "toaster", "--out", str(tmp_path / "o"))
    assert r.returncode == ProfileError.exit_code
    assert "Unknown target 'toaster'" in r.stderr and "android" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_model_path(tmp_path: Path) -> None:
    r = run_cli("export", "--target", "android", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == ModelLoadError.exit_code
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_non_causal_lm(tmp_path: Path) -> None:
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "bert", "architectures": ["BertForMaskedLM"]}')
    assert cli.main(["export", "--target", "android", "--model", str(d), "--out", str(tmp_path / "o")]) == (
        ModelLoadError.exit_code
    )


def test_unsupported_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    assert cli.main(["export", "--target", "android", "--model", str(d), "--out", str(tmp_path / "o")]) == (
        ModelLoadError.exit_code
    )
    assert "Unsupported architecture 'gpt2'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "expect"),
    [(b"", "is empty"), (b"\xff\xfe\x00bad", "not UTF-8"), (b"too short", "windows")],
)
def test_bad_calibration_file(tmp_path: Path, make_model_dir, content: bytes, expect: str, capsys) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    model = make_model_dir("llama")
    code = cli.main(
        ["export", "--target", "android", "--model", str(model), "--calib", str(calib), "--out", str(tmp_path / "o")]
    )
    assert code == CalibrationError.exit_code
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_missing_calibration_file_fails_before_model_load(tmp_path: Path, capsys) -> None:
    code = cli.main(
        ["export", "--target", "android", "--calib", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]
    )
    assert code == CalibrationError.exit_code
    assert "does not exist" in capsys.readouterr().err


def test_infeasible_budget_stops_before_export(tmp_path: Path, make_model_dir, wiki_valid: Path, capsys) -> None:
    import yaml

    data = yaml.safe_load(Path("device_profiles/android.yaml").read_text())
    data.update(name="tiny-phone", memory_budget_mib=1, runtime_overhead_mib={"executorch": 0.0, "onnxruntime": 0.0})
    data["pruning"]["headroom_mib"] = 0  # android's 16 MiB headroom cannot sit under a 1 MiB budget
    prof = tmp_path / "tiny-phone.yaml"
    prof.write_text(yaml.safe_dump(data))
    model = make_model_dir(
        "llama",
        num_hidden_layers=4,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    out = tmp_path / "o"
    code = cli.main(
        [
            "export",
            "--target",
            str(prof),
            "--model",
            str(model),
            "--calib",
            str(wiki_valid),
            "--eval",
            str(wiki_valid),
            "--num-samples",
            "4",
            "--eval-samples",
            "2",
            "--eval-seq-len",
            "128",
            "--out",
            str(out),
        ]
    )
    assert code == BudgetError.exit_code
    err = capsys.readouterr().err
    assert "Budget infeasible" in err and "MiB over" in err
    assert not (out / "model.onnx").exists() and not (out / "model.pte").exists()
    assert not (out / "pruned_model").exists()


def test_unwritable_output_dir(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # works as root too, unlike chmod
    code = cli.main(["export", "--target", "android", "--out", str(blocker / "sub")])
    assert code == 2
    assert "not writable" in capsys.readouterr().err


def test_context_longer_than_model_supports(tmp_path: Path, make_model_dir, capsys) -> None:
    model = make_model_dir("llama", max_position_embeddings=256)  # android asks for 1024
    code = cli.main(["export", "--target", "android", "--model", str(model), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "context_length 1024" in err and "at most 256" in err
