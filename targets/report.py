"""Write a run's results: ``report.json`` (the typed report, ``targets/results.py``), ``report.md``
(``targets/markdown.py``) and ``report.html`` with its plots (``targets/html.py``), all from the
same model."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from core.errors import ConfigError
from core.fsio import atomic_write_json, atomic_write_text
from targets.html import write_html
from targets.markdown import render_markdown
from targets.results import SCHEMA_VERSION, Report


def load_report(out_dir: Path) -> Report:
    """``out_dir/report.json`` as the typed report; a missing, unreadable or other-version report is
    a ConfigError saying what to run."""
    path = out_dir / "report.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"No readable report at {path} ({exc}); run `prunefit export` first.") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"{path} has report schema {version}, this prunefit writes {SCHEMA_VERSION}: run "
            f"`prunefit validate --out {out_dir}` to re-measure and rewrite it."
        )
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path} does not match the report schema {SCHEMA_VERSION}: {exc}") from exc


def rerender(out_dir: Path) -> Path:
    """Re-render report.md (and report.html) from an existing report.json (``prunefit report``)."""
    return write_report(out_dir, load_report(out_dir))[1]


def write_report(out_dir: Path, report: Report) -> tuple[Path, Path]:
    """report.json, report.md and report.html (with plots/)."""
    paths = (
        atomic_write_json(out_dir / "report.json", report.model_dump()),
        atomic_write_text(out_dir / "report.md", render_markdown(report)),
    )
    write_html(out_dir, report)
    return paths
