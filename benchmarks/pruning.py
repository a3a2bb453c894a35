"""Pruning benchmark on the default model: every method side by side in one run.

SmolLM2-135M (the embedded default), calibration = 32 x 128-token windows of WikiText-2 valid,
perplexity = first 16 x 512 tokens of WikiText-2 test. At 10/20/30% of decoder-block parameters
removed (the share of all parameters is reported too):

- dense
- ``shortgpt``: one-shot Block Influence (1 - cos(in, out)), drop the lowest blocks
- ``blockpruner``: greedy block removal by calibration perplexity (one forward per candidate)
- ``magnitude``: MLP-channel / KV-group removal by weight L2 norm, no data, no compensation
- ``wanda``: structured Wanda score sum |W| * ||X||, no compensation
- ``depth`` (prunefit): iterative Block Influence
- ``width-nocomp`` / ``width`` (prunefit): residual-energy scores, balanced floor, with and
  without least-squares compensation

Columns: test perplexity, pruning wall time, pruning peak RSS (VmHWM reset per method), parameters
and fp32 bytes removed. Writes benchmarks/results/pruning.{json,md}. ``--quick`` = 10% only.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.arch import decoder_layers
from pipeline.data import first_windows, read_text, tokenize_windows
from pipeline.evaluate import perplexity
from pipeline.model import load_model
from pipeline.prune import PruneConfig, block_influence, prune_to_budget
from pipeline.rewrite import remove_layers
from targets.profile import load_profile

ROOT = Path(__file__).resolve().parent
WIKI = ROOT.parent.parent / "shared" / "data" / "wikitext-2"
log = logging.getLogger("bench")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def drop_blocks_until(model: Any, ratio: float, pick: Any) -> None:
    dense = sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())
    while dense - sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters()) < ratio * dense:
        remove_layers(model, [pick(model)])


def shortgpt(model: Any, calib: torch.Tensor, ratio: float) -> None:
    scores = block_influence(model, calib, 8)
    order = sorted(range(len(scores)), key=scores.__getitem__)
    original = list(range(len(scores)))

    def pick(m: Any) -> int:
        kept = (m.config.prunefit or {}).get("kept_layers", original) if hasattr(m.config, "prunefit") else original
        return kept.index(next(o for o in order if o in kept))

    drop_blocks_until(model, ratio, pick)


def blockpruner(model: Any, calib: torch.Tensor, ratio: float) -> None:
    sub = calib[:8]

    def pick(m: Any) -> int:
        layers = decoder_layers(m)
        best, best_ppl = 0, float("inf")
        for i in range(len(layers)):
            m.model.layers = torch.nn.ModuleList([x for j, x in enumerate(layers) if j != i])
            m.config.num_hidden_layers = len(layers) - 1
            ppl = perplexity(m, sub, batch_size=8, desc=f"candidate {i}")
            if ppl < best_ppl:
                best, best_ppl = i, ppl
        m.model.layers, m.config.num_hidden_layers = layers, len(layers)
        return best

    drop_blocks_until(model, ratio, pick)


def via_prunefit(**kw: Any) -> Any:
    def run(model: Any, calib: torch.Tensor, ratio: float) -> None:
        prune_to_budget(
            model, calib, PROFILE, PruneConfig(target_decoder_ratio=ratio, max_removed_layer_ratio=0.9, **kw)
        )

    return run


PROFILE = load_profile("android")  # only used for its width multiple here (ratio targets ignore the budget)
METHODS = {
    "shortgpt": shortgpt,
    "blockpruner": blockpruner,
    "magnitude": via_prunefit(method="width", score="magnitude", compensate=False),
    "wanda": via_prunefit(method="width", score="wanda", compensate=False),
    "depth": via_prunefit(method="depth"),
    "width-nocomp": via_prunefit(method="width", compensate=False),
    "width": via_prunefit(method="width"),
    "comp-nocomp": via_prunefit(method="comp", compensate=False),
    "comp": via_prunefit(method="comp"),
    "comp-widthonly": via_prunefit(method="comp", comp_blocks=False),
    "comp-residual": via_prunefit(method="comp", comp_target="residual"),
    "comp-residual-widthonly": via_prunefit(method="comp", comp_target="residual", comp_blocks=False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="10%% only, 4 eval windows")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratios", default="0.1,0.2,0.3", help="shares of decoder parameters to remove")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("torchao", "pipeline.prune"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.manual_seed(0)
    loaded = load_model()
    tok = loaded.tokenizer
    calib = tokenize_windows(read_text(str(WIKI / "wiki.valid.tokens")), tok, 32, 128, 0, where="valid")
    evals = first_windows(read_text(str(WIKI / "wiki.test.tokens")), tok, 4 if args.quick else 16, 512, where="test")
    dense_model = loaded.model
    total = sum(p.numel() for p in dense_model.parameters())
    dec = sum(p.numel() for layer in decoder_layers(dense_model) for p in layer.parameters())
    rows: list[dict[str, Any]] = [{"method": "dense", "target": 0.0, "test_ppl": perplexity(dense_model, evals)}]
    for ratio in (0.1,) if args.quick else [float(r) for r in args.ratios.split(",")]:
        for name in args.methods.split(","):
            model = copy.deepcopy(dense_model)
            _reset_peak()
            base = _status_mib("VmRSS")
            t0 = time.perf_counter()
            METHODS[name](model, calib, ratio)
            wall = time.perf_counter() - t0
            peak = _status_mib("VmHWM") - base
            params = sum(p.numel() for p in model.parameters())
            row = {
                "method": name, "target": ratio, "test_ppl": perplexity(model, evals), "prune_wall_s": wall,
                "prune_peak_rss_over_start_mib": peak, "decoder_params_removed": (total - params) / dec,
                "all_params_removed": (total - params) / total, "bytes_removed_fp32": 4 * (total - params),
            }  # fmt: skip
            rows.append(row)
            log.info("%s @%.0f%%: ppl %.2f, %.1fs, +%.0f MiB", name, 100 * ratio, row["test_ppl"], wall, peak)
            write(args.out, rows)
            del model
    write(args.out, rows)


def write(out: Path, rows: list[dict[str, Any]]) -> None:
    """Write JSON + Markdown (called after every row, so a long run keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning.json").write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "rows": rows}, indent=2))
    dense_ppl = rows[0]["test_ppl"]
    lines = [
        f"Dense WikiText-2 test perplexity: {dense_ppl:.2f}",
        "",
        "| target | method | decoder params removed | all params removed | test PPL | PPL / best baseline "
        "| prune wall (s) | prune peak RSS above start (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    baselines = {"shortgpt", "blockpruner", "magnitude", "wanda"}
    for ratio in sorted({r["target"] for r in rows if r["target"]}):
        group = [r for r in rows if r["target"] == ratio]
        best = min((r["test_ppl"] for r in group if r["method"] in baselines), default=float("nan"))
        for r in group:
            lines.append(
                f"| {ratio:.0%} | {r['method']} | {r['decoder_params_removed']:.1%} | {r['all_params_removed']:.1%} | "
                f"{r['test_ppl']:.2f} | {r['test_ppl'] / best:.2f}x | {r['prune_wall_s']:.1f} | "
                f"{r['prune_peak_rss_over_start_mib']:.0f} |"
            )
    (out / "pruning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
