"""A quantized artifact's top-1 agreement is measured over the evaluation text too, not only over
the prompt: the runner saves its top-1 at every scored position, and validation compares that with
PyTorch's on the same windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporters import get_exporter
from exporters.base import ExportConfig
from targets.gates import quantized_gates
from targets.profile import load_profile
from targets.validate import (
    Generation,
    reference_generation,
    reference_top1,
    run_artifact,
    top1_agreement,
)
from tests.conftest import tiny_model


def test_artifact_top1_on_eval_windows_equals_pytorch(tmp_path: Path) -> None:
    model = tiny_model("llama")
    art = get_exporter("onnxruntime").export(model, ExportConfig(seq_len=8), tmp_path / "onnx")
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 512, (1, 12), generator=gen)
    windows = torch.randint(0, 512, (3, 24), generator=gen).numpy()
    measured, got = run_artifact(
        "onnxruntime", art.path, ids.numpy(), tmp_path / "run", threads=1, new_tokens=2, chunk=8, eval_windows=windows
    )
    assert got is not None and got.eval_top1 is not None
    assert got.eval_top1.shape == (3, 23) and got.eval_top1.dtype == np.int32
    ref_top1 = reference_top1(model, windows)
    assert np.array_equal(got.eval_top1, ref_top1)  # fp32: the same predictions everywhere
    agree, positions = top1_agreement(got, reference_generation(model, ids, 2), ref_top1)
    assert agree == 1.0 and positions == 12 + 3 * 23
    assert measured["perplexity"] > 1.0


def _gen(prompt_top: list[int], eval_top: np.ndarray | None) -> Generation:
    logits = np.eye(8, dtype=np.float32)[prompt_top][None]  # [1, prompt, vocab 8]
    return Generation(logits, np.zeros((1, 1, 8), np.float32), np.zeros((1, 1), np.int64), eval_top)


def test_agreement_pools_prompt_and_eval_positions() -> None:
    ref = _gen([1, 2, 3, 4], None)
    got = _gen([1, 2, 0, 0], np.array([[5, 5, 5, 5, 5, 5, 5, 0]], np.int32))  # prompt 2/4, eval 7/8
    ref_eval = np.full((1, 8), 5, np.int32)
    assert top1_agreement(got, ref, ref_eval) == (pytest.approx(9 / 12), 12)
    assert top1_agreement(got, ref, None) == (0.5, 4)  # no eval text: the prompt alone
    assert top1_agreement(got, ref, np.full((2, 8), 5, np.int32)) == (0.5, 4)  # other windows: not pooled


def test_agreement_gate_says_where_it_was_measured() -> None:
    profile = load_profile("android-go")
    cmp = {"argmax_agreement": 0.70, "first_token_mismatch": 3, "max_abs_logit_diff": 2.0,
           "top1_agreement": 0.86, "top1_positions": 8240, "eval_top1_agreement": 0.862}  # fmt: skip
    gate = quantized_gates(profile, "executorch", "8da8w", cmp, {})[0]
    assert gate.passed and gate.value == 0.86
    assert "over 8240 positions (prompt 70.0%, evaluation text 86.2%)" in gate.detail
    prompt_only = {k: v for k, v in cmp.items() if not k.startswith(("top1", "eval"))}
    gate = quantized_gates(profile, "executorch", "8da8w", prompt_only, {})[0]
    assert not gate.passed and "over the prompt" in gate.detail
