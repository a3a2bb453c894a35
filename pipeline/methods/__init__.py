"""Pruning methods, one module each; the table of names, configs and implementing classes is
``core/methods.py`` (light, so profiles validate against it before torch loads). A method module is
imported only when a run prunes with it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from core.methods import MethodConfig, method_spec

if TYPE_CHECKING:
    from pipeline.methods.base import Pruner


def build_pruner(cfg: MethodConfig) -> Pruner:
    """The pruner of ``cfg.method``, constructed with ``cfg`` (an unknown method is a ConfigError)."""
    module, cls = method_spec(cfg.method).pruner.split(":")
    pruner: Pruner = getattr(importlib.import_module(module), cls)(cfg)
    return pruner
