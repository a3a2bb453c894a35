"""CLI error paths: each bad input is a typed error with its own exit code, a message naming the
problem and the fix, no traceback, and no half-written artifacts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import BudgetError, CalibrationError, ConfigError, ModelLoadError, ProfileError
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


def test_out_folder_named_like_the_target_is_not_a_profile(tmp_path: Path) -> None:
    """Issue 21.1: run from a folder, --out <folder>/android; creating OUT (for the log) made a
    directory named like the target, and the second resolution took it for a profile file."""
    from targets.profile import resolve_profile_path

    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "export", "--target", "android", "--model", str(tmp_path / "nope"),
         "--out", str(tmp_path / "android")],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert (tmp_path / "android" / "prunefit.log").is_file()  # OUT was created before the run went on
    assert r.returncode == ModelLoadError.exit_code, r.stderr  # the model is what is wrong, not the profile
    assert "ProfileError" not in r.stderr
    (tmp_path / "rpi5").mkdir()
    here = Path.cwd()
    try:
        import os

        os.chdir(tmp_path)
        assert resolve_profile_path("rpi5").name == "rpi5.yaml"  # the shipped profile, not ./rpi5
    finally:
        os.chdir(here)


def test_unknown_pruning_knob_fails_before_the_model_loads(tmp_path: Path) -> None:
    r = run_cli("export", "--target", "android", "--prune-set", "shortlist=3", "--model", str(tmp_path / "nope"),
                "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == ConfigError.exit_code, r.stderr
    assert "unknown key 'shortlist' for method 'comp'" in r.stderr and "min_keep_ratio" in r.stderr
    r = run_cli("export", "--target", "android", "--prune-set", "ridge", "--out", str(tmp_path / "o"))
    assert r.returncode == ConfigError.exit_code and "KEY=VALUE" in r.stderr


def test_infeasible_budget_is_found_from_the_config_alone(tmp_path: Path, make_model_dir) -> None:
    """Issue 21.2: the floor comes from shapes before any weight is read (the weights here are gone),
    and the advice names only levers that reach the budget, with the smallest budget that fits."""
    from tests.pipeline.test_pipeline import write_profile

    d = make_model_dir("llama", num_hidden_layers=8, hidden_size=256, intermediate_size=1024)
    (d / "model.safetensors").unlink()  # nothing to read but config.json and the tokenizer
    # onnxruntime alone: fp32's floor is ~18 MiB, int4w's ~13. (With ExecuTorch too, its quantized
    # programs' fitted session term, 13 MiB, puts their floor above fp32's on a model this small.)
    common = {"memory_budget_mib": 14, "runtimes": ["onnxruntime"], "runtime_overhead_mib": {"onnxruntime": 0.0}}
    profile = write_profile(tmp_path, "small", **common, pruning={"method": "comp", "headroom_mib": 0.0})
    r = run_cli("export", "--target", str(profile), "--model", str(d), "--out", str(tmp_path / "o"))
    assert r.returncode == BudgetError.exit_code, r.stderr
    msg = r.stderr
    assert "Budget infeasible" in msg and "MiB over the 14 MiB budget" in msg
    assert "memory_budget_mib: " in msg and "Nothing was pruned or exported" in msg
    assert "max_removed_layer_ratio: 0.9" not in msg  # comp keeps every block: that lever moves nothing
    assert "quantize: {" in msg  # int8 weights would reach it here: offered, with the MiB they save
    assert not list((tmp_path / "o").glob("*.safetensors")) and not (tmp_path / "o" / "profile.yaml").exists()
    # depth removes blocks: there the lever is offered when it reaches the budget
    profile = write_profile(tmp_path, "deep", **common, pruning={"method": "depth", "max_removed_layer_ratio": 0.1})
    r = run_cli("export", "--target", str(profile), "--model", str(d), "--out", str(tmp_path / "o2"))
    assert r.returncode == BudgetError.exit_code and "(max_removed_layer_ratio=0.1)" in r.stderr


def test_runtimes_flag_names_the_profiles_runtimes(tmp_path: Path, make_model_dir) -> None:
    """``--runtimes`` keeps a subset of the profile's runtimes; another name is a ProfileError that
    lists the profile's, before anything is read or written."""
    d = make_model_dir("llama")
    r = run_cli(
        "export", "--target", "android", "--model", str(d), "--out", str(tmp_path / "o"), "--runtimes", "tflite"
    )
    assert r.returncode == ProfileError.exit_code, r.stderr
    assert "--runtimes tflite" in r.stderr and "executorch, onnxruntime" in r.stderr
    assert not list((tmp_path / "o").glob("*.safetensors")) and not (tmp_path / "o" / "profile.yaml").exists()
