"""onnx_format: genai (issue 18): onnxruntime-genai's builder, hooked for pruned shapes, writes a folder
that both an ORT session and the GenAI Generator run like PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.arch import arch_for, head_dim
from core.errors import ExportError
from exporters import get_exporter
from exporters.base import ExportConfig
from exporters.genai import BUILDERS
from targets.validate import compare_generation, reference_generation, run_artifact
from tests.conftest import make_tokenizer, tiny_model
from tests.exporters.test_exporters import heterogeneous

pytest.importorskip("onnxruntime_genai")


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tok"
    make_tokenizer().save_pretrained(path)
    return path


def _cfg(tokenizer_dir: Path, **kw: object) -> ExportConfig:
    return ExportConfig(seq_len=8, max_cache_len=64, onnx_format="genai", tokenizer_dir=tokenizer_dir, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_genai_folder_runs_in_a_session_and_the_generator_like_pytorch(
    arch: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    """Per-layer KV heads and MLP widths survive the builder (its three hooks): the graph declares
    each layer's KV heads, genai_config.json and the tokenizer ship beside it, and a 20-token prompt
    (chunks of 8) + 6 greedy steps give PyTorch's logits (1e-4) and tokens in an ORT session and in
    onnxruntime-genai's Generator (shared past/present buffer). Gemma 3 (sliding window 16 < 20 + 6
    positions) goes through the builder's windowed cache, which only the Generator manages (an ORT
    session is refused with the reason)."""
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0} if arch == "phi3" else {}  # Phi-3's: 32000
    model = heterogeneous(arch, **special).eval()
    art = get_exporter("onnxruntime").export(model, _cfg(tokenizer_dir), tmp_path / "out")
    folder = tmp_path / "out" / "genai"
    assert art.path == folder / "model.onnx"
    assert {"genai_config.json", "tokenizer.json", "model.onnx", "model.onnx.data"} <= set(art.details["files"])
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp dirs left
    genai = json.loads((folder / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 3
    assert genai["search"]["max_length"] == 64 and genai["search"]["past_present_share_buffer"]
    kv = [1, 2, 2] if arch_for(arch).per_layer_heads else [2, 2, 2]
    assert art.details["kv_heads"] == kv
    import onnxruntime as ort

    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    heads = [i.shape[1] for i in sess.get_inputs() if i.name.endswith(".key") and i.name.startswith("past")]
    assert heads == kv
    ops = {n.op_type for n in __import__("onnx").load(str(art.path), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(3))
    ref = reference_generation(model, ids, 6)
    for runner in ("onnxruntime", "onnxruntime-genai") if arch != "gemma3_text" else ("onnxruntime-genai",):
        _, got = run_artifact(runner, art.path, ids.numpy(), tmp_path / runner, threads=1, new_tokens=6, chunk=8)  # type: ignore[arg-type]
        assert got is not None
        cmp = compare_generation(got, ref)
        assert cmp["tokens_equal"] and cmp["max_abs_logit_diff"] <= 1e-4, (runner, cmp)


def test_genai_refuses_what_it_cannot_represent(tokenizer_dir: Path, tmp_path: Path) -> None:
    """A shape or scheme the format cannot hold is an ExportError naming it, before any file."""
    model = tiny_model("llama")
    with pytest.raises(ExportError, match="quantized embedding"):
        get_exporter("onnxruntime").export(model, _cfg(tokenizer_dir, quantize_embedding="int8"), tmp_path / "a")
    with pytest.raises(ExportError, match="tokenizer"):
        get_exporter("onnxruntime").export(model, ExportConfig(seq_len=8, onnx_format="genai"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("scheme", [None, "int8w", "int4w"])
def test_memory_model_counts_the_tables_the_builder_writes(
    scheme: str | None, tokenizer_dir: Path, tmp_path: Path
) -> None:
    """The memory model's GenAI weight terms against the initializers the builder writes for a tied
    model: int4 gathers from the head's codes (one table, GatherBlockQuantized); int8 keeps an fp32
    table beside the int8 head (the builder's Gather takes 4-bit codes only); fp32 stores the head's
    table once and the session folds a transposed copy for the gather (counted resident). The rotary
    tables are built for the profile's context, not the model's (64 of 512 positions here)."""
    import onnx
    from onnx import numpy_helper

    from targets.budget import genai_weight_terms, model_shape

    model = tiny_model("llama").eval()
    assert model.config.tie_word_embeddings and model.config.max_position_embeddings > 64
    art = get_exporter("onnxruntime").export(model, _cfg(tokenizer_dir, quantize=scheme), tmp_path / "out")
    graph = onnx.load(str(art.path)).graph
    stored = {i.name: numpy_helper.to_array(i).nbytes for i in graph.initializer}
    rotary = {k: v for k, v in stored.items() if "cos_cache" in k or "sin_cache" in k}
    half = head_dim(model.config) // 2
    assert rotary and all(v == 64 * half * 4 for v in rotary.values()), rotary
    weights = sum(v for k, v in stored.items() if k not in rotary)
    terms = genai_weight_terms(model_shape(model), "fp32", scheme)
    table = model.config.vocab_size * model.config.hidden_size * 4
    ops = {n.op_type for n in graph.node}
    if scheme == "int4w":
        assert "GatherBlockQuantized" in ops and terms.embedding == 0
    else:
        assert "GatherBlockQuantized" not in ops and terms.embedding == table
    folded = table if scheme is None else 0  # resident at run time, not stored
    assert abs(terms.total - folded - weights) <= 0.02 * weights, (terms, weights)
