"""``prunefit compare artifacts/*``: several runs side by side, one column per run.

Reads each directory's report.json (the versioned schema) and prints one Markdown table: the
device and budget, what pruning did, perplexity, and per runtime the artifact size, measured peak
against the budget, decode speed and whether every gate passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.runtimes import RUNTIMES
from core.schemes import precision_text


def _load(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "report.json"
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"No readable report at {path} ({exc}); run `prunefit export --out {out_dir}` first."
        ) from exc
    return report


def _f(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def compare(dirs: list[Path]) -> str:
    if not dirs:
        raise ConfigError("Give at least one artifacts directory, e.g. `prunefit compare artifacts/*`.")
    reports = [_load(d) for d in dirs]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, get: Any) -> None:
        rows.append((label, [get(r) for r in reports]))

    row("device", lambda r: r["profile"]["device"].split(",")[0])
    row("budget (MiB)", lambda r: str(r["profile"]["memory_budget_mib"]))
    row("context / prefill", lambda r: f"{r['profile']['context_length']} / {r['profile']['prefill_tokens']}")
    row("quantization", _quantization)
    row("pruning method", lambda r: r["prune"]["method"])
    row("blocks removed", lambda r: str(len(r["prune"]["removed_layers"])))
    row("params removed", lambda r: _f(1 - r["prune"]["params_after"] / r["prune"]["params_before"], ".1%"))
    for key in ("dense", "pruned"):
        row(f"perplexity {key}", lambda r, k=key: _f(r["validation"]["perplexity"].get(k), ".2f"))
    for rt in sorted(RUNTIMES):

        def by_rt(r: dict[str, Any], rt: str = rt) -> dict[str, Any] | None:
            return next((x for x in r["validation"]["runtimes"] if x["runtime"] == rt), None)

        row(f"{rt}: size (MiB)", lambda r, g=by_rt: _f((g(r) or {}).get("size_mib"), ".1f"))
        row(
            f"{rt}: peak at full context + library (MiB)",
            lambda r, g=by_rt: _f((g(r) or {}).get("projected_peak_mib"), ".1f"),
        )
        row(f"{rt}: memory model error", lambda r, g=by_rt: _f((g(r) or {}).get("prediction_error"), "+.1%"))
        row(
            f"{rt}: decode (tok/s)",
            lambda r, g=by_rt: _f(((g(r) or {}).get("measured") or {}).get("decode_tokens_per_s"), ".1f"),
        )
        row(f"{rt}: perplexity", lambda r, rt=rt: _f(r["validation"]["perplexity"].get(f"exported[{rt}]"), ".2f"))
    row("gates", lambda r: "all pass" if r["validation"]["passed"] else "FAIL: " + ", ".join(
        g["name"] for g in r["validation"]["gates"] if not g["passed"]))  # fmt: skip
    names = [r["profile"]["name"] for r in reports]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
    return "\n".join(lines) + "\n"


def _quantization(report: dict[str, Any]) -> str:
    """A report's schemes per runtime, the embedding's where it has its own."""
    prof = report["profile"]
    emb, head = prof.get("quantize_embedding", {}), prof.get("quantize_head", {})
    runtimes = list(dict.fromkeys([*prof.get("quantize", {}), *emb, *head]))
    parts = [f"{rt}: {precision_text(prof.get('quantize', {}).get(rt), emb.get(rt), head.get(rt))}" for rt in runtimes]
    return ", ".join(parts) or "fp32"
