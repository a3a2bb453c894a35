"""Measurements of the dense model remembered across targets and reruns, in the user cache.

A run measures the dense model before it prunes anything: its perplexity on the evaluation text, and
``precision: auto``'s calibration perplexity under each simulated precision. Those numbers depend on
the model's weights, the text and the code that measures them, not on the target: a second target
(``make export TARGET=rpi4`` after ``TARGET=android``) measured them again, ~80 s of its ~530 s on
SmolLM2-135M. They are kept under ``<cache root>/measurements/<key>.json`` (``calib_cache.cache_root``).

The key holds the model's content hash, a hash of the token windows' bytes, what was measured and
how (``settings``), the torch/transformers versions and a hash of prunefit's own measuring code
(``core``, ``pipeline``): any change to one of them measures again. ``--force`` measures again and
replaces the entry. Writes are atomic; an unreadable or mismatched entry is measured again with a
warning; a cache directory that cannot be written is reported once and the run goes on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.fsio import atomic_write_text
from pipeline.calib_cache import cache_key, cache_root, writing_cache

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _code() -> str:
    from pipeline.manifest import source_digest

    return source_digest("core", "exporters", "pipeline")  # exporters: the rounding a simulation reproduces


def windows_digest(windows: torch.Tensor) -> str:
    """sha256 of the windows' shape, dtype and bytes: the text a measurement read."""
    t = windows.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
    digest.update(t.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Memo:
    """Remembered measurements of one model (``model_digest``: its content hash). ``force``: measure
    again and replace what is stored."""

    model_digest: str
    force: bool = False

    def key(self, what: str, windows: torch.Tensor, settings: dict[str, Any]) -> str:
        """The entry's name: every input of the measurement (module docstring)."""
        return cache_key(self.model_digest, windows=windows_digest(windows), what=what, settings=settings, code=_code())

    def known(self, what: str, windows: torch.Tensor, **settings: Any) -> float | None:
        """What :meth:`value` would return without measuring, or None (``force``: always None)."""
        return self._stored(self.key(what, windows, settings))

    def _stored(self, key: str) -> float | None:
        path = _path(key)
        return None if self.force or not path.is_file() else _read(path, key)

    def value(self, what: str, windows: torch.Tensor, measure: Callable[[], float], **settings: Any) -> float:
        """``measure()`` on ``windows``, or what it returned before for this model, text and code."""
        key = self.key(what, windows, settings)
        found = self._stored(key)
        if found is not None:
            log.info("%s: %.4f, measured earlier on this model and text (%s)", what, found, key)
            return found
        path = _path(key)
        value = float(measure())
        with writing_cache(path.parent, "measurements"):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"key": key, "what": what, "value": value}))
        return value


def _path(key: str) -> Path:
    return cache_root() / "measurements" / f"{key}.json"


def _read(path: Path, key: str) -> float | None:
    try:
        entry = json.loads(path.read_text())
        value = float(entry["value"])
        if entry.get("key") != key or not math.isfinite(value) or value <= 0:
            raise ValueError(f"key {entry.get('key')!r}, value {value}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("remembered measurement %s is not valid (%s): measuring again", path, exc)
        return None
    return value
