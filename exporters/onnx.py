"""ONNX export with torch.onnx's dynamo exporter, run by onnxruntime: one decoder graph with the KV
cache as inputs and outputs (see :mod:`exporters.kv_cache`), dynamic batch / sequence / past axes.

The dynamo exporter keeps a tied embedding / lm_head as one initializer (the legacy exporter
stores it twice), and its output is checked with ``onnx.checker`` before it is renamed into place.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from core.errors import ExportError
from exporters.base import ExportArtifact, ExportConfig, artifact_size_bytes, export_error
from exporters.genai import GenAIExporter
from exporters.kv_cache import KvLayout, PastKeyValuesDecoder, kv_layout
from exporters.onnx_fusions import fuse_norms_and_rotary
from exporters.quantize import check_embedding_scheme, check_scheme, quantize_onnx
from exporters.rounding import rounded_for_export

log = logging.getLogger(__name__)

INPUT_NAMES = ["input_ids", "attention_mask", "position_ids"]


def example_inputs(layout: KvLayout, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Batch 2, 3 new tokens after 2 past ones: torch.export specialises any dimension whose example
    size is 0 or 1, so every dynamic axis is traced at >= 2; the graph then accepts any size,
    past length 0 (prefill) included. A rolling sliding-window layer's past is its fixed
    ``window - 1`` slots."""
    batch, seq, past = 2, 3, 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = [
        torch.randn(batch, h, w - 1 if w else past, layout.head_dim, generator=g)
        for h, w in zip(layout.kv_heads, layout.windows, strict=True)
        for _ in ("key", "value")
    ]
    return (ids, mask, pos, *cache)


def dynamic_shapes(layout: KvLayout) -> tuple[Any, ...]:
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence_length", min=1, max=1 << 16)
    past = torch.export.Dim("past_sequence_length", min=0, max=1 << 17)
    # The mask spans past + new tokens; Dim arithmetic (past + seq) is not exportable, so it gets
    # its own axis.
    total = torch.export.Dim("total_sequence_length", min=1, max=(1 << 17) + (1 << 16))
    cache = tuple({0: batch} if w else {0: batch, 2: past} for w in layout.windows for _ in ("key", "value"))
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, cache)


def to_ort_format(model: Path, out_dir: Path, target_arch: str) -> None:
    """Convert to ORT format (ORT Mobile / minimal builds load only this) with onnxruntime's own
    tool: graph optimizations are applied offline ("fixed" style) for the target's platform, and a
    required-operators config is written for building a reduced-operator runtime."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ort-") as work:
        convert_onnx_models_to_ort(
            model,
            Path(work),
            [OptimizationStyle.Fixed],
            target_platform="arm" if target_arch == "aarch64" else "amd64",
        )
        produced = Path(work) / (model.stem + ".ort")
        if not produced.is_file():
            raise ExportError(f"onnxruntime's ORT-format converter wrote no {produced.name}")
        os.replace(produced, out_dir / "model.ort")
        os.replace(
            Path(work) / (model.stem + ".required_operators.config"), out_dir / "model.required_operators.config"
        )


class OnnxExporter:
    name = "onnxruntime"
    filename = "model.onnx"
    data_filename = "model.onnx.data"
    ort_filename = "model.ort"
    ort_config_filename = "model.required_operators.config"

    def artifact_name(self, cfg: ExportConfig) -> str:
        if cfg.onnx_format == "genai":
            return GenAIExporter().artifact_name(cfg)
        return self.ort_filename if cfg.ort_format else self.filename

    def export(self, model: PreTrainedModel, cfg: ExportConfig, out_dir: Path) -> ExportArtifact:
        import onnx
        import onnx_ir

        if cfg.onnx_format == "genai":
            return GenAIExporter().export(model, cfg, out_dir)

        t0 = time.perf_counter()
        for scheme in {cfg.quantize, cfg.head_scheme} - {None}:
            check_scheme(self.name, scheme)  # type: ignore[arg-type]
        if cfg.quantize_embedding:
            check_embedding_scheme(self.name, cfg.quantize_embedding)
        if cfg.quantized_weights:  # a GPTQ-rounding scheme exports a rounded copy its quantizer maps to the same codes
            model = rounded_for_export(model, cfg.quantize, cfg.calibration, cfg.quantize_head)  # type: ignore[assignment]
        layout = kv_layout(model, cfg.cache_len)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / self.filename
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    PastKeyValuesDecoder(model, cfg.cache_len).eval(),
                    example_inputs(layout, model.config.vocab_size),
                    dynamo=True,
                    input_names=INPUT_NAMES + layout.input_names(),
                    output_names=["logits", *layout.output_names()],
                    dynamic_shapes=dynamic_shapes(layout),
                    optimize=True,
                    verbose=False,
                )
            assert program is not None  # dynamo=True always returns a program
            fused = fuse_norms_and_rotary(program.model)
            # Weights go to an external data file: onnxruntime maps it instead of parsing a
            # protobuf copy (measured: load peak 563 vs 679 MiB for a 432 MiB model), and models
            # over 2 GB need it anyway. Both files are written in a temp dir, checked, then renamed
            # data first, graph last, so model.onnx never names data that is not complete.
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-") as tmp_dir:
                tmp = Path(tmp_dir) / self.filename
                if cfg.quantized_weights:
                    fp32 = Path(tmp_dir) / "fp32" / self.filename
                    fp32.parent.mkdir()
                    onnx_ir.save(program.model, str(fp32), external_data=self.data_filename)
                    del program
                    quantize_onnx(fp32, tmp, cfg.quantize, cfg.quantize_head)
                else:
                    onnx_ir.save(program.model, str(tmp), external_data=self.data_filename)
                onnx.checker.check_model(str(tmp), full_check=False)
                names = [self.data_filename, self.filename]
                if cfg.ort_format:
                    to_ort_format(tmp, Path(tmp_dir), cfg.target_arch)
                    names += [self.ort_config_filename, self.ort_filename]
                for name in names:
                    with open(Path(tmp_dir) / name, "rb") as fh:
                        os.fsync(fh.fileno())
                    os.replace(Path(tmp_dir) / name, out_dir / name)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(export_error("ONNX", model.config.model_type, exc)) from exc
        if cfg.ort_format:
            path = out_dir / self.ort_filename
        size = artifact_size_bytes(path)
        log.info("wrote %s (%.1f MiB)", path, size / 2**20)
        details = {
            "opset": 20,
            "kv_cache": "past_key_values inputs"
            + (f"; sliding-window layers hold {layout.window - 1} positions" if layout.window else ""),
            "kv_heads": list(layout.kv_heads),
            "quantization": cfg.quantize or "none",
            "head_quantization": cfg.head_scheme or "none",
            "format": "ort (offline-optimized, fixed)" if cfg.ort_format else "onnx",
            "fused": fused,  # onnxruntime's RMSNorm / skip-RMSNorm / rotary ops (exporters/onnx_fusions.py)
        }
        return ExportArtifact(self.name, path, size, round(time.perf_counter() - t0, 2), None, details)
