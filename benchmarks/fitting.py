"""Fitting by the cheapest loss (issue 17): the plan ``precision: auto`` picks against the alternatives,
each measured in its own runtime.

For every (model, target) it runs the pipeline three times, into one folder per plan:

- ``auto``: the profile as shipped (``precision: auto``: precision per component and pruning chosen
  together);
- ``fixed``: the profile's fixed precision (``--precision fp32``: its ``quantize:`` pins, fp32 for the
  rest), pruned to fit, as prunefit did before ``auto``;
- ``quant``: quantization only: every free component at its smallest scheme (what ``auto`` may reach
  at most), precision fixed there, pruned only if even that does not fit.

Each row is the exported artifact measured in its runtime (validation's own numbers from
``report.json``): WikiText-2 test perplexity and its ratio to the dense fp32 model, the measured
peak against the memory model's prediction, the size and decode speed. A plan that cannot fit is a
row with the pipeline's own error (an infeasible budget stops before any export).

    python benchmarks/fitting.py                                    # SmolLM2 on android, rpi4, android-go
    python benchmarks/fitting.py --models gemma=/path/gemma-3-270m-q4_k_m.gguf --targets android
    python benchmarks/fitting.py --plans auto,quant --out /tmp/fitting

When ``auto`` stops because some runtimes' precisions that fit miss the quality gates, its error names
the runtimes estimated to pass on their own; that run (``--runtimes``) is a row of its own,
``auto (<runtimes> alone)``.

Goals: android with SmolLM2 <= 1.05x dense perplexity; ``auto`` <= every alternative that fits;
Gemma 3 270M fits android, rpi4 and android-go at <= 1.3x (per runtime where ``auto`` stopped on
some); predicted memory within +-10% of measured. Writes ``benchmarks/results/fitting.{json,md}`` (merged
with the rows already there, so models and targets can be run in separate sessions).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.fsio import atomic_write_json, atomic_write_text  # noqa: E402
from core.schemes import precision_text, smallest_embedding_scheme, smallest_scheme  # noqa: E402
from targets.profile import load_profile  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"
PLANS = ("auto", "fixed", "quant")
log = logging.getLogger("bench.fitting")


def quant_only_profile(target: str, work: Path) -> Path:
    """``target``'s profile with every free component at its smallest scheme and nothing left for
    ``auto`` to choose (written under ``work``, named as the profile so its stem check passes)."""
    profile = load_profile(target)
    tables = {rt: smallest_embedding_scheme(rt) for rt in profile.runtimes}
    profile = profile.with_quantize(
        {rt: smallest_scheme(rt) for rt in profile.runtimes}, {rt: s for rt, s in tables.items() if s is not None}
    )
    data = profile.model_copy(update={"precision": "fp32"}).model_dump(mode="json")
    path = work / "profiles" / f"{profile.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_plan(
    model: str | None, target: str, plan: str, out: Path, samples: int, runtimes: str | None = None
) -> dict[str, Any]:
    """One pipeline run (``runtimes``: only these of the profile's); its report's numbers, or the error
    it stopped with."""
    target_arg = str(quant_only_profile(target, out)) if plan == "quant" else target
    cmd = [sys.executable, "-m", "pipeline.cli", "export", "--target", target_arg, "--out", str(out / "run")]
    cmd += ["--model", model] if model else []
    cmd += ["--precision", "fp32"] if plan == "fixed" else []
    cmd += ["--runtimes", runtimes] if runtimes else []
    cmd += ["--calib", str(WIKI / "wiki.valid.tokens"), "--num-samples", str(samples), "--seq-len", "128"]
    cmd += ["--eval", str(WIKI / "wiki.test.tokens"), "--eval-samples", "16", "--eval-seq-len", "512"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "run" / "report.json").unlink(missing_ok=True)  # a gate failure still writes one: never a stale one
    t0 = time.perf_counter()
    with (out / "run.log").open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False)
    wall = round(time.perf_counter() - t0, 1)
    report_path = out / "run" / "report.json"
    if not report_path.is_file():  # stopped before validation (an infeasible budget, a failed export)
        lines = (out / "run.log").read_text(errors="replace").strip().splitlines()
        error = next((line for line in reversed(lines) if "error (" in line), " ".join(lines[-3:]))  # the whole message
        return {"error": error, "exit": proc.returncode, "wall_s": wall}
    return summarize(json.loads(report_path.read_text()), wall)


def summarize(report: dict[str, Any], wall: float) -> dict[str, Any]:
    """What the table shows of one run's report."""
    val, prune, prof = report["validation"], report["prune"], report["profile"]
    ppl = val["perplexity"]
    runtimes = {}
    for rt in val["runtimes"]:
        name = rt["runtime"]
        exported = ppl.get(f"exported[{name}]")
        runtimes[name] = {
            "precision": precision_text(
                prof.get("quantize", {}).get(name, "fp32"),
                prof.get("quantize_embedding", {}).get(name),
                prof.get("quantize_head", {}).get(name),
            ),
            "ppl": exported,
            "ppl_ratio": exported / ppl["dense"] if exported and ppl.get("dense") else None,
            "measured_mib": rt["measured"]["model_peak_mib"],
            "predicted_mib": rt["predicted_model_peak_mib"],
            "prediction_error": rt["prediction_error"],
            "projected_peak_mib": rt["projected_peak_mib"],
            "size_mib": rt["size_mib"],
            "decode_tok_s": rt["measured"].get("decode_tokens_per_s"),
        }
    for gate in val["gates"]:  # a run killed at the budget has no measurement: its gate says so
        name = gate["name"].removeprefix("memory[").rstrip("]")
        if gate["name"].startswith("memory[") and name not in runtimes:
            runtimes[name] = {"killed": gate["detail"]}
    return {
        "budget_mib": prof["memory_budget_mib"],
        "dense_ppl": ppl.get("dense"),
        "params_removed": 1 - prune["params_after"] / prune["params_before"],
        "passed": val["passed"],
        "runtimes": runtimes,
        "wall_s": wall,
    }


# The gates' error of a run whose runtimes do not all pass names those that would, alone
# (pipeline/fit/plan.py: "... RUNTIMES=executorch (or --runtimes executorch: ...").
ALONE = re.compile(r"RUNTIMES=([a-z,]+) \(or --runtimes")


def runtimes_alone(row: dict[str, Any] | None) -> str | None:
    """The runtimes an ``auto`` row's gates' error names as passing on their own, or None."""
    found = ALONE.search(row.get("error", "")) if row else None
    return found.group(1) if found else None


def alone_plan(runtimes: str) -> str:
    return f"auto ({runtimes} alone)"


def same_as_auto(auto: dict[str, Any] | None) -> bool:
    """Whether ``fixed`` would rebuild ``auto``'s artifacts: ``auto`` kept every runtime fp32 and pruned
    nothing, so fp32 fits unpruned and ``fixed`` (fp32, pruned only to fit) is the same plan."""
    if not auto or "error" in auto or auto["params_removed"] > 0:
        return False
    return all(x.get("precision") == "fp32" for x in auto["runtimes"].values())


PPL_NOISE = 0.005  # two artifacts of one precision differ by ~0.3% in perplexity across runtimes and runs
GEMMA_TARGETS = ("android", "rpi4", "android-go")


def _fits(x: dict[str, Any], budget: float) -> bool:
    return "killed" not in x and x["projected_peak_mib"] <= budget


def goals(rows: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The issue's goals, each checked on the rows there are: (goal, what was measured, met; None
    where no row measures it)."""
    out: list[tuple[str, str, bool | None]] = []
    smol = rows.get("smollm2|android|auto", {})
    worst = max((x["ppl_ratio"] for x in smol.get("runtimes", {}).values() if x.get("ppl_ratio")), default=None)
    out.append(("smollm2 android: auto <= 1.05x dense", _f(worst, ".3f"), None if worst is None else worst <= 1.05))
    for key in sorted(k for k in rows if k.endswith("|auto") and "error" not in rows[k]):
        model, target, _ = key.split("|")
        auto = rows[key]
        for plan in ("fixed", "quant"):
            alt = rows.get(f"{model}|{target}|{plan}")
            if not alt or "error" in alt or alt.get("same_as"):
                continue
            budget = alt.get("budget_mib") or auto["budget_mib"]  # rows before budget_mib was recorded
            for rt, x in auto["runtimes"].items():
                y = alt["runtimes"].get(rt)
                if not y or "killed" in y or not _fits(y, budget) or not x.get("ppl_ratio"):
                    continue
                ok = x["ppl_ratio"] <= y["ppl_ratio"] * (1 + PPL_NOISE)
                text = f"{x['ppl_ratio']:.3f} vs {y['ppl_ratio']:.3f}"
                out.append((f"{model} {target} {rt}: auto <= {plan} (which fits)", text, ok))
    for target in GEMMA_TARGETS:
        r = rows.get(f"gemma-3-270m|{target}|auto")
        alone = runtimes_alone(r)
        if r is None:
            out.append((f"gemma {target}: fits at <= 1.3x dense", "not run", None))
        elif alone:  # per runtime: those the error names as passing, measured alone; the others infeasible
            a = rows.get(f"gemma-3-270m|{target}|{alone_plan(alone)}")
            for rt in load_profile(target).runtimes:
                goal = f"gemma {target} {rt}: fits at <= 1.3x dense"
                if rt not in alone.split(","):
                    out.append((goal, "infeasible within the gates (error before export)", False))
                elif a is None or "error" in a or rt not in a["runtimes"]:
                    out.append((goal, "not run alone" if a is None else "error", None if a is None else False))
                else:
                    ratio = a["runtimes"][rt].get("ppl_ratio") or math.inf
                    out.append((goal, f"{ratio:.3f} alone, gates {a['passed']}", a["passed"] and ratio <= 1.3))
        elif "error" in r:
            out.append((f"gemma {target}: fits at <= 1.3x dense", "infeasible (error before export)", False))
        else:
            worst = max(x.get("ppl_ratio") or math.inf for x in r["runtimes"].values())
            out.append((f"gemma {target}: fits at <= 1.3x dense", f"{worst:.3f}, gates {r['passed']}",
                        r["passed"] and worst <= 1.3))  # fmt: skip
    errors = [
        (key, rt, x["prediction_error"]) for key, r in rows.items() if "error" not in r and not r.get("same_as")
        for rt, x in r["runtimes"].items() if "killed" not in x
    ]  # fmt: skip
    outside = [f"{k.replace('|', ' ')} {rt} {e:+.1%}" for k, rt, e in errors if abs(e) > 0.10]
    out.append(("predicted memory within +-10% on every row", "; ".join(outside) or f"all {len(errors)}", not outside))
    return out


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(rows: dict[str, Any]) -> str:
    lines = [
        "# Fitting: the plan `precision: auto` picks vs the alternatives",
        "",
        "Each artifact measured in its own runtime (validation's numbers): WikiText-2 test perplexity",
        "(16 x 512 tokens) over the dense fp32 model's, the run's peak vs the memory model's prediction.",
        "`fixed`: the profile's fixed precision, pruned to fit; `quant`: every component at its smallest",
        "scheme, pruned only if that does not fit. `python benchmarks/fitting.py`.",
        "",
        "| model | target | plan | runtime | precision | params removed | PPL | x dense | measured MiB | "
        "predicted MiB | error | size MiB | decode tok/s | gates |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in sorted(rows):
        model, target, plan = key.split("|")
        r = rows[key]
        plan = f"{plan} (= auto, not re-run)" if r.get("same_as") else plan
        if "error" in r:
            lines.append(f"| {model} | {target} | {plan} | - | - | - | - | - | - | - | - | - | - | {r['error']} |")
            continue
        for rt, x in r["runtimes"].items():
            if "killed" in x:
                dashes = " - |" * 9
                lines.append(f"| {model} | {target} | {plan} | {rt} |{dashes} {x['killed']} |")
                continue
            lines.append(
                f"| {model} | {target} | {plan} | {rt} | {x['precision']} | {r['params_removed']:.1%} | "
                f"{_f(x['ppl'], '.2f')} | {_f(x['ppl_ratio'], '.3f')} | {x['measured_mib']:.1f} | "
                f"{x['predicted_mib']:.1f} | {x['prediction_error']:+.1%} | {x['size_mib']:.1f} | "
                f"{_f(x['decode_tok_s'], '.1f')} | {'pass' if r['passed'] else 'FAIL'} |"
            )
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for goal, text, met in goals(rows):
        lines.append(f"| {goal} | {text} | {'-' if met is None else 'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="android,rpi4,android-go")
    ap.add_argument("--models", default="smollm2", help="name[=path] pairs; smollm2 is the default model")
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 128 tokens")
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench-fitting")
    ap.add_argument(
        "--record", action="append", default=[], metavar="MODEL|TARGET|PLAN=REPORT",
        help="add the row of a run made by hand (its report.json) instead of running it",
    )  # fmt: skip
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    json_path = RESULTS / "fitting.json"
    rows: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if args.record:
        for spec in args.record:
            key, _, report = spec.partition("=")
            rows[key] = summarize(json.loads(Path(report).read_text()), 0.0)
        atomic_write_json(json_path, rows)
        atomic_write_text(RESULTS / "fitting.md", markdown(rows))
        return
    for spec in args.models.split(","):
        name, _, path = spec.partition("=")
        for target in args.targets.split(","):
            for plan in args.plans.split(","):
                if plan not in PLANS:
                    raise SystemExit(f"unknown plan {plan!r}; use {', '.join(PLANS)}")
                key = f"{name}|{target}|{plan}"
                if plan == "fixed" and same_as_auto(rows.get(f"{name}|{target}|auto")):
                    log.info("%s on %s: fixed is auto's plan (fp32, nothing pruned); not re-run", name, target)
                    rows[key] = {**rows[f"{name}|{target}|auto"], "same_as": "auto", "wall_s": 0.0}
                else:
                    log.info("%s on %s, plan %s", name, target, plan)
                    rows[key] = run_plan(path or None, target, plan, args.out / name / target / plan,
                                         args.samples)  # fmt: skip
                alone = runtimes_alone(rows[key]) if plan == "auto" else None
                if alone:  # auto stopped on runtimes that miss the gates: what the others do alone
                    log.info("%s on %s: auto with %s alone (named by the gates' error)", name, target, alone)
                    rows[f"{name}|{target}|{alone_plan(alone)}"] = run_plan(
                        path or None, target, plan, args.out / name / target / f"auto-{alone}", args.samples, alone
                    )
                atomic_write_json(json_path, rows)
                atomic_write_text(RESULTS / "fitting.md", markdown(rows))
    log.info("wrote %s", RESULTS / "fitting.md")


if __name__ == "__main__":
    main()
