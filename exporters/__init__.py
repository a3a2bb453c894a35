"""Exporter registry: an explicit table from runtime name to exporter, imported lazily so that
profile checks never load heavy backends. Unknown names fail loudly with the valid ones."""

from __future__ import annotations

import importlib

from exporters.base import Exporter
from pipeline.errors import ExportError

_REGISTRY: dict[str, str] = {
    "onnxruntime": "exporters.onnx:OnnxExporter",
    "executorch": "exporters.executorch:ExecuTorchExporter",
}


def available_exporters() -> list[str]:
    return sorted(_REGISTRY)


def get_exporter(runtime: str) -> Exporter:
    try:
        target = _REGISTRY[runtime]
    except KeyError:
        raise ExportError(
            f"No exporter for runtime '{runtime}'. Available: {', '.join(available_exporters())}."
        ) from None
    module, cls = target.split(":")
    exporter: Exporter = getattr(importlib.import_module(module), cls)()
    return exporter
