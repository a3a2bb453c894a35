"""The export benchmark's paired timing (benchmarks/paired_decode.py) on tiny models: the two
artifacts really decode (each its own greedy tokens, equal to PyTorch generate) in the mode the
runtime gets (onnxruntime: two lockstep processes; ExecuTorch: one), and a server that cannot start
is a clear error, not a hang."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from core.arch import decoder_layers
from exporters import get_exporter
from exporters.base import ExportConfig
from pipeline.methods.units import prune_mlp
from targets.validate import reference_generation
from tests.conftest import tiny_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_decode.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paired_decode", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["paired_decode"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("runtime, processes", [("onnxruntime", 2), ("executorch", 1)])
def test_paired_decode_runs_both_artifacts_greedily(runtime: str, processes: int, tmp_path: Path) -> None:
    dense = tiny_model("mistral")
    pruned = tiny_model("mistral", seed=1)
    prune_mlp(decoder_layers(pruned)[1], torch.arange(0, 128, 2), None)
    cfg = ExportConfig(seq_len=16, max_cache_len=64)
    paths = [get_exporter(runtime).export(m, cfg, tmp_path / name).path for m, name in ((dense, "a"), (pruned, "b"))]
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(5))
    np.save(tmp_path / "prompt.npy", ids.numpy().astype(np.int64))

    res = _bench().paired_decode(
        (runtime, paths[0]), (runtime, paths[1]), tmp_path / "prompt.npy", threads=1, chunk=16, steps=4, repeats=2
    )

    assert res["processes"] == processes and res["steps"] == 8
    assert res["tokens_a"] == reference_generation(dense, ids, 5).tokens[0].tolist()
    assert res["tokens_b"] == reference_generation(pruned, ids, 5).tokens[0].tolist()
    assert res["tokens_a"] != res["tokens_b"]  # two different models really ran
    assert res["decode_ms_a"] > 0 and res["decode_ms_b"] > 0 and res["ratio"] > 0


def test_paired_decode_server_failure_is_an_error(tmp_path: Path) -> None:
    np.save(tmp_path / "prompt.npy", np.zeros((1, 4), np.int64))
    missing = tmp_path / "missing.onnx"
    with pytest.raises(RuntimeError, match="decode server answered"):
        _bench().RemoteStepper("onnxruntime", missing, tmp_path / "prompt.npy", threads=1, chunk=4)
