"""Calibration data for the run-time memory model's overhead terms (core/runtimes.py, core/schemes.py).

Each data point is one validated artifact: the terms the memory model predicts from the model's
shapes (weights as the runtime stores them, the KV cache the run held, one prefill chunk's
activations) and the model-attributable peak RSS the child-process runner measured
(``model_peak_mib``: VmHWM minus the host's baseline). What is left over,

    measured - weights - kv_held - activations
        = session_mib + gemm_transient_ratio x block weights + head_transient_ratio x lm_head weight,

is the runtime's own overhead; least squares through the points, per runtime, gives the three
constants. Points come from ``report.json`` files of earlier ``prunefit export`` runs
(``--reports artifacts/*/report.json``: the default model at several budgets and schemes) and, with
``--tiny``, from fresh runs of tiny models at several widths like the tests' (vocab 512: the
small-model end of the line). Not covered: small models with a large vocabulary, where the
validation runner's own copy of the prompt's logits (prompt x vocab x 4 bytes, kept for the parity
check) is a large share of the measured peak (tiny models with SmolLM2's 49152-token vocabulary
measured 14-52% over the prediction).

Writes ``benchmarks/results/memory_calibration.{json,md}``: every point, its error under the
committed constants, and the fitted constants. ``tests/targets/test_budget_calibration.py``
holds the committed constants to the goal (every point within +-10%) on the committed data, so a
change to the memory model that breaks the calibration fails a test.

    python benchmarks/memory_calibration.py --reports artifacts/*/report.json --tiny
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
WIKI = ROOT.parent.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "results"
log = logging.getLogger("bench.memory_calibration")

# Tiny Llama models like the tests' (vocab 512; hidden, intermediate, layers, tied lm_head, the
# onnxruntime scheme): the small-weights end, fp32 on both runtimes; one untied model (its
# embedding is only gathered from); int8w on onnxruntime (its own constants).
TINY = [
    (64, 128, 4, True, None), (256, 768, 4, True, None), (512, 1536, 8, True, None), (768, 2048, 8, True, None),
    (512, 1536, 8, False, None),
    (256, 768, 4, True, "int8w"), (512, 1536, 8, True, "int8w"), (768, 2048, 8, True, "int8w"),
]  # fmt: skip


def points_from_report(path: Path) -> list[dict[str, Any]]:
    """One point per runtime measured in a report (runs killed at the budget have no measurement)."""
    report = json.loads(path.read_text())
    model = str(report.get("model", "?"))
    out = []
    for r in report["validation"].get("runtimes", []):
        pred = r["predicted"]
        scheme = report["profile"].get("quantize", {}).get(r["runtime"])
        out.append(
            {
                "source": str(path.parent.name),
                "model": Path(model).name,
                "runtime": r["runtime"],
                "scheme": scheme or "fp32",
                "context": report["profile"]["context_length"],
                "weights_mib": pred["weights_mib"],
                "block_weights_mib": pred["block_weights_mib"],
                "head_weights_mib": pred["head_weights_mib"],
                "kv_held_mib": pred["kv_cache_mib"] - r.get("kv_cache_not_held_mib", 0.0),
                "activations_mib": pred["activations_mib"],
                "measured_model_peak_mib": r["measured"]["model_peak_mib"],
            }
        )
    return out


def tiny_points(work: Path) -> list[dict[str, Any]]:
    """Fresh runs of tiny models through the whole pipeline (unpruned: a generous x86 profile)."""
    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.errors import GateError
    from pipeline.data import DataConfig
    from pipeline.run import EvalConfig, RunConfig, run_pipeline
    from tests.conftest import make_tokenizer

    tok = make_tokenizer()  # the tests' tiny BPE (vocab 512)
    profile = {
        "name": "calib", "device": "memory calibration host", "cpu": {"arch": "x86_64", "cores": 2},
        "ram_mib": 8192, "memory_budget_mib": 4096, "context_length": 256, "prefill_tokens": 64,
        "runtimes": ["onnxruntime", "executorch"], "threads": 1, "gates": {"max_ppl_ratio": 100.0},
        "runtime_overhead_mib": {"onnxruntime": 0.0, "executorch": 0.0},
    }  # fmt: skip
    (work / "calib.yaml").write_text(yaml.safe_dump(profile))
    quantized = {**profile, "name": "calib-int8w", "runtimes": ["onnxruntime"], "quantize": {"onnxruntime": "int8w"}}
    (work / "calib-int8w.yaml").write_text(yaml.safe_dump(quantized))
    points = []
    for hidden, inter, layers, tied, scheme in TINY:
        name = f"tiny-llama-h{hidden}-i{inter}-l{layers}" + ("" if tied else "-untied")
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=512,
        )  # fmt: skip
        model_dir = work / name
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        run = RunConfig(
            target=str(work / ("calib-int8w.yaml" if scheme else "calib.yaml")),
            model=str(model_dir),
            out_dir=work / f"out-{name}-{scheme or 'fp32'}",
            calib=DataConfig(source=str(WIKI / "wiki.valid.tokens"), num_samples=2, seq_len=64),
            eval=EvalConfig(source=str(WIKI / "wiki.test.tokens"), num_samples=2, seq_len=64),
        )
        try:
            run_pipeline(run)
        except GateError as exc:  # random weights: quality gates are not the point here
            log.info("%s: %s", name, exc)
        for p in points_from_report(work / f"out-{name}-{scheme or 'fp32'}" / "report.json"):
            points.append({**p, "source": "tiny", "model": name})
        log.info("%s done", name)
    return points


TERMS = ("session_mib", "gemm_transient_ratio", "head_transient_ratio")


def _overhead(p: dict[str, Any]) -> float:
    return p["measured_model_peak_mib"] - p["weights_mib"] - p["kv_held_mib"] - p["activations_mib"]


def group(p: dict[str, Any]) -> str:
    """Which constants a point calibrates: its scheme's own when the scheme table has them
    (``core.schemes``), else its runtime's (``core.runtimes``)."""
    from core.schemes import SCHEME_TABLE

    spec = SCHEME_TABLE.get(p["scheme"])
    return f"{p['runtime']}/{p['scheme']}" if spec is not None and spec.cost is not None else p["runtime"]


def fit(points: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Least squares of overhead = session + a x block weights + b x lm_head weight, per group,
    in relative terms (each residual divided by the point's measured peak): the goal is a relative
    error per point, and plain least squares let the 2-MiB models miss by 12-16% to fit the
    700-MiB ones 1% closer."""
    out: dict[str, dict[str, float]] = {}
    for g in sorted({group(p) for p in points}):
        pts = [p for p in points if group(p) == g]
        a = np.array([[1.0, p["block_weights_mib"], p["head_weights_mib"]] for p in pts])
        y = np.array([_overhead(p) for p in pts])
        w = 1.0 / np.array([p["measured_model_peak_mib"] for p in pts])
        coef, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
        out[g] = {**{t: float(c) for t, c in zip(TERMS, coef, strict=True)}, "points": len(pts)}
    return out


def committed_cost(g: str) -> Any:
    from core.schemes import runtime_cost

    runtime, _, scheme = g.partition("/")
    return runtime_cost(runtime, scheme or None)  # type: ignore[arg-type]


def predicted_model_peak(p: dict[str, Any]) -> float:
    """What the committed memory model predicts for a point's measured share (no library term)."""
    overhead = committed_cost(group(p)).loaded_overhead_mib(p["block_weights_mib"], p["head_weights_mib"])
    return p["weights_mib"] + p["kv_held_mib"] + p["activations_mib"] + overhead


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reports", nargs="*", type=Path, default=[], help="report.json files of earlier exports")
    ap.add_argument("--tiny", action="store_true", help="also run tiny models through the pipeline")
    ap.add_argument("--keep", type=Path, default=RESULTS / "memory_calibration.json",
                    help="merge with the points already in this file (same source/model/runtime replaced)")  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    points: list[dict[str, Any]] = []
    if args.keep.is_file():
        points = json.loads(args.keep.read_text())["points"]
    new = [p for r in args.reports for p in points_from_report(r)]
    if args.tiny:
        with tempfile.TemporaryDirectory(prefix="prunefit-calib-") as tmp:
            new += tiny_points(Path(tmp))

    def key(p: dict[str, Any]) -> tuple[str, ...]:
        return (p["source"], p["model"], p["runtime"], p["scheme"])

    merged = {key(p): p for p in points}
    merged.update({key(p): p for p in new})
    points = sorted(merged.values(), key=lambda p: (p["runtime"], p["weights_mib"]))
    for p in points:
        p["predicted_model_peak_mib"] = predicted_model_peak(p)
        p["error"] = p["measured_model_peak_mib"] / p["predicted_model_peak_mib"] - 1.0
    committed = {g: {t: getattr(committed_cost(g), t) for t in TERMS} for g in sorted({group(p) for p in points})}
    result = {
        "fit": fit(points),
        "committed": committed,
        "max_abs_error": max(abs(p["error"]) for p in points),
        "points": points,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_calibration.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Memory model calibration", "",
        "Model-attributable peak RSS measured by the runner vs what targets/budget.py predicts for it "
        "(weights + KV cache held + activations + session + transients x block weights and x lm_head). "
        "Goal: every point within +-10%.",
        "", "| source | model | runtime | scheme | weights MiB | of which blocks | lm_head read | KV held MiB | "
        "measured MiB | predicted MiB | error |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    lines += [
        f"| {p['source']} | {p['model']} | {p['runtime']} | {p['scheme']} | {p['weights_mib']:.1f} | "
        f"{p['block_weights_mib']:.1f} | {p['head_weights_mib']:.1f} | "
        f"{p['kv_held_mib']:.1f} | {p['measured_model_peak_mib']:.1f} | {p['predicted_model_peak_mib']:.1f} | "
        f"{p['error']:+.1%} |"
        for p in points
    ]
    lines += ["", "| constants | | session MiB | x block weights | x lm_head |", "|---|---|---:|---:|---:|"]
    for rt, f in result["fit"].items():
        c = result["committed"][rt]
        for label, v in (("fitted", f), ("committed", c)):
            lines.append(f"| {rt} | {label} | " + " | ".join(f"{v[t]:.3f}" for t in TERMS) + " |")
    (RESULTS / "memory_calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
