"""Write a run's results: ``report.json`` (machine-readable, versioned), ``report.md``
(``targets/markdown.py``) and ``report.html`` with its plots (``targets/html.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.fsio import atomic_write_json, atomic_write_text
from targets.html import write_html
from targets.markdown import render_markdown

SCHEMA_VERSION = 1


def rerender(out_dir: Path) -> Path:
    """Re-render report.md from an existing report.json (``prunefit report``)."""
    path = out_dir / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"No readable report at {path} ({exc}); run `prunefit export` first.") from exc
    return write_report(out_dir, report)[1]


def write_report(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """report.json, report.md and report.html (with plots/)."""
    report = {**report, "schema_version": SCHEMA_VERSION}
    paths = (
        atomic_write_json(out_dir / "report.json", report),
        atomic_write_text(out_dir / "report.md", render_markdown(report)),
    )
    write_html(out_dir, report)
    return paths
