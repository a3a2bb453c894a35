"""Exporter registry: the runtime table (``core.runtimes``) names each runtime's exporter, imported
lazily so that profile checks never load heavy backends. Unknown names fail loudly with the valid ones."""

from __future__ import annotations

import importlib
import importlib.util

from core.errors import ExportError, RuntimeMissingError
from core.runtimes import RUNTIME_TABLE
from exporters.base import Exporter


def check_runtime_available(runtime: str) -> None:
    """Raise RuntimeMissingError naming the missing package, without importing the backend."""
    spec = RUNTIME_TABLE.get(runtime)  # type: ignore[call-overload]
    for module in spec.requires if spec else ():
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
    return sorted(RUNTIME_TABLE)


def get_exporter(runtime: str) -> Exporter:
    try:
        target = RUNTIME_TABLE[runtime].exporter  # type: ignore[index]
    except KeyError:
        raise ExportError(
            f"No exporter for runtime '{runtime}'. Available: {', '.join(available_exporters())}."
        ) from None
    module, cls = target.split(":")
    exporter: Exporter = getattr(importlib.import_module(module), cls)()
    return exporter
