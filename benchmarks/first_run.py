"""The newcomer's first run, timed: the README's command in a fresh clone, then a second target.

What a new user lives: ``git clone``, then ``make export TARGET=android`` (which sets up ``.venv``
first), then another target that reuses the cached calibration text. This benchmark does exactly
that in a temporary directory, with a fresh calibration cache (``PRUNEFIT_CACHE_DIR``), and records:

- the setup (``make setup``: the venv and the pinned stack; pip's own cache is the user's);
- each export's wall time and its stages from ``report.json`` (prune stage split into model load,
  calibration text, dense evaluation, precision choice, pruning, saving; each export; validation).

Goals (issue 19): the default run <= 10 min on 2 idle cores; a second target that reuses the cache
<= 6 min. Absolute times on a shared machine are noisy: the table says what else was running
(load average at the start and end).

    python benchmarks/first_run.py                       # android, then rpi4
    python benchmarks/first_run.py --targets android,android-go --no-shared

Writes ``benchmarks/results/first_run.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.schemes import precision_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("bench.first_run")

GOALS_S = {"first": 600.0, "second": 360.0}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> float:
    """Run ``cmd`` (no shell), its output to ``log_path``; its wall time, or an error naming the log."""
    t0 = time.perf_counter()
    with log_path.open("w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}) after {wall:.0f} s; see {log_path}")
    return wall


def _stages(report: dict[str, Any]) -> dict[str, float]:
    """Seconds per stage, the prune stage split into its parts where the report has them."""
    out: dict[str, float] = {}
    for name, stage in report["stages"].items():
        details = stage.get("details") or {}
        parts = details.get("parts") if name == "prune" else None
        overlapped = float(details.get("overlapped_with_export_s", 0.0)) if name == "validate" else 0.0
        if parts:
            out.update({f"prune: {k}": float(v) for k, v in parts.items()})
        elif overlapped:  # artifacts validated while another runtime's export ran, then the rest
            out["validate: while exporting"] = overlapped
            out["validate: after the exports"] = float(stage["wall_s"]) - overlapped
        else:
            out[name] = float(stage["wall_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="android,rpi4", help="the first is the README's; the rest reuse its cache")
    ap.add_argument("--no-shared", action="store_true", help="no ../shared beside the clone (generated eval text)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    targets = args.targets.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="prunefit-first-run-"))
    clone = tmp / "prunefit"
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    try:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        shared = ROOT.parent / "shared"
        if not args.no_shared and shared.is_dir():
            (tmp / "shared").symlink_to(shared)
        env = {**os.environ, "PRUNEFIT_CACHE_DIR": str(tmp / "cache")}
        env.pop("VIRTUAL_ENV", None)
        log.info("fresh clone in %s; make setup", clone)
        setup_s = _run(["make", "setup"], clone, env, tmp / "setup.log")
        log.info("setup: %.0f s", setup_s)
        for i, target in enumerate(targets):
            log.info("make export TARGET=%s", target)
            wall = _run(["make", "export", f"TARGET={target}"], clone, env, tmp / f"export-{target}.log")
            report = json.loads((clone / "artifacts" / target / "report.json").read_text())
            kind = "first" if i == 0 else "second"
            rows.append({
                "target": target, "run": kind, "wall_s": round(wall, 1), "goal_s": GOALS_S[kind],
                "met": wall <= GOALS_S[kind], "passed": report["validation"]["passed"],
                "precision": (report.get("fit") or {}).get("quantize") or {},
                "embedding": (report.get("fit") or {}).get("quantize_embedding") or {},
                "stages": {k: round(v, 1) for k, v in _stages(report).items()},
            })  # fmt: skip
            log.info("%s: %.0f s (goal %.0f s)", target, wall, GOALS_S[kind])
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "setup_s": round(setup_s, 1),
        "runs": rows,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "cpus": len(os.sched_getaffinity(0)),
        "shared_data": not args.no_shared,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "first_run.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "first_run.md").write_text(_markdown(result))
    print(_markdown(result))


def _precision(quantize: dict[str, str], embedding: dict[str, str]) -> str:
    """What precision: auto chose, in words (runtimes not named stayed fp32)."""
    chosen = {rt: precision_text(quantize.get(rt), embedding.get(rt)) for rt in {**quantize, **embedding}}
    if not chosen:
        return "fp32"
    return ", ".join(f"{rt} {text}" for rt, text in sorted(chosen.items())) + ", rest fp32"


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# The first run, timed (benchmarks/first_run.py)",
        "",
        f"Fresh clone, fresh calibration cache, {result['cpus']} CPUs, load average "
        f"{result['load_average']['start'][0]:.1f} at the start and {result['load_average']['end'][0]:.1f} at the "
        f"end; `make setup` {result['setup_s']:.0f} s (not in the goals).",
        "",
        "| target | run | wall (s) | goal (s) | met | gates | precision chosen |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['target']} | {r['run']} | {r['wall_s']:.0f} | {r['goal_s']:.0f} | {'yes' if r['met'] else 'no'} | "
            f"{'pass' if r['passed'] else 'FAIL'} | {_precision(r['precision'], r.get('embedding', {}))} |"
        )
    names = list(dict.fromkeys(k for r in result["runs"] for k in r["stages"]))
    header = "| stage | " + " | ".join(r["target"] for r in result["runs"]) + " |"
    lines += [
        "",
        "Stages (s). Where the host has two CPUs, ExecuTorch's export runs in a child process beside "
        "onnxruntime's export and then its validation, so those rows do not add up:",
        "",
        header,
    ]
    lines.append("|---|" + "---:|" * len(result["runs"]))
    for name in names:
        cells = [f"{r['stages'][name]:.0f}" if name in r["stages"] else "-" for r in result["runs"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
