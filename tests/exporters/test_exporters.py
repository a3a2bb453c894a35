"""Both exporters on tiny models: the artifact runs in its real runtime, in a child process, and
matches PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporters import available_exporters, get_exporter
from exporters.base import ExportConfig, artifact_size_bytes
from pipeline.errors import ExportError
from pipeline.rewrite import remove_layers
from targets.validate import run_artifact
from tests.conftest import tiny_model


def test_registry_fails_loudly() -> None:
    assert available_exporters() == ["executorch", "onnxruntime"]
    with pytest.raises(ExportError, match="Available: executorch, onnxruntime"):
        get_exporter("tflite")


@pytest.mark.parametrize("runtime", ["onnxruntime", "executorch"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_export_runs_and_matches_pytorch(runtime: str, arch: str, tmp_path: Path) -> None:
    model = tiny_model(arch)
    remove_layers(model, [2])  # export the pruned shape, as the pipeline does
    cfg = ExportConfig(seq_len=16)
    art = get_exporter(runtime).export(model, cfg, tmp_path)
    assert art.path.is_file() and art.size_bytes == artifact_size_bytes(art.path) > 0
    assert not list(tmp_path.glob(".*"))  # no temp files or dirs left behind
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3))
    measured, logits = run_artifact(runtime, art.path, ids.numpy(), tmp_path / "run", threads=1)
    ref = model(ids, use_cache=False).logits.numpy()
    assert logits.shape == ref.shape
    assert float(np.abs(logits - ref).max()) <= 1e-4
    assert (logits.argmax(-1) == ref.argmax(-1)).all()
    assert 0 < measured["model_peak_mib"] < 200
    assert measured["forward_s"] > 0
    if runtime == "executorch":
        assert art.static_shape == (1, 16)
        assert art.details["delegate_calls"] > 0


def test_onnx_dynamic_sequence(tmp_path: Path) -> None:
    """The ONNX artifact takes other batch sizes and lengths than it was traced with."""
    model = tiny_model("llama")
    art = get_exporter("onnxruntime").export(model, ExportConfig(seq_len=16), tmp_path)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    _, logits = run_artifact("onnxruntime", art.path, ids.numpy(), tmp_path / "run", threads=1)
    assert float(np.abs(logits - model(ids, use_cache=False).logits.numpy()).max()) <= 1e-4
