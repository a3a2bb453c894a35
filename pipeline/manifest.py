"""Stage manifests: a stage whose inputs have not changed is not redone on rerun.

Each stage writes ``manifests/<stage>.json`` *after* its outputs, holding a key (sha256 of its
inputs: model fingerprint, configs, profile, package versions, the stage's own source code) and
the outputs it produced. A stage is fresh when the key matches and every listed output still
exists with the recorded size.
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from core.fsio import atomic_write_json

_VERSIONED = ("torch", "transformers", "onnx", "onnxruntime", "executorch", "prunefit")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def fingerprint_path(path: Path) -> dict[str, Any]:
    """Cheap identity of a file or directory tree: names, sizes and mtimes (not contents)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        "path": str(path.resolve()),
        "files": [(str(p.name), p.stat().st_size, int(p.stat().st_mtime)) for p in files],
    }


def source_digest(*packages: str, root: Path | None = None) -> str:
    """sha256 of the Python sources of prunefit's own ``packages``: a stage's code is one of its
    inputs, and the prunefit version does not move with every change to it."""
    root = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def stage_key(**inputs: Any) -> str:
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def manifest_path(out_dir: Path, stage: str) -> Path:
    return out_dir / "manifests" / f"{stage}.json"


def is_fresh(out_dir: Path, stage: str, key: str) -> dict[str, Any] | None:
    """The stage's manifest if it matches ``key`` and its outputs are intact, else None."""
    path = manifest_path(out_dir, stage)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("key") != key:
        return None
    for rel, size in manifest.get("outputs", {}).items():
        p = out_dir / rel
        if not p.exists() or (p.is_file() and p.stat().st_size != size):
            return None
    return manifest


def write_manifest(
    out_dir: Path, stage: str, key: str, outputs: list[Path], wall_s: float, metrics: dict[str, Any] | None = None
) -> dict[str, Any]:
    manifest = {
        "stage": stage,
        "key": key,
        "outputs": {str(p.relative_to(out_dir)): (p.stat().st_size if p.is_file() else 0) for p in outputs},
        "wall_s": round(wall_s, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        "metrics": metrics or {},
    }
    atomic_write_json(manifest_path(out_dir, stage), manifest)
    return manifest
