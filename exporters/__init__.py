"""Exporter registry: an explicit table from runtime name to exporter, imported lazily so that
profile checks never load heavy backends. Unknown names fail loudly with the valid ones."""

from __future__ import annotations

import importlib
import importlib.util

from exporters.base import Exporter
from pipeline.errors import ExportError, RuntimeMissingError

_REGISTRY: dict[str, str] = {
    "onnxruntime": "exporters.onnx:OnnxExporter",
    "executorch": "exporters.executorch:ExecuTorchExporter",
}


# Modules each runtime needs, checked before any model loads.
_REQUIRES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnx", "onnxscript", "onnxruntime"),
    "executorch": ("executorch.exir", "executorch.runtime"),
}


def check_runtime_available(runtime: str) -> None:
    """Raise RuntimeMissingError naming the missing package, without importing the backend."""
    for module in _REQUIRES.get(runtime, ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise RuntimeMissingError(
                f"The profile exports for '{runtime}', but Python package '{module.split('.')[0]}' is not installed. "
                f"Run `make setup`, or remove '{runtime}' from the profile's runtimes."
            )


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
