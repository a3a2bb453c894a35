"""A quantized embedding table for ExecuTorch: int8 rows or int4 groups, gathered by ExecuTorch's
portable ``quantized_decomposed::embedding_byte`` / ``embedding_4bit`` kernels.

This is what ExecuTorch's own ``export_llm --embedding_quantize 8,0`` / ``4,32`` emits. XNNPACK has no
gather kernel, so the op stays outside the delegate and runs on the portable kernels that
``executorch.kernels.quantized`` registers (the runner imports it). The codes are symmetric (no zero
point), as torchao rounds: ``scale = max|row group| / ((qmax - qmin) / 2)``. The same arithmetic is
what ``pipeline/fit/simulate.py`` prices, through :func:`symmetric_codes`, so the simulation and the
artifact cannot drift apart.

Only the lookup changes: a tied lm_head keeps its own weight (ExecuTorch stores it apart from the
embedding anyway, fp32 or quantized by the linear scheme).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.schemes import EmbeddingSpec, embedding_spec


def symmetric_grid(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (as floats, in [-2^(bits-1), 2^(bits-1) - 1]) and scales of ``x``, one scale per slice of
    its last dim, as torchao rounds: scale = max|x| / ((qmax - qmin) / 2), codes = round(x * (1/scale))
    (``x * (1/scale)``, not ``x / scale``: that is what makes the simulation bit-exact)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / ((qmax - qmin) / 2)
    return (x * (1.0 / scale)).round().clamp(qmin, qmax), scale


def symmetric_codes(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, in [-2^(bits-1), 2^(bits-1) - 1]) and fp32 scales ([rows, groups]) of the 2-D ``w``,
    one scale per row (``group_size`` 0) or per ``group_size`` consecutive values of a row."""
    rows, width = w.shape
    group = group_size or width
    if width % group:
        raise ValueError(f"embedding width {width} is not a multiple of the group size {group}")
    codes, scale = symmetric_grid(w.detach().float().reshape(rows, width // group, group), bits)
    return codes.to(torch.int8).reshape(rows, width), scale.squeeze(-1)


def dequantized(w: torch.Tensor, spec: EmbeddingSpec) -> torch.Tensor:
    """``w`` as the quantized table gives it back (the simulation's view of the artifact)."""
    codes, scale = symmetric_codes(w, spec.bits, spec.group_size)
    rows, width = codes.shape
    out = codes.float().reshape(rows, scale.shape[1], -1) * scale.unsqueeze(-1)
    return out.reshape(rows, width).to(w.dtype)


class QuantizedEmbedding(nn.Module):
    """Drop-in for an ``nn.Embedding`` (or a scaled one, as Gemma's: ``embed_scale`` is kept)."""

    def __init__(self, source: nn.Embedding, spec: EmbeddingSpec) -> None:
        super().__init__()
        codes, scale = symmetric_codes(source.weight, spec.bits, spec.group_size)
        if spec.bits == 4:  # two codes per byte, shifted to [0, 15]: the even one in the high nibble
            shifted = (codes.to(torch.int16) + 8).to(torch.uint8)
            codes = (shifted[:, ::2] << 4) | shifted[:, 1::2]
        self.bits = spec.bits
        self.num_embeddings, self.embedding_dim = source.weight.shape
        self.out_dtype = source.weight.dtype
        self.stored_bytes = codes.numel() * codes.element_size() + scale.numel() * 4
        self.register_buffer("weight_codes", codes.contiguous())
        self.register_buffer("weight_scales", scale.contiguous())
        embed_scale = getattr(source, "embed_scale", None)
        self.embed_scale = float(embed_scale) if embed_scale is not None else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        qmin, qmax = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        op = ops.embedding_4bit.dtype if self.bits == 4 else ops.embedding_byte.dtype
        out = op(self.weight_codes, self.weight_scales, None, qmin, qmax, input_ids, dtype=self.out_dtype)
        return out * self.embed_scale if self.embed_scale is not None else out


def register_ops() -> None:
    """Define ``quantized_decomposed::embedding_*`` for tracing (ExecuTorch's Python definitions)."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401


def quantize_embedding(model: nn.Module, scheme: str, runtime: str = "executorch") -> int:
    """Replace ``model``'s input embedding, in place, by its ``scheme`` quantized table; returns the
    bytes it now stores. The lm_head is untouched (a tied one keeps the fp32 weight it shares)."""
    spec = embedding_spec(scheme, runtime)
    register_ops()
    source: Any = model.get_input_embeddings()  # type: ignore[operator]
    if not isinstance(source, nn.Embedding):
        raise TypeError(f"input embedding is a {type(source).__name__}, not an nn.Embedding")
    q = QuantizedEmbedding(source, spec)
    model.set_input_embeddings(q)  # type: ignore[operator]
    return q.stored_bytes
