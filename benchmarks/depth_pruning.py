"""Depth-pruning benchmark on the default model: which blocks to drop, side by side in one run.

Methods (all training-free, on the same calibration windows):
- ``shortgpt``: ShortGPT one-shot Block Influence (1 - cos(in, out)) on the dense model, drop the k
  lowest.
- ``bi-iterative``: prunefit's depth pruner: drop the lowest-BI block, re-score, repeat.
- ``blockpruner``: BlockPruner-style greedy: at each step drop the block whose removal gives the
  lowest calibration perplexity (one forward per candidate).

For 10/20/30% of decoder blocks removed: WikiText-2 test perplexity (first 16 x 512 tokens),
pruning wall time, parameters removed. Writes benchmarks/results/depth_pruning.{json,md}.

Usage: python benchmarks/depth_pruning.py [--calib-samples 32] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.arch import decoder_layers
from pipeline.data import first_windows, read_text, tokenize_windows
from pipeline.evaluate import perplexity
from pipeline.model import load_model
from pipeline.prune import block_influence
from pipeline.rewrite import remove_layers

ROOT = Path(__file__).resolve().parent
WIKI = ROOT.parent.parent / "shared" / "data" / "wikitext-2"
log = logging.getLogger("bench")


def _fresh(state: dict[str, torch.Tensor], loaded) -> torch.nn.Module:
    """A dense copy of the model (re-using the loaded module structure)."""
    import copy

    m = copy.deepcopy(loaded.model)
    m.load_state_dict(state)
    return m.eval()


def order_shortgpt(model, calib, steps: int) -> list[int]:
    scores = block_influence(model, calib, batch_size=8)
    drop = sorted(range(len(scores)), key=scores.__getitem__)[:steps]
    return drop  # original indices, removed in this order


def _original(model, idx: int) -> int:
    meta = getattr(model.config, "prunefit", None) or {}
    return meta.get("kept_layers", list(range(len(decoder_layers(model)))))[idx]


def step_bi(model, calib) -> int:
    scores = block_influence(model, calib, batch_size=8)
    return min(range(len(scores)), key=scores.__getitem__)


def step_blockpruner(model, calib) -> int:
    layers = decoder_layers(model)
    best, best_ppl = 0, float("inf")
    for i in range(len(layers)):
        keep = torch.nn.ModuleList([layer for j, layer in enumerate(layers) if j != i])
        model.model.layers, n = keep, model.config.num_hidden_layers
        model.config.num_hidden_layers = len(keep)
        try:
            ppl = perplexity(model, calib, batch_size=8, desc=f"candidate {i}")
        finally:
            model.model.layers, model.config.num_hidden_layers = layers, n
        if ppl < best_ppl:
            best, best_ppl = i, ppl
    return best


def run_method(
    name: str,
    loaded,
    state,
    calib,
    evals,
    checkpoints: list[int],
    step: Callable | None,
) -> list[dict]:
    model = _fresh(state, loaded)
    total = sum(p.numel() for p in model.parameters())
    n_layers = len(decoder_layers(model))
    layer_params = sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())
    rows, removed, t0 = [], [], time.perf_counter()
    order = order_shortgpt(model, calib, max(checkpoints)) if step is None else None
    for k in range(1, max(checkpoints) + 1):
        if order is not None:
            current = [_original(model, i) for i in range(len(decoder_layers(model)))]
            idx = current.index(order[k - 1])
        else:
            idx = step(model, calib)
        removed.append(_original(model, idx))
        remove_layers(model, [idx])
        if k in checkpoints:
            wall = time.perf_counter() - t0
            ppl = perplexity(model, evals, desc=f"{name} eval")
            params = sum(p.numel() for p in model.parameters())
            rows.append({
                "method": name, "blocks_removed": k, "block_ratio": k / n_layers,
                "decoder_params_removed": (total - params) / layer_params,
                "all_params_removed": (total - params) / total,
                "test_ppl": ppl, "prune_wall_s": wall, "removed": sorted(removed),
            })  # fmt: skip
            log.info("%s k=%d ppl %.2f (%.1fs)", name, k, ppl, wall)
            t0 = time.perf_counter() - wall  # exclude evaluation time from pruning wall time
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="10%% only, fewer eval windows (smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    loaded = load_model()
    tok = loaded.tokenizer
    calib = tokenize_windows(read_text(str(WIKI / "wiki.valid.tokens")), tok, args.calib_samples, 128, 0, where="valid")
    evals = first_windows(read_text(str(WIKI / "wiki.test.tokens")), tok, 4 if args.quick else 16, 512, where="test")
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    n = len(decoder_layers(loaded.model))
    checkpoints = [round(n * r) for r in ((0.1,) if args.quick else (0.1, 0.2, 0.3))]
    rows = [{"method": "dense", "blocks_removed": 0, "block_ratio": 0.0, "decoder_params_removed": 0.0,
             "all_params_removed": 0.0, "test_ppl": perplexity(loaded.model, evals), "prune_wall_s": 0.0,
             "removed": []}]  # fmt: skip
    rows += run_method("shortgpt", loaded, state, calib, evals, checkpoints, None)
    rows += run_method("bi-iterative", loaded, state, calib, evals, checkpoints, step_bi)
    rows += run_method("blockpruner", loaded, state, calib, evals, checkpoints, step_blockpruner)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "depth_pruning.json").write_text(
        json.dumps({"calib_samples": args.calib_samples, "rows": rows}, indent=2)
    )
    lines = [
        "| method | blocks removed | decoder params removed | all params removed | WikiText-2 test PPL | "
        "PPL / dense | prune wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    dense = rows[0]["test_ppl"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['blocks_removed']} | {r['decoder_params_removed']:.1%} | "
            f"{r['all_params_removed']:.1%} | {r['test_ppl']:.2f} | {r['test_ppl'] / dense:.2f}x | "
            f"{r['prune_wall_s']:.1f} |"
        )
    (args.out / "depth_pruning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
