"""Architecture registry: which Hugging Face causal LMs prunefit knows how to prune and export.

Every supported architecture shares the Llama layout (``model.model.layers[i].self_attn.{q,k,v,o}_proj``
and ``mlp.{gate,up,down}_proj`` or Phi-3's fused variants); the spec records where they differ. An
explicit table, not discovery: an unknown ``model_type`` is rejected with the list of known ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from core.errors import ModelLoadError


@dataclass(frozen=True)
class ArchSpec:
    """How to reach the parts of one architecture that pruning and export touch."""

    model_type: str
    layers_attr: str = "model.layers"
    fused_qkv: bool = False  # Phi-3: self_attn.qkv_proj
    fused_gate_up: bool = False  # Phi-3: mlp.gate_up_proj
    # Phi-3's attention splits its fused qkv output by the *global* config head counts, so a
    # per-layer head count cannot be expressed with stock modules: width pruning leaves its heads.
    per_layer_heads: bool = True
    # Gemma 2/3: norms after the attention and the MLP too (post_*_layernorm), so a sub-layer's
    # output reaches the residual stream through a norm and cannot be re-fitted to the stream's drift.
    sandwich_norms: bool = False


ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama"),
        ArchSpec("mistral"),
        ArchSpec("qwen2"),
        ArchSpec("qwen3"),
        ArchSpec("gemma"),
        ArchSpec("gemma3_text", sandwich_norms=True),
        ArchSpec("phi3", fused_qkv=True, fused_gate_up=True, per_layer_heads=False),
    )
}


# Known and refused, with the reason: a model of these types is rejected before anything loads.
UNSUPPORTED: dict[str, str] = {
    # A tiny Gemma 2 (sliding window 16) exported with torch.onnx's dynamo exporter fails in
    # onnxruntime as soon as a decode step passes the window (GatherND "invalid index found"):
    # the graph is wrong for any context longer than the model's sliding window.
    "gemma2": "its ONNX export fails once decoding passes the sliding window (GatherND invalid index in onnxruntime)",
}


def arch_for(model_type: str) -> ArchSpec:
    if model_type in UNSUPPORTED:
        raise ModelLoadError(
            f"Architecture '{model_type}' is not supported: {UNSUPPORTED[model_type]}. prunefit supports: "
            f"{', '.join(sorted(ARCHS))}."
        )
    try:
        return ARCHS[model_type]
    except KeyError:
        raise ModelLoadError(
            f"Unsupported architecture '{model_type}'. prunefit supports: {', '.join(sorted(ARCHS))}. "
            "Convert the model to one of these or open an issue asking for it."
        ) from None


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder blocks of a supported causal LM (typed Any: HF modules are dynamic)."""
    spec = arch_for(model.config.model_type)
    obj: object = model
    for part in spec.layers_attr.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, nn.ModuleList)
    return obj


def tied_head(model: Any) -> bool:
    """Whether the lm_head is the embedding's own weight tensor (the live modules, not the config's
    ``tie_word_embeddings``: what is stored once is what shares one tensor)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def head_dim(config: object) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else int(config.hidden_size // config.num_attention_heads)  # type: ignore[attr-defined]


def _rows(linear: Any) -> int:
    return int(linear.weight.shape[0])


def attention_heads(attn: Any, hd: int) -> tuple[int, int]:
    """(query heads, KV heads) of one attention module, read from its live projection shapes (a
    pruned layer has fewer than the config says). Phi-3's fused qkv_proj holds [q | k | v] rows."""
    n_q = int(attn.o_proj.weight.shape[1]) // hd
    if getattr(attn, "qkv_proj", None) is not None:
        return n_q, (_rows(attn.qkv_proj) // hd - n_q) // 2
    return n_q, _rows(attn.k_proj) // hd


def mlp_width(mlp: Any) -> int:
    """Intermediate channels of one MLP, from its live shapes (Phi-3: fused gate_up_proj)."""
    fused = getattr(mlp, "gate_up_proj", None)
    return _rows(fused) // 2 if fused is not None else _rows(mlp.up_proj)


def layer_windows(config: Any, num_layers: int) -> list[int | None]:
    """Each block's attention window from the config's per-layer types (Gemma 2/3: most layers
    ``sliding_attention`` over ``sliding_window`` positions); None for full attention."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not types or not window:
        return [None] * num_layers
    return [int(window) if t == "sliding_attention" else None for t in types[:num_layers]]
