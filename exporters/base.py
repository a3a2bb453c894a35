"""What every exporter provides: the export shapes, the artifact record, the Exporter protocol."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from transformers import PreTrainedModel

from core.schemes import effective_head


@dataclass(frozen=True)
class ExportConfig:
    """Shapes the exported decoder is built for.

    ``seq_len`` is the longest chunk one call takes (the profile's prefill chunk; decode calls take
    1 token), ``max_cache_len`` the KV cache capacity (the profile's context length), which static
    caches preallocate. ``batch_size`` is fixed for static caches and the example elsewhere.
    """

    seq_len: int
    max_cache_len: int = 0  # 0: seq_len + 64 (tests); the pipeline passes the profile's context
    batch_size: int = 1
    quantize: str | None = None  # a scheme of exporters.quantize (per runtime), None: fp32
    quantize_embedding: str | None = None  # an embedding scheme of core.schemes (per runtime), None: fp32
    # the lm_head's scheme where it differs from ``quantize`` (core.schemes.head_schemes_for, or
    # "fp32"); None: the head follows ``quantize``
    quantize_head: str | None = None
    # onnxruntime: "onnx" (torch.onnx's graph, Optimum's input names), "ort" (+ model.ort for ORT
    # Mobile, optimized offline), "genai" (onnxruntime-genai's builder: exporters.genai)
    onnx_format: Literal["onnx", "ort", "genai"] = "onnx"
    tokenizer_dir: Path | None = None  # genai: the tokenizer files shipped beside the graph
    target_arch: str = "aarch64"  # the device's CPU: offline optimizations must not assume this host's
    llm_ops: bool = True  # executorch: ExecuTorch's LLM kernels (custom_sdpa, update_cache) where they apply
    # calibration token windows (a safetensors file, tensor "calibration") for a scheme that rounds by
    # GPTQ (core.schemes.rounds_by_gptq); None: such a scheme rounds to nearest, with a warning
    calibration: Path | None = None

    @property
    def head_scheme(self) -> str | None:
        """The scheme the lm_head is stored in (None: fp32)."""
        return effective_head(self.quantize, self.quantize_head)

    @property
    def quantized_weights(self) -> bool:
        """Whether any linear weight (the blocks or the lm_head) is quantized."""
        return self.quantize is not None or self.head_scheme is not None

    @property
    def ort_format(self) -> bool:
        return self.onnx_format == "ort"

    @property
    def cache_len(self) -> int:
        return self.max_cache_len or self.seq_len + 64


@dataclass
class ExportArtifact:
    runtime: str
    path: Path
    size_bytes: int
    export_s: float
    static_shape: tuple[int, int] | None  # (batch, seq) when the artifact only takes that shape
    details: dict[str, Any]


def artifact_files(path: Path) -> list[Path]:
    """The file itself plus its external-data sidecar (``model.onnx.data``) when there is one."""
    sidecar = path.with_name(path.name + ".data")
    return [path, sidecar] if sidecar.is_file() else [path]


def artifact_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in artifact_files(path))


class Exporter(Protocol):
    name: str
    filename: str

    def artifact_name(self, cfg: ExportConfig) -> str: ...  # the file the runtime loads

    def export(self, model: PreTrainedModel, cfg: ExportConfig, out_dir: Path) -> ExportArtifact: ...


# How exporters name an operator they cannot handle: torch.onnx's dispatcher prints the OpOverload,
# torch.export / ExecuTorch print the qualified name.
_OP_OVERLOAD = re.compile(r"op='([\w.]+)', overload='(\w+)'")
_OP_NAME = re.compile(r"\b((?:aten|prims|quantized_decomposed|torchao)(?:\.|::)\w+(?:\.\w+)?)")


def failing_op(exc: BaseException) -> str | None:
    """The operator an export error (or any error it was raised from) names, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if m := _OP_OVERLOAD.search(text):
            return f"{m.group(1)}.{m.group(2)}"
        if m := _OP_NAME.search(text):
            return m.group(1)
        seen = seen.__cause__ or seen.__context__
    return None


def export_error(runtime: str, model_type: str, exc: BaseException) -> str:
    """One message for a failed export: the operator when one is named, then the first lines."""
    op = failing_op(exc)
    where = f" at operator {op} (no {runtime} kernel or conversion for it)" if op else ""
    head = " ".join(str(exc).split())[:600]
    return (
        f"{runtime} export failed for {model_type}{where}: {type(exc).__name__}: {head}. "
        "Run with --debug for the full trace."
    )
