"""A user-level cache of model-generated calibration and evaluation text.

Generating the default calibration (256 windows of 128 tokens, sampled from the model) is minutes
of CPU, and it depends only on the model and the generation settings, not on the target: every
target and every rerun can share it. Entries live in ``$PRUNEFIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/prunefit``, else ``~/.cache/prunefit``, under ``calibration/<key>.safetensors``,
keyed by the model's *content* hash (not its path or mtime) and every setting that shapes the text.

Writes are atomic (temp name, then rename). An entry is checked when read (its recorded key,
shape, dtype and token range); a corrupt or mismatched one is regenerated with a warning. A cache
directory that cannot be written is reported once, and the run goes on without caching.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from core.errors import OutputError
from core.fsio import atomic_path

log = logging.getLogger(__name__)
_warned: set[str] = set()


def cache_root() -> Path:
    """prunefit's user cache: ``$PRUNEFIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/prunefit``, else
    ``~/.cache/prunefit`` (calibration text, converted GGUF models, measurements)."""
    env = os.environ.get("PRUNEFIT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "prunefit"


def cache_dir() -> Path:
    return cache_root() / "calibration"


def content_digest(path: Path) -> str:
    """sha256 of a model file or directory's files (names and bytes): the model's identity, whatever
    its path or modification time."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_key(model_digest: str, **settings: Any) -> str:
    """A user-cache entry's key: the model's content, every setting of what was made from it (the
    generation, a measurement, a conversion) and the torch/transformers versions that made it."""
    versions = {name: metadata.version(name) for name in ("torch", "transformers")}
    blob = json.dumps({"model": model_digest, "settings": settings, "versions": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _warn_once(what: str, message: str) -> None:
    """``message`` the first time ``what`` (a cache directory) fails in this process."""
    if what not in _warned:
        _warned.add(what)
        log.warning(message)


@contextlib.contextmanager
def writing_cache(directory: Path, what: str) -> Iterator[None]:
    """Run a block that writes into ``directory`` of the user cache. A cache is an
    optimization: if it cannot be written the run goes on without it, and says so once per
    directory."""
    try:
        yield
    except (OSError, OutputError) as exc:
        _warn_once(
            str(directory),
            f"cannot write {what} in {directory} ({exc}); going on without caching it "
            "(set PRUNEFIT_CACHE_DIR to a writable directory to cache it)",
        )


def _load(path: Path, key: str, shape: tuple[int, int], vocab: int) -> torch.Tensor | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            windows = fh.get_tensor("windows")
    except Exception as exc:  # unreadable, truncated, not safetensors
        log.warning("cached calibration text %s is unreadable (%s): generating it again", path, exc)
        return None
    problem = None
    if meta.get("key") != key:
        problem = "it was written for other settings"
    elif tuple(windows.shape) != shape or windows.dtype != torch.long:
        problem = f"shape {tuple(windows.shape)} {windows.dtype}, expected {shape} int64"
    elif int(windows.min()) < 0 or int(windows.max()) >= vocab:
        problem = f"token ids outside the vocabulary of {vocab}"
    if problem:
        log.warning("cached calibration text %s is not valid (%s): generating it again", path, problem)
        return None
    return windows


def cached_windows(
    generate: Callable[[], torch.Tensor],
    key: str,
    shape: tuple[int, int],
    vocab: int,
    force: bool = False,
    what: str = "calibration text",
) -> torch.Tensor:
    """The windows of ``key`` from the cache, else ``generate()``'d and stored. ``force`` generates
    again and replaces the entry."""
    path = cache_dir() / f"{key}.safetensors"
    if not force and path.is_file():
        windows = _load(path, key, shape, vocab)
        if windows is not None:
            log.info("%s: reusing %s (generated earlier for this model and settings)", what, path)
            return windows
    windows = generate()
    with writing_cache(path.parent, "the calibration cache"):
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"windows": windows.contiguous()}, str(tmp), metadata={"key": key})
        log.info("%s cached in %s", what, path)
    return windows
