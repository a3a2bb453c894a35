"""Quantized exports: they run with their KV cache, shrink as the scheme says, stay close to fp32,
and the memory model's weight bytes follow the scheme."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ExportError
from core.schemes import SCHEME_TABLE
from exporters import get_exporter
from exporters.base import ExportConfig, artifact_size_bytes
from exporters.quantize import check_scheme, head_matmul, left_unquantized, quantize_torch
from pipeline.fit.simulate import simulated
from targets.budget import model_shape, weight_terms, weights_bytes
from targets.validate import compare_generation, reference_generation, run_artifact
from tests.conftest import QUANT_WIDE, tiny_model

# Wide enough that block weights dominate the embedding, as in a real model.
WIDE = QUANT_WIDE


@pytest.fixture(scope="module")
def wide() -> torch.nn.Module:
    return tiny_model("llama", **WIDE)


# One tiny case per scheme of core/schemes.py (tests/test_coverage.py holds this to the table): its
# runtime and the relative RMS error its prompt logits may have against fp32 (weight-only int8 is the
# closest; int4 groups are ~4x coarser than int8 channels; activation quantization adds its own).
SCHEME_CASES: dict[str, tuple[str, float]] = {
    "int8": ("onnxruntime", 0.05),
    "int8w": ("onnxruntime", 0.02),
    "int4w": ("onnxruntime", 0.35),
    "8da4w": ("executorch", 0.35),
    "8da8w": ("executorch", 0.05),
}


@pytest.mark.slow
@pytest.mark.parametrize("scheme", sorted(SCHEME_CASES))
def test_quantized_export_shrinks_runs_and_stays_close(scheme: str, wide: torch.nn.Module, tmp_path: Path) -> None:
    runtime, max_rel = SCHEME_CASES[scheme]
    fp32 = get_exporter(runtime).export(wide, ExportConfig(seq_len=8, max_cache_len=48), tmp_path / "fp32")
    q = get_exporter(runtime).export(wide, ExportConfig(seq_len=8, max_cache_len=48, quantize=scheme), tmp_path / "q")
    assert q.details["quantization"] == scheme
    shape = model_shape(wide)
    predicted = weights_bytes(shape, runtime, "fp32", scheme) / weights_bytes(shape, runtime, "fp32")
    ratio = artifact_size_bytes(q.path) / artifact_size_bytes(fp32.path)
    # the file shrinks as the memory model says it does (graph and metadata are the slack)
    assert ratio == pytest.approx(predicted, abs=0.06), (ratio, predicted)
    assert ratio < (0.3 if SCHEME_TABLE[scheme].bits == 4 else 0.4)

    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(5))
    _, got = run_artifact(runtime, q.path, ids.numpy(), tmp_path / "run", threads=1, new_tokens=4, chunk=8)
    assert got is not None
    ref = reference_generation(wide, ids, 4)
    cmp = compare_generation(got, ref)

    # random weights give flat logits, so top-1 is fragile; the logits themselves must stay close:
    # relative RMS error of the prompt's logits, int4 groups being ~4x coarser than int8 channels
    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))

    assert rel(got.prefill, ref.prefill) < max_rel
    # precision: auto prices a scheme by simulating it in PyTorch (pipeline/fit/simulate.py): the
    # simulation must lose what the artifact loses (measured ratios 0.9-1.15; ExecuTorch's exact)
    with torch.no_grad(), simulated(wide, scheme):
        sim = wide(ids, use_cache=False).logits.numpy()
    assert 0.67 < rel(sim, ref.prefill) / rel(got.prefill, ref.prefill) < 1.5
    assert np.isfinite(cmp["max_abs_logit_diff"])
    if scheme == "8da4w":  # the export computes what torchao's quantized model computes in PyTorch
        with torch.no_grad():
            qref = quantize_torch(wide, scheme)(ids, use_cache=False).logits.numpy()
        assert rel(got.prefill, qref) < 0.05


# (runtime, blocks' scheme, lm_head's scheme): the head a component of its own (quantize_head)
HEAD_CASES = [
    ("onnxruntime", "int8w", "int4w"),
    ("onnxruntime", None, "int8w"),
    ("onnxruntime", "int8", "int4w"),
    ("onnxruntime", "int4w", "fp32"),
    ("onnxruntime", "int4w", "int4w-b128"),  # a head-only row: blocks of 128
    ("executorch", "8da8w", "8da4w"),
    ("executorch", None, "8da8w"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("runtime", "blocks", "head"), HEAD_CASES)
def test_head_apart_exports_what_was_simulated_and_sized(
    runtime: str, blocks: str | None, head: str, wide: torch.nn.Module, tmp_path: Path
) -> None:
    """An lm_head in a scheme of its own: the artifact holds it so (its MatMulNBits bits, or its
    torchao Linear), its size is what the memory model counts, and the simulation the fit prices it
    by loses what the artifact loses."""
    cfg = ExportConfig(seq_len=8, max_cache_len=48, quantize=blocks, quantize_head=head)
    fp32 = get_exporter(runtime).export(wide, ExportConfig(seq_len=8, max_cache_len=48), tmp_path / "fp32")
    q = get_exporter(runtime).export(wide, cfg, tmp_path / "q")
    assert q.details["head_quantization"] == (head if head != "fp32" else "none")
    assert q.details["quantization"] == (blocks or "none")
    shape = model_shape(wide)
    terms = weight_terms(shape, runtime, "fp32", blocks, None, "onnx", head)  # type: ignore[arg-type]
    predicted = terms.total / weights_bytes(shape, runtime, "fp32")
    ratio = artifact_size_bytes(q.path) / artifact_size_bytes(fp32.path)
    assert ratio == pytest.approx(predicted, abs=0.06), (ratio, predicted)
    if runtime == "onnxruntime":  # the head's MatMul, and only it, in the head's bits
        import onnx

        model = onnx.load(str(q.path), load_external_data=False)
        lm_head = head_matmul(model)
        assert lm_head is not None
        bits = {
            n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in model.graph.node
            if n.op_type == "MatMulNBits"
        }
        blocks_of = {
            n.name: next(a.i for a in n.attribute if a.name == "block_size")
            for n in model.graph.node
            if n.op_type == "MatMulNBits"
        }
        if head != "fp32":  # the head's blocks are its scheme's (int4w-b128: 128), the blocks' theirs
            assert blocks_of[lm_head.name] == SCHEME_TABLE[head].group_size, blocks_of  # type: ignore[index]
        assert bits.pop(lm_head.name, None) == (None if head == "fp32" else SCHEME_TABLE[head].bits), bits  # type: ignore[index]
        block_bits = set(bits.values())
        spec = SCHEME_TABLE[blocks] if blocks else None  # type: ignore[index]
        assert block_bits == ({spec.bits} if spec and spec.group_size else set()), bits

    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(5))
    _, got = run_artifact(runtime, q.path, ids.numpy(), tmp_path / "run", threads=1, new_tokens=2, chunk=8)
    assert got is not None
    ref = reference_generation(wide, ids, 2)

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))

    with torch.no_grad(), simulated(wide, blocks, None, head):
        sim = wide(ids, use_cache=False).logits.numpy()
    assert 0.67 < rel(sim, ref.prefill) / rel(got.prefill, ref.prefill) < 1.5


def test_schemes_are_checked_per_runtime() -> None:
    with pytest.raises(ExportError, match="supports: int8"):
        check_scheme("onnxruntime", "8da4w")
    check_scheme("executorch", "8da8w")
    b = {name: spec.weight_bytes for name, spec in SCHEME_TABLE.items()}
    assert b["8da4w"] == b["int4w"] < b["int8"] < b["int8w"] < 4


# (linear scheme, embedding scheme) on ExecuTorch: the table alone, and with the linear weights
@pytest.mark.slow
@pytest.mark.parametrize(("linear", "table"), [(None, "int4"), ("8da8w", "int8")])
def test_quantized_embedding_export_runs_what_was_simulated(linear: str | None, table: str, tmp_path: Path) -> None:
    """The .pte gathers from its quantized table with ExecuTorch's quantized embedding kernels: it
    stores what the memory model counts, and its logits are the PyTorch model's with the simulated
    table (exactly so with fp32 linear weights; with 8da8w, as close as 8da8w alone is)."""
    from contextlib import ExitStack

    from pipeline.fit.simulate import simulated_embedding

    model = tiny_model("llama", vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    cfg = ExportConfig(seq_len=8, max_cache_len=48, quantize=linear, quantize_embedding=table)
    art = get_exporter("executorch").export(model, cfg, tmp_path / "q")
    assert art.details["embedding_quantization"] == table
    op = "embedding_4bit" if table == "int4" else "embedding_byte"
    assert any(op in name for name in art.details["undelegated_ops"]), art.details["undelegated_ops"]
    shape = model_shape(model)
    fp32 = weights_bytes(shape, "executorch", "fp32", linear)
    stored = weights_bytes(shape, "executorch", "fp32", linear, table)
    assert stored < 0.75 * fp32  # the table is most of this model
    # the program's graph and metadata on top (~64 KiB for this one)
    assert stored < artifact_size_bytes(art.path) < stored + 128 * 1024

    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(5))
    _, got = run_artifact("executorch", art.path, ids.numpy(), tmp_path / "run", threads=1, new_tokens=4, chunk=8)
    assert got is not None
    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(simulated_embedding(model, table))
        if linear:
            stack.enter_context(simulated(model, linear))
        sim = model(ids, use_cache=False).logits.numpy()
    rms = float(np.sqrt(((got.prefill - sim) ** 2).mean() / (sim**2).mean()))
    assert rms < (1e-4 if linear is None else 0.01), rms


def test_int4_groups_that_do_not_tile_stay_fp32() -> None:
    """A pruned intermediate size that is not a multiple of 32 keeps that down_proj in fp32."""
    from core.arch import decoder_layers
    from pipeline.methods.units import prune_mlp

    model = tiny_model("llama", **WIDE)
    even = weights_bytes(model_shape(model), "executorch", "fp32", "8da4w")
    prune_mlp(decoder_layers(model)[0], torch.arange(1000), None)  # 1000 % 32 != 0
    odd = weights_bytes(model_shape(model), "executorch", "fp32", "8da4w")
    # 24 channels fewer, but 256 x 1000 weights back to fp32
    assert odd > even
    # and it is named, for the export's details and the report
    assert left_unquantized(model, "8da4w") == ["model.layers.0.mlp.down_proj"]
    assert left_unquantized(model, "8da8w") == []
    from targets.markdown import _as_exported

    details = {"quantization": "8da4w", "embedding_quantization": "int8", "left_fp32": ["model.layers.0.mlp.down_proj"]}
    text = "\n".join(_as_exported({"export-executorch": {"details": details}, "prune": {"details": {}}}))
    assert "executorch: linear weights 8da4w, embedding table int8" in text
    assert "1 Linear module(s) left in fp32" in text and "`model.layers.0.mlp.down_proj`" in text
