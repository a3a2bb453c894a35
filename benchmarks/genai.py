"""onnx_format: genai against onnxruntime-genai's own builder (issue 18), on the default model.

SmolLM2-135M dense (and pruned to 20% of decoder parameters by ``comp``, per-layer widths), exported
in one run by:

- ``builder``: ``python -m onnxruntime_genai.models.builder -i DENSE_HF_DIR -p fp32|int4 -e cpu``,
  the peer, as a user would call it (its ``search.max_length`` set to the same context, 1024, so both
  Generators allocate the same shared cache);
- ``prunefit-genai``: prunefit's GenAI exporter (the builder hooked for pruned shapes), fp32 and
  ``int4w`` (MatMulNBits 4-bit, blocks of 32, accuracy level 4: the builder's int4 default but for
  its block size), dense and pruned;
- ``prunefit-onnx``: prunefit's plain torch.onnx graph (``onnx_format: onnx``), dense fp32, run in a
  plain session: the format the GenAI path is compared with for the default.

Every GenAI folder runs through onnxruntime-genai's Generator in ``targets.runner`` (2 threads): load
time, prefill of a 128-token WikiText-2 prompt, decode tokens/s over 32 greedy tokens, the run's
peak RSS, and the tokens. ``--rounds`` rounds (default 3) run every artifact once each, in an order
rotated by one per round; an artifact's figure is its median over rounds, and each compared pair's
ratio is the median of its per-round ratios (both measured in the same round).

Decode ratios are also taken paired (``--paired N``, default 4 runs; ``benchmarks/paired_decode.py``:
both artifacts loaded in two lockstep processes, their decode steps interleaved one by one, the
start order alternating between runs, the geometric mean of the runs' medians). On this shared
2-core machine the rotated rounds alone spread by 10-30% at int4's ~8 ms/token (session 17: the
same int4 graph read 0.77x and 0.95x the builder's in two runs); the paired figure is the goal's.

Goals: prunefit's dense decode and prefill >= 1.0x the builder's at fp32 and at int4; export time
<= 2x the builder's; the same greedy tokens at fp32; run peak <= the builder's + 5%; pruned 20%
decode >= 0.95 x dense / (1 - bytes removed). Results: benchmarks/results/genai.{json,md}.

    python benchmarks/genai.py [--rounds 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.export import CONTEXT, _child, paired, prepare, run  # noqa: E402
from core.fsio import atomic_write_json, atomic_write_text  # noqa: E402

log = logging.getLogger("bench.genai")


def builder_export(work: Path, precision: str) -> dict[str, Any]:
    """The peer: onnxruntime-genai's builder CLI on the dense HF folder (argument list, no shell)."""
    out = work / f"builder-{precision}"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "dense"), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(work / "hf-cache")]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    export_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"builder {precision} failed:\n{proc.stderr[-3000:]}")
    config = json.loads((out / "genai_config.json").read_text())
    config["search"]["max_length"] = CONTEXT
    (out / "genai_config.json").write_text(json.dumps(config, indent=4))
    return {"path": str(out / "model.onnx"), "export_s": export_s, "size_mib": _size(out)}


def prunefit_export(work: Path, variant: str, fmt: str, quantize: str | None) -> dict[str, Any]:
    """prunefit's exporter in its own process (its time and memory its own): export.py's child."""
    return _child([variant, "onnxruntime", str(work), quantize or "-", "1", fmt])


def _size(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, help="keep the models and artifacts here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--paired", type=int, default=4, help="paired decode runs per compared pair (0: none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="prunefit-genai-"))
    work.mkdir(parents=True, exist_ok=True)
    meta = prepare(work, 0.2, ["comp"]) if not (work / "pruned-comp").is_dir() else {}
    arts: dict[str, dict[str, Any]] = {}
    arts["builder fp32"] = builder_export(work, "fp32")
    arts["builder int4"] = builder_export(work, "int4")
    arts["prunefit-genai fp32"] = prunefit_export(work, "dense", "genai", None)
    arts["prunefit-genai int4w"] = prunefit_export(work, "dense", "genai", "int4w")
    arts["prunefit-genai fp32, comp 20%"] = prunefit_export(work, "pruned-comp", "genai", None)
    arts["prunefit-onnx fp32"] = prunefit_export(work, "dense", "onnx", None)
    for name, a in arts.items():
        log.info("%s: exported in %.1f s, %.1f MiB", name, a["export_s"], a["size_mib"])
    names = list(arts)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            tag = name.replace(" ", "_").replace(",", "").replace("%", "")
            results[name].append(run(_backend(name), arts[name]["path"], work, tag))
            log.info("round %d %s: %.1f tok/s", r, name, results[name][-1]["decode_tokens_per_s"])
    rows = {n: _row(arts[n], results[n]) for n in names}

    def ratio(a: str, b: str, key: str) -> float:
        return statistics.median(x[key] / y[key] for x, y in zip(results[a], results[b], strict=True))

    import numpy as np

    def tokens(tag: str) -> list[int]:
        with np.load(work / f"{tag}.npz") as f:
            return [int(t) for t in f["tokens"][0]]

    dense_mib = arts["prunefit-genai fp32"]["size_mib"]
    removed = 1 - arts["prunefit-genai fp32, comp 20%"]["size_mib"] / dense_mib
    goals = {
        "decode fp32 vs builder": ratio("prunefit-genai fp32", "builder fp32", "decode_tokens_per_s"),
        "decode int4 vs builder": ratio("prunefit-genai int4w", "builder int4", "decode_tokens_per_s"),
        "prefill fp32 vs builder (time, lower is better)": ratio("prunefit-genai fp32", "builder fp32", "prefill_s"),
        "prefill int4 vs builder (time, lower is better)": ratio("prunefit-genai int4w", "builder int4", "prefill_s"),
        "export time fp32 vs builder": arts["prunefit-genai fp32"]["export_s"] / arts["builder fp32"]["export_s"],
        "peak fp32 vs builder": rows["prunefit-genai fp32"]["peak_mib"] / rows["builder fp32"]["peak_mib"],
        "peak int4 vs builder": rows["prunefit-genai int4w"]["peak_mib"] / rows["builder int4"]["peak_mib"],
        "same greedy tokens fp32": tokens("prunefit-genai_fp32") == tokens("builder_fp32"),
        "pruned decode vs dense": ratio("prunefit-genai fp32, comp 20%", "prunefit-genai fp32", "decode_tokens_per_s"),
        "pruned decode goal (0.95 / (1 - bytes removed))": 0.95 / (1 - removed),
        "genai vs plain onnx decode fp32": ratio("prunefit-genai fp32", "prunefit-onnx fp32", "decode_tokens_per_s"),
    }
    pairs = {
        "decode fp32 vs builder, paired": ("prunefit-genai fp32", "builder fp32"),
        "decode int4 vs builder, paired": ("prunefit-genai int4w", "builder int4"),
        "pruned decode vs dense, paired": ("prunefit-genai fp32, comp 20%", "prunefit-genai fp32"),
        "genai vs plain onnx decode fp32, paired": ("prunefit-genai fp32", "prunefit-onnx fp32"),
    }
    runs: dict[str, list[float]] = {}
    for goal, (a, b) in pairs.items() if args.paired else ():
        res = paired((_backend(a), arts[a]["path"]), (_backend(b), arts[b]["path"]), work, args.paired)
        goals[goal] = 1 / res["ratio"]  # paired_decode's ratio is time per token A / B; goals are speed
        runs[goal] = [1 / x for x in res["run_ratios"]]
        log.info("%s: %.3f (runs %s)", goal, goals[goal], ", ".join(f"{x:.3f}" for x in runs[goal]))
    result = {"rows": rows, "goals": goals, "paired_runs": runs, "meta": meta, "rounds": args.rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "genai.json", result)
    atomic_write_text(args.out / "genai.md", markdown(rows, goals, args.rounds))
    log.info("wrote %s", args.out / "genai.md")


def _backend(name: str) -> str:
    """What runs an artifact of the table: the plain graph a session, GenAI folders the Generator."""
    return "onnxruntime" if name.startswith("prunefit-onnx") else "onnxruntime-genai"


def _row(art: dict[str, Any], res: list[dict[str, Any]]) -> dict[str, Any]:
    med = lambda k: statistics.median(r[k] for r in res)  # noqa: E731
    return {
        "export_s": art["export_s"], "size_mib": art["size_mib"], "load_s": med("load_s"),
        "prefill_s": med("prefill_s"), "decode_tokens_per_s": med("decode_tokens_per_s"),
        "peak_mib": med("model_peak_mib"),
    }  # fmt: skip


def markdown(rows: dict[str, dict[str, Any]], goals: dict[str, Any], rounds: int) -> str:
    lines = [
        "# GenAI format vs onnxruntime-genai's builder (SmolLM2-135M)",
        "",
        f"Each artifact in its runtime ({rounds} rotated rounds, medians; 2 threads; 128-token prompt, 32 greedy "
        "tokens, context 1024). GenAI folders run through onnxruntime-genai's Generator; `prunefit-onnx` "
        "(torch.onnx's graph) in a plain session. `python benchmarks/genai.py`.",
        "",
        "| artifact | export s | size MiB | load s | prefill ms | decode tok/s | model peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['export_s']:.1f} | {r['size_mib']:.1f} | {r['load_s']:.2f} | {r['prefill_s'] * 1e3:.0f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['peak_mib']:.1f} |"
        )
    lines += [
        "",
        "Ratios are prunefit's over the other's (speed for decode, time for prefill); `paired`: decode steps "
        "interleaved in two lockstep processes (see the module docstring), the goals' figure.",
        "",
        "| goal | measured |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v if isinstance(v, bool) else f'{v:.3f}'} |" for k, v in goals.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
