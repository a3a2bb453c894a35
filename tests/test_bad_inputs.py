"""Bad inputs beyond the CLI basics: each is a typed error naming the problem and the fix, and
nothing half-written is left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import exporters
from core import fsio
from core.errors import ModelLoadError, OutputError, ProfileError, RuntimeMissingError
from pipeline import cli
from pipeline.model import load_model
from targets.profile import load_profile, profiles_dir


def test_corrupt_safetensors(make_model_dir) -> None:
    d = make_model_dir("llama")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="Could not load model"):
        load_model(d)


def test_corrupt_gguf(tmp_path: Path) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(ModelLoadError, match="Could not load model"):
        load_model(f)


def test_tokenizer_that_does_not_match(make_model_dir) -> None:
    d = make_model_dir("llama", vocab_size=128)  # the tokenizer has 512 tokens
    with pytest.raises(ModelLoadError, match="does not belong to this model"):
        load_model(d)


def test_runtime_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    real = exporters.importlib.util.find_spec
    monkeypatch.setattr(
        exporters.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    code = cli.main(["export", "--target", "android", "--out", str(tmp_path / "o")])
    assert code == RuntimeMissingError.exit_code
    err = capsys.readouterr().err
    assert "'onnxruntime'" in err and "make setup" in err


def test_disk_full_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsio.os, "fsync", no_space)
    target = tmp_path / "report.json"
    with pytest.raises(OutputError, match="No space left on device"):
        fsio.atomic_write_json(target, {"a": 1})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="No space left"), fsio.atomic_dir(tmp_path / "pruned_model") as d:
        (d / "weights.bin").write_bytes(b"x" * 10)
    assert list(tmp_path.iterdir()) == []


def test_absurd_budget_in_profile(tmp_path: Path) -> None:
    data = yaml.safe_load((profiles_dir() / "android.yaml").read_text())
    data.update(name="big", memory_budget_mib=10**12)
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match="must be below ram_mib"):
        load_profile(tmp_path / "big.yaml")


_yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True), st.text(max_size=20)
)
_yaml_values = st.recursive(
    _yaml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(
        [
            "name",
            "device",
            "cpu",
            "ram_mib",
            "memory_budget_mib",
            "context_length",
            "prefill_tokens",
            "batch_size",
            "runtimes",
            "precision",
            "threads",
            "width_multiple",
            "runtime_overhead_mib",
            "pruning",
            "gates",
            "extra",
        ]
    ),
    value=_yaml_values,
)
def test_fuzzed_profile_only_raises_profile_error(tmp_path: Path, key: str, value: object) -> None:
    """Replace one key of a valid profile with arbitrary YAML data: it loads or raises ProfileError."""
    data = yaml.safe_load((profiles_dir() / "android.yaml").read_text())
    data["name"] = "fuzz"
    data[key] = value
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_profile(path)
    except ProfileError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_fuzzed_raw_text_only_raises_profile_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_profile(path)
    except ProfileError:
        pass
