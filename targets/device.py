"""Merge a run on a real device (scripts/validate_ssh.sh, scripts/validate_android.sh) into a report.

The device ran ``targets/runner.py`` (copied there with ``core/measure.py``: they import only the
standard library, numpy and the runtime) on the same artifact and prompt as the local validation.
Its JSON (timings, peak RSS on the device) and its generation (logits, tokens) come back; this
module compares the tokens and logits with the local PyTorch reference the validation stored, adds
the run to ``report.json`` under ``device_runs`` and re-renders the report.

``python -m targets.device merge OUT_DIR --runtime R [--backend B] --label HOST --result device.json
--generation device.npz`` (``--backend onnxruntime-genai``: a GenAI folder, run by onnxruntime-genai's
Generator on the device as in the local validation)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError, PrunefitError
from targets.report import load_report, write_report
from targets.results import DeviceRun


def _load_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"Cannot read {path}: {exc}") from exc
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise ConfigError(f"{path} holds no JSON result from the device runner:\n{text[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def compare_with_local(out_dir: Path, runtime: str, generation_path: Path | None) -> dict[str, Any]:
    """Tokens and logits of a remote (or emulated) run against the local run of the same artifact
    on the same prompt; empty when either generation is missing."""
    local = out_dir / "validation" / f"{runtime}_generation.npz"
    if generation_path is None or not generation_path.is_file() or not local.is_file():
        return {}
    with np.load(generation_path) as dev, np.load(local) as ref:
        return {
            "tokens_equal_to_local_run": bool((dev["tokens"] == ref["tokens"]).all()),
            "max_abs_logit_diff_vs_local_run": float(np.abs(dev["prefill"] - ref["prefill"]).max()),
            "argmax_agreement_vs_local_run": float((dev["prefill"].argmax(-1) == ref["prefill"].argmax(-1)).mean()),
        }


def merge(
    out_dir: Path,
    runtime: str,
    label: str,
    result_path: Path,
    generation_path: Path | None,
    extra: dict[str, Any] | None = None,
    backend: str | None = None,
) -> dict[str, Any]:
    """Add one device run to ``out_dir/report.json``; returns the entry written. ``backend``: what ran
    the artifact where that is not the runtime's own session (``onnxruntime-genai``); the local run it
    is compared with is that backend's."""
    report = load_report(out_dir)
    result = _load_json(result_path)
    if "error" in result:
        raise ConfigError(f"The device runner failed on {label}: {result.get('message', result['error'])}")
    entry: dict[str, Any] = {
        "label": label,
        "runtime": runtime,
        **({"backend": backend} if backend else {}),
        "measured": result,
        **compare_with_local(out_dir, backend or runtime, generation_path),
        **(extra or {}),
    }
    runs = [r for r in report.device_runs if not (r.label == label and r.runtime == runtime)]
    write_report(out_dir, report.model_copy(update={"device_runs": [*runs, DeviceRun.model_validate(entry)]}))
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m targets.device", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge one device run into OUT_DIR/report.json")
    m.add_argument("out_dir", type=Path)
    m.add_argument("--runtime", required=True, choices=["onnxruntime", "executorch"])
    m.add_argument("--backend", choices=["onnxruntime-genai"], help="what ran a GenAI folder on the device")
    m.add_argument("--label", required=True, help="which device (host name, adb serial)")
    m.add_argument("--result", type=Path, required=True, help="the device runner's JSON output")
    m.add_argument("--generation", type=Path, help="the device runner's .npz (tokens and logits)")
    args = ap.parse_args(argv)
    try:
        entry = merge(args.out_dir, args.runtime, args.label, args.result, args.generation, backend=args.backend)
    except PrunefitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
