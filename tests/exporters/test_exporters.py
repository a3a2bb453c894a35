"""Both exporters on tiny models with per-layer widths: the artifact generates in its real runtime,
in a child process, with its KV cache, token by token like PyTorch generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.arch import arch_for, decoder_layers, head_dim
from core.errors import ExportError
from exporters import available_exporters, get_exporter
from exporters.base import ExportConfig, artifact_size_bytes
from pipeline.methods.units import prune_kv_groups, prune_mlp, remove_layers
from targets.validate import compare_generation, reference_generation, run_artifact
from tests.conftest import TINY_CONFIGS, tiny_model


def test_registry_fails_loudly() -> None:
    assert available_exporters() == ["executorch", "onnxruntime"]
    with pytest.raises(ExportError, match="Available: executorch, onnxruntime"):
        get_exporter("tflite")


def heterogeneous(arch: str, **overrides: object) -> torch.nn.Module:
    """A pruned shape with per-layer widths: a block removed, one layer with a KV group fewer
    (where the architecture allows per-layer heads), one with a narrower MLP."""
    model = tiny_model(arch, **overrides)
    remove_layers(model, [2])
    layers = decoder_layers(model)
    if arch_for(arch).per_layer_heads:
        prune_kv_groups(layers[0], torch.tensor([1]), head_dim(model.config), None)
    prune_mlp(layers[1], torch.arange(0, 128, 2), None)
    return model


def _generate(runtime: str, model: torch.nn.Module, cfg: ExportConfig, ids: torch.Tensor, tmp_path: Path) -> dict:
    art = get_exporter(runtime).export(model, cfg, tmp_path)
    assert art.path.is_file() and art.size_bytes == artifact_size_bytes(art.path) > 0
    assert not list(tmp_path.glob(".*"))  # no temp files or dirs left behind
    measured, got = run_artifact(runtime, art.path, ids.numpy(), tmp_path / "run", threads=1, new_tokens=6)
    assert got is not None
    cmp = compare_generation(got, reference_generation(model, ids, 6))
    assert cmp["tokens_equal"], cmp
    assert cmp["max_abs_logit_diff"] <= 1e-4 and cmp["argmax_agreement"] == 1.0, cmp
    assert got.prefill.shape == (*ids.shape, 512) and got.steps.shape == (ids.shape[0], 6, 512)
    assert 0 < measured["model_peak_mib"] < 200
    assert measured["prefill_s"] > 0 and measured["decode_tokens_per_s"] > 0
    return {"artifact": art, "measured": measured, "compare": cmp}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_onnx_decode_with_kv_cache_matches_generate(arch: str, tmp_path: Path) -> None:
    """Prefill + 6 greedy steps through past/present tensors equal PyTorch generate, per-layer heads."""
    model = heterogeneous(arch)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(3))
    out = _generate("onnxruntime", model, ExportConfig(seq_len=16), ids, tmp_path)
    assert out["artifact"].details["kv_heads"] == kv_layout_heads(model)
    fused = out["artifact"].details["fused"]  # onnxruntime's norm ops: every block's norms, and rotary
    assert fused["rms_norm"] >= 2 * len(decoder_layers(model)) and fused["rotary"] > 0, fused


@pytest.mark.parametrize(
    ("arch", "llm_ops"), [("llama", True), ("qwen3", True), ("gemma3_text", True), ("mistral", False)]
)
@pytest.mark.slow
def test_executorch_static_cache_matches_generate(arch: str, llm_ops: bool, tmp_path: Path) -> None:
    """The .pte's in-place static cache (per-layer heads) decodes like PyTorch; a prompt longer than
    the program's chunk is prefilled in chunks; the cache is sized by max_cache_len. Llama, Qwen3 and
    Gemma 3 run on ExecuTorch's LLM kernels (custom_sdpa + update_cache; Gemma 3's sliding-window
    layers as rings of window - 1 + chunk slots), a model with llm_ops off on the generic attention."""
    model = heterogeneous(arch)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(3))
    cfg = ExportConfig(seq_len=8, max_cache_len=40, llm_ops=llm_ops)  # prompt of 20 -> chunks 8 + 8 + 4
    out = _generate("executorch", model, cfg, ids, tmp_path)
    details = out["artifact"].details
    assert details["attention"].startswith("llama::custom_sdpa") == llm_ops, details["attention"]
    assert ("llama.custom_sdpa.default" in details["undelegated_ops"]) == llm_ops
    if arch == "gemma3_text":  # sliding_window 16 < 40: a ring of 15 + 8 slots
        assert "a ring of 23 slots" in details["kv_cache"], details["kv_cache"]
    assert out["artifact"].static_shape == (1, 8)
    assert details["delegate_calls"] > 0
    assert details["metadata"]["get_max_context_len"] == 40 and details["metadata"]["get_max_seq_len"] == 8
    assert details["kv_heads"] == kv_layout_heads(model)


@pytest.mark.slow
def test_executorch_tanh_gelu_at_real_magnitudes(tmp_path: Path) -> None:
    """Gemma 3's MLP runs GELU's tanh form, which ExecuTorch 1.5.1's XNNPACK delegate computed as exact
    GELU (up to 4.7e-4 apart per element): Gemma 3 270M's fp32 .pte missed the 1e-3 parity gate 30x.
    Random tiny weights keep GELU's inputs near 0, where the two agree, so the gate projections are
    scaled to put them at the real model's magnitudes (up to ~22). The tiny model's logits stay
    below 1, so the bound is tighter than the other tests': measured 3.7e-5 without the fix, 4.2e-7
    with it."""
    model = tiny_model("gemma3_text")
    for layer in decoder_layers(model):
        layer.mlp.gate_proj.weight.mul_(40.0)
        layer.mlp.up_proj.weight.mul_(10.0)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(5))
    out = _generate("executorch", model, ExportConfig(seq_len=8, max_cache_len=24), ids, tmp_path)
    assert out["compare"]["max_abs_logit_diff"] < 4e-6, out["compare"]


def test_onnx_dynamic_batch(tmp_path: Path) -> None:
    """The ONNX artifact takes other batch sizes and lengths than it was traced with."""
    model = tiny_model("llama")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    _generate("onnxruntime", model, ExportConfig(seq_len=16), ids, tmp_path)


def kv_layout_heads(model: torch.nn.Module) -> list[int]:
    from exporters.kv_cache import kv_layout

    return list(kv_layout(model).kv_heads)


class _Bessel(torch.nn.Module):
    """An activation no exporter can convert (no ONNX function, not in the Core ATen opset)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i1e(x)


# One case per runtime of core/runtimes.py (tests/test_coverage.py holds this to the table): an op
# the runtime's exporter cannot take, and the name its error must give.
RUNTIME_CASES = {"onnxruntime": "bessel_i1e", "executorch": "special_i1e"}


@pytest.mark.parametrize(("runtime", "op"), sorted(RUNTIME_CASES.items()))
def test_unsupported_op_is_a_clear_error_naming_it(runtime: str, op: str, tmp_path: Path) -> None:
    model = tiny_model("llama")
    decoder_layers(model)[1].mlp.act_fn = _Bessel()
    with pytest.raises(ExportError, match=rf"at operator \S*{op}\S*") as err:
        get_exporter(runtime).export(model, ExportConfig(seq_len=8), tmp_path)
    assert "llama" in str(err.value) and len(str(err.value)) < 1200
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_ort_format_for_ort_mobile(tmp_path: Path) -> None:
    """onnx_format: ort writes model.ort (offline-optimized for the device's CPU) and a
    required-operators config; the .ort decodes with its KV cache like PyTorch."""
    model = heterogeneous("qwen3")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(6))
    out = _generate(
        "onnxruntime", model, ExportConfig(seq_len=8, onnx_format="ort", target_arch="aarch64"), ids, tmp_path
    )
    assert out["artifact"].path.name == "model.ort"
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.required_operators.config").is_file()
    assert "MatMul" in (tmp_path / "model.required_operators.config").read_text()


@pytest.mark.slow
def test_onnx_sliding_layers_hold_their_window(tmp_path: Path) -> None:
    """Issue 21.4: a sliding-window layer's past is a fixed ``window - 1`` slots (a number in the
    graph, so runners start it with zeros), the full layer's grows: after a 40-token prompt the
    sliding presents hold 15 positions, the full one 40. What the memory model counts
    (targets.budget: ``LayerShape.positions``) is what the graph holds."""
    import numpy as np
    import onnxruntime as ort

    types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    model = tiny_model("gemma3_text", layer_types=types)  # sliding_window 16
    art = get_exporter("onnxruntime").export(model, ExportConfig(seq_len=8, max_cache_len=64), tmp_path)
    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    pasts = {i.name: i.shape[2] for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    assert [pasts[f"past_key_values.{i}.key"] for i in (0, 2, 3)] == [15] * 3
    assert isinstance(pasts["past_key_values.1.key"], str)  # a named, growing axis
    n = 40
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.random.default_rng(0).integers(0, 512, (1, n)).astype(np.int64),
        "attention_mask": np.ones((1, n), dtype=np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for name, slots in pasts.items():
        feeds[name] = np.zeros((1, 2, slots if isinstance(slots, int) else 0, 16), dtype=np.float32)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feeds), strict=True))
    lengths = [out[f"present.{i}.key"].shape[2] for i in range(4)]
    assert lengths == [15, n, 15, 15], lengths
    with torch.no_grad():
        ref = model(torch.from_numpy(feeds["input_ids"]), use_cache=False).logits[0].numpy()
    assert float(np.abs(out["logits"][0] - ref).max()) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "executorch"])
def test_sliding_window_model_decodes_past_its_window(runtime: str, tmp_path: Path) -> None:
    """Gemma 3's sliding layers, filled well past the window (16) in prefill chunks and decode steps as
    the context fill does, give PyTorch's logits at every position: both runtimes' caches roll (ONNX:
    a fixed window - 1 past; ExecuTorch: a ring of window - 1 + chunk slots). Before, Gemma 3 270M's
    ONNX graph failed at its window (512 positions) in onnxruntime."""
    import numpy as np

    from targets.runner import RUNTIMES, prefill

    types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    model = tiny_model("gemma3_text", layer_types=types)
    art = get_exporter(runtime).export(model, ExportConfig(seq_len=8, max_cache_len=48), tmp_path)
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(5))
    decoder = RUNTIMES[runtime](art.path, 1, 8)()
    got = [prefill(decoder, ids[:, :32].numpy())[0]]  # 4 chunks of 8: twice the window
    # 16 decode steps past it, each copied: a runner's logits are valid until its next call
    got += [np.array(decoder.forward(ids[:, i : i + 1].numpy())[0]) for i in range(32, 48)]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits[0].numpy()
    diff = float(np.abs(np.concatenate(got) - ref).max())
    assert diff <= 1e-4, diff
