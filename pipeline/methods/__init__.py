"""Pruning methods, one module each; the table of names, configs and implementing classes is
``core/methods.py`` (light, so profiles validate against it before torch loads). A method module is
imported only when a run prunes with it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from core.errors import ConfigError
from core.methods import MethodConfig, method_spec

if TYPE_CHECKING:
    from pipeline.methods.base import Pruner


def build_pruner(cfg: MethodConfig) -> Pruner:
    """The pruner of ``cfg.method``, constructed with ``cfg`` (an unknown method is a ConfigError)."""
    module, cls = method_spec(cfg.method).pruner.split(":")
    pruner: Pruner = getattr(importlib.import_module(module), cls)(cfg)
    return pruner


def check_streams(pruner: Pruner) -> None:
    """ConfigError unless ``pruner`` prunes layer-wise, one block resident at a time (what pruning a
    checkpoint block by block needs)."""
    if not pruner.streams:
        raise ConfigError(
            f"Streaming (checkpoint-to-checkpoint) pruning is layer-wise and supports method 'comp', not "
            f"'{pruner.name}'. Use --method comp, or `prunefit export` to prune an in-memory model."
        )
