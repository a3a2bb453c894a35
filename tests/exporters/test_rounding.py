"""GPTQ rounding (exporters/rounding.py): it lands exactly on the grid the runtime's quantizer
recomputes, it moves a layer's outputs less than rounding to nearest, and the int4w artifact holds
what the fit stage simulated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core.schemes import GROUP_SIZE, SCHEME_TABLE, rounds_by_gptq
from exporters import get_exporter
from exporters.base import ExportConfig
from exporters.rounding import gptq, gptq_rounded
from pipeline.fit.simulate import SIMULATIONS, simulated
from targets.validate import run_artifact
from tests.conftest import QUANT_WIDE, tiny_model


def _correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few loud ones, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5
    x = torch.randn(n, width, generator=g) @ (torch.eye(width) + mix)
    x[:, :4] *= 8.0
    return x


def test_gptq_lands_on_the_matmulnbits_grid_and_beats_nearest() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 4 * GROUP_SIZE, generator=g)
    x = _correlated_inputs(512, w.shape[1])
    q = gptq(w, x.T @ x, bits=4, group=GROUP_SIZE)
    # the exporter's round-to-nearest (MLAS's scale: block peak / -8) maps it to itself, bit for bit
    assert torch.equal(SIMULATIONS["int4w"].weight(q), q)
    # sixteen levels at most per block, the peak on the most negative code
    blocks = q.reshape(48, -1, GROUP_SIZE)
    assert max(len(torch.unique(b)) for b in blocks.reshape(-1, GROUP_SIZE)) <= 16
    nearest = SIMULATIONS["int4w"].weight(w)

    def out_err(qw: torch.Tensor) -> float:
        return float(((x @ (w - qw).T) ** 2).mean())

    assert out_err(q) < 0.7 * out_err(nearest), (out_err(q), out_err(nearest))
    # int8 blocks too (the same grid rule)
    q8 = gptq(w, x.T @ x, bits=8, group=GROUP_SIZE)
    assert torch.equal(SIMULATIONS["int8w"].weight(q8), q8)
    # torchao's grid (8da4w: scale = max|block| / 7.5) does not map its own output to itself, so the
    # peak keeps its value as the scale's anchor: torchao's rounding of the baked weights is GPTQ's
    baked = gptq(w, x.T @ x, bits=4, group=GROUP_SIZE, grid="torchao")
    runtime = SIMULATIONS["8da4w"].weight(baked)  # bit-exact with torchao (tests/pipeline/test_fit.py)
    assert max(len(torch.unique(b)) for b in runtime.reshape(-1, GROUP_SIZE)) <= 16
    assert not torch.equal(runtime, baked)  # the anchors: off torchao's grid as stored, on it as run
    assert out_err(runtime) < 0.7 * out_err(SIMULATIONS["8da4w"].weight(w)), (out_err(runtime),)


def test_gptq_copy_leaves_the_model_and_its_tied_table() -> None:
    model = tiny_model("llama")  # tied lm_head
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    rounded = gptq_rounded(model, names, windows, bits=4, group=GROUP_SIZE)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    head, table = rounded.get_output_embeddings(), rounded.get_input_embeddings()
    assert head.weight is not table.weight  # untied in the copy: the table stays fp32
    assert torch.equal(table.weight, model.get_input_embeddings().weight)
    assert not torch.equal(head.weight, table.weight)
    assert torch.equal(SIMULATIONS["int4w"].weight(head.weight.float()), head.weight.float())
    assert rounds_by_gptq("int4w") and not rounds_by_gptq("int8w") and not rounds_by_gptq(None)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int4w", "8da4w"])
def test_int4_artifact_holds_the_simulated_gptq_rounding(scheme: str, tmp_path: Path) -> None:
    """The exported int4 weights are GPTQ's (MatMulNBits', torchao's): the artifact's logits sit on
    the simulation's, and closer to fp32 than the artifact rounded to nearest."""
    runtime = SCHEME_TABLE[scheme].runtime
    wide = tiny_model("llama", **QUANT_WIDE)
    gen = torch.Generator().manual_seed(3)
    windows = torch.randint(0, wide.config.vocab_size, (16, 32), generator=gen)
    calib = tmp_path / "calibration.safetensors"
    save_file({"calibration": windows}, str(calib))
    exporter = get_exporter(runtime)
    cfg = ExportConfig(seq_len=8, max_cache_len=48, quantize=scheme)
    gptq = exporter.export(wide, ExportConfig(**{**cfg.__dict__, "calibration": calib}), tmp_path / "gptq")
    nearest = exporter.export(wide, cfg, tmp_path / "nearest")
    ids = windows[:1, :16]
    with torch.no_grad():
        ref = wide(ids, use_cache=False).logits.numpy()
        with simulated(wide, scheme, windows):
            sim = wide(ids, use_cache=False).logits.numpy()

    def prefill(path: Path, where: str) -> np.ndarray:
        _, got = run_artifact(runtime, path, ids.numpy(), tmp_path / where, threads=1, new_tokens=1, chunk=8)
        assert got is not None
        return got.prefill

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))

    got, rtn = prefill(gptq.path, "run-gptq"), prefill(nearest.path, "run-nearest")
    assert rel(got, sim) < 0.25 * rel(got, ref), (rel(got, sim), rel(got, ref))
    assert rel(got, ref) < rel(rtn, ref), (rel(got, ref), rel(rtn, ref))
