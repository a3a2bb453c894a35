"""ONNX export with torch.onnx's dynamo exporter (dynamic batch and sequence), run by onnxruntime.

The dynamo exporter keeps a tied embedding / lm_head as one initializer (the legacy exporter
stores it twice), and its output is checked with ``onnx.checker`` before it is renamed into place.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from exporters.base import ExportArtifact, ExportConfig, LogitsOnly, example_inputs
from pipeline.errors import ExportError
from pipeline.fsio import atomic_path

log = logging.getLogger(__name__)


class OnnxExporter:
    name = "onnxruntime"
    filename = "model.onnx"

    def export(self, model: PreTrainedModel, cfg: ExportConfig, out_dir: Path) -> ExportArtifact:
        import onnx

        t0 = time.perf_counter()
        ids = example_inputs(cfg, model.config.vocab_size)
        batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=1 << 16)
        path = out_dir / self.filename
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    LogitsOnly(model).eval(),
                    (ids,),
                    dynamo=True,
                    input_names=["input_ids"],
                    output_names=["logits"],
                    dynamic_shapes=({0: batch, 1: seq},),
                    optimize=True,
                    verbose=False,
                )
            with atomic_path(path) as tmp:
                program.save(str(tmp))
                onnx.checker.check_model(str(tmp), full_check=False)
        except Exception as exc:
            raise ExportError(f"ONNX export failed for {model.config.model_type}: {type(exc).__name__}: {exc}") from exc
        size = path.stat().st_size
        log.info("wrote %s (%.1f MiB)", path, size / 2**20)
        return ExportArtifact(self.name, path, size, round(time.perf_counter() - t0, 2), None, {"opset": 20})
