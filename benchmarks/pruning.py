"""Pruning benchmark on the default model: every method side by side in one run.

SmolLM2-135M (the embedded default), calibration = 256 x 128-token windows of WikiText-2 valid
(``--calib-samples/--calib-len``; every method gets the same: comp's least-squares statistics are
rank-limited at 32 x 128, where it measured 0.99x of Wanda against 0.84x at 256 x 128; Wanda does not
move), perplexity = first 16 x 512 tokens of WikiText-2 test. At 10/20/30% of decoder-block parameters
removed (the share of all parameters is reported too):

- dense
- baselines: ``shortgpt`` (one-shot Block Influence = 1 - cos(in, out), drop the lowest blocks),
  ``blockpruner`` (greedy block removal by calibration perplexity, one forward per candidate),
  ``magnitude`` and ``wanda`` (LLM-Pruner-style uniform: every block loses the same share of MLP
  channels ranked by ||W|| or sum |W| * ||X||; no compensation)
- prunefit: ``depth`` (iterative Block Influence), ``width`` (energy scores, global plan, LS
  re-fit on dense statistics), ``multipruner`` (balanced 44:52:4 greedy by calibration
  perplexity), ``comp`` (layer-wise, condition-aware scores, re-fit on the pruned stream toward
  the dense residual stream; streamed from safetensors) and its ablations ``comp-nocomp`` (no
  re-fit), ``comp-sublayer`` (re-fit toward the dense sub-layer output only), ``comp-blocks``
  (whole blocks compete in the plan)

Each method runs in its own process (its peak RSS is its own). Columns: test perplexity, pruning
wall time, pruning peak RSS, parameters and fp32 bytes removed. Writes
benchmarks/results/pruning.{json,md}. ``--quick`` = 10% only, 4 eval windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.arch import decoder_layers
from core.measure import current_rss_bytes, peak_rss_bytes, reset_peak
from core.methods import method_config
from core.perplexity import perplexity
from pipeline.checkpoint import prune_checkpoint
from pipeline.data import first_windows, read_text, tokenize_windows
from pipeline.methods.scores import block_influence, channel_scores, collect_stats
from pipeline.methods.units import prune_mlp, remove_layers
from pipeline.model import load_model
from pipeline.prune import prune_to_budget
from pipeline.rewrite import load_pruned, save_model
from pipeline.stream import trim_heap
from targets.profile import load_profile

ROOT = Path(__file__).resolve().parent
WIKI = ROOT.parent.parent / "shared" / "data" / "wikitext-2"
log = logging.getLogger("bench")


def _rss_mib() -> float:
    return current_rss_bytes() / 2**20


def _peak_mib() -> float:
    return peak_rss_bytes() / 2**20


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


def via_prunefit(method: str, **kw: Any) -> Any:
    def run(model: Any, calib: torch.Tensor, ratio: float) -> None:
        cfg = method_config(method, target_decoder_ratio=ratio, max_removed_layer_ratio=0.9, **kw)
        prune_to_budget(model, calib, PROFILE, cfg)

    return run


def uniform_channels(score: str) -> Any:
    """LLM-Pruner-style uniform baseline: every block loses the same share of MLP channels, ranked
    within the block by ``score`` (magnitude: ||W_down[:, j]||; wanda: sum |W| * ||x||); no compensation."""

    def run(model: Any, calib: torch.Tensor, ratio: float) -> None:
        stats = collect_stats(model, calib, 8)
        hidden = model.config.hidden_size
        for layer, st in zip(decoder_layers(model), stats, strict=True):
            layer_params = sum(p.numel() for p in layer.parameters())
            inter = layer.mlp.down_proj.in_features
            drop = round(ratio * layer_params / (3 * hidden) / 8) * 8
            order = torch.argsort(channel_scores(layer, st, score))  # type: ignore[arg-type]
            prune_mlp(layer, torch.sort(order[drop:]).values, None)
            assert layer.mlp.down_proj.in_features == inter - drop

    return run


PROFILE = load_profile("android")  # only used for its width multiple here (ratio targets ignore the budget)
BASELINES = ("shortgpt", "blockpruner", "magnitude", "wanda")
METHODS = {
    "shortgpt": shortgpt,
    "blockpruner": blockpruner,
    "magnitude": uniform_channels("magnitude"),
    "wanda": uniform_channels("wanda"),
    "depth": via_prunefit(method="depth"),
    "width": via_prunefit(method="width"),
    "multipruner": via_prunefit(method="multipruner"),
    "comp-nocomp": via_prunefit(method="comp", compensate=False),
    "comp-sublayer": via_prunefit(method="comp", target="sublayer"),
    "comp-blocks": via_prunefit(method="comp", blocks=True),
    "comp": "streamed",  # prunefit's default: layer-wise from safetensors (the low-memory path)
}


def child(method: str, ratio: float, work: Path) -> dict[str, Any]:
    """One method at one ratio, in its own process so its peak RSS is its own."""
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    # Library code is not pruning memory: import the model's modules before the baseline is taken.
    import transformers.models.llama.modeling_llama  # noqa: F401

    data = load_file(str(work / "windows.safetensors"))
    calib, evals = data["calibration"], data["evaluation"]
    start_rss = _rss_mib()
    reset_peak()
    t0 = time.perf_counter()
    if METHODS[method] == "streamed":
        cfg = method_config(method="comp", target_decoder_ratio=ratio, width_multiple=PROFILE.width_multiple)
        prune_checkpoint(work / "dense", calib, PROFILE, cfg, work / f"{method}-{ratio}")
        wall = time.perf_counter() - t0
        peak = _peak_mib() - start_rss  # everything the pruning process held, model included
        model = load_pruned(work / f"{method}-{ratio}")
        shutil.rmtree(work / f"{method}-{ratio}")
        peak_kind = "streamed: whole model never loaded"
    else:
        model = load_pruned(work / "dense")
        for p in model.parameters():  # own the weights: mmap-backed pages would fault in during pruning
            p.data = p.data.clone()
        trim_heap()
        loaded = _rss_mib()
        reset_peak()
        t0 = time.perf_counter()
        METHODS[method](model, calib, ratio)  # type: ignore[operator]
        wall = time.perf_counter() - t0
        peak = _peak_mib() - loaded  # working memory on top of the resident model
        peak_kind = "in memory: above the loaded model"
    params = sum(p.numel() for p in model.parameters())
    return {
        "method": method, "target": ratio, "test_ppl": perplexity(model, evals), "prune_wall_s": wall,
        "prune_peak_rss_mib": peak, "peak_kind": peak_kind, "params_after": params,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="10%% only, 4 eval windows")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratios", default="0.1,0.2,0.3", help="shares of decoder parameters to remove")
    ap.add_argument("--calib-samples", type=int, default=256, help="calibration windows (every method gets the same)")
    ap.add_argument("--calib-len", type=int, default=128, help="tokens per calibration window")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--append", action="store_true", help="keep the rows of an earlier run (other ratios/methods)")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "RATIO", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, ratio, work = args.child
        print("ROW " + json.dumps(child(method, float(ratio), Path(work))), flush=True)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("torchao", "pipeline.prune"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    loaded = load_model()
    tok, dense_model = loaded.tokenizer, loaded.model
    calib = tokenize_windows(
        read_text(str(WIKI / "wiki.valid.tokens")), tok, args.calib_samples, args.calib_len, 0, where="valid"
    )
    evals = first_windows(read_text(str(WIKI / "wiki.test.tokens")), tok, 4 if args.quick else 16, 512, where="test")
    total = sum(p.numel() for p in dense_model.parameters())
    dec = sum(p.numel() for layer in decoder_layers(dense_model) for p in layer.parameters())
    meta = {
        "model": "SmolLM2-135M-Instruct", "dense_fp32_mib": 4 * total / 2**20,
        "calibration_activations_mib": 4 * calib.numel() * dense_model.config.hidden_size / 2**20,
        "decoder_params": dec, "params": total, "calibration": f"{args.calib_samples} x {args.calib_len} tokens",
    }  # fmt: skip
    rows: list[dict[str, Any]] = [{"method": "dense", "target": 0.0, "test_ppl": perplexity(dense_model, evals)}]
    ratios = (0.1,) if args.quick else [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")
    if args.append and (args.out / "pruning.json").is_file():
        earlier = json.loads((args.out / "pruning.json").read_text())["rows"][1:]
        rows += [r for r in earlier if not (r["target"] in ratios and r["method"] in methods)]
    with tempfile.TemporaryDirectory(prefix="prunefit-bench-") as tmp:
        work = Path(tmp)
        save_model(dense_model, tok, work / "dense")
        save_file(
            {"calibration": calib.contiguous(), "evaluation": evals.contiguous()}, str(work / "windows.safetensors")
        )
        del dense_model, loaded
        for ratio in ratios:
            for name in methods:
                proc = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", name, str(ratio), str(work)],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                found = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                if proc.returncode != 0 or not found:
                    log.error("%s @%.0f%% failed:\n%s", name, 100 * ratio, proc.stderr[-3000:])
                    continue
                row = json.loads(found[-1])
                removed = total - row["params_after"]
                row.update(
                    decoder_params_removed=removed / dec, all_params_removed=removed / total,
                    bytes_removed_fp32=4 * removed,
                )  # fmt: skip
                rows.append(row)
                log.info("%s @%.0f%%: ppl %.2f, %.1fs, %.0f MiB", name, 100 * ratio, row["test_ppl"],
                         row["prune_wall_s"], row["prune_peak_rss_mib"])  # fmt: skip
                write(args.out, rows, meta)
    write(args.out, rows, meta)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def write(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write JSON + Markdown (called after every row, so a long run keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    dense_ppl = rows[0]["test_ppl"]
    lines = [
        f"Dense WikiText-2 test perplexity: {dense_ppl:.2f}. Dense fp32 model {meta['dense_fp32_mib']:.0f} MiB; "
        f"calibration activations ({meta.get('calibration', '32 x 128 tokens')} x hidden, fp32) "
        f"{meta['calibration_activations_mib']:.1f} MiB.",
        "Peak RSS: for a streamed run everything the pruning process held after start-up, the model included; "
        "for an in-memory run the working memory on top of the loaded model (pruning.json says which, per row). "
        "Each method runs in its own process.",
        "",
        "| target | method | decoder params removed | all params removed | fp32 MiB removed | test PPL "
        "| PPL / best baseline | prune wall (s) | prune peak RSS (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baselines = set(BASELINES)
    for ratio in sorted({r["target"] for r in rows if r["target"]}):
        group = [r for r in rows if r["target"] == ratio]
        best = min((r["test_ppl"] for r in group if r["method"] in baselines), default=float("nan"))
        for r in group:
            lines.append(
                f"| {ratio:.0%} | {r['method']} | {r['decoder_params_removed']:.1%} | {r['all_params_removed']:.1%} | "
                f"{r['bytes_removed_fp32'] / 2**20:.1f} | {r['test_ppl']:.2f} | {r['test_ppl'] / best:.3f}x | "
                f"{r['prune_wall_s']:.1f} | {_mib(r.get('prune_peak_rss_mib'))} |"
            )
    lines += _goals(rows, meta)
    (out / "pruning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _goals(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Issue 4's goals at 20%, evaluated from this run's rows (those it has)."""
    by = {r["method"]: r for r in rows if r["target"] == 0.2}
    ours = {m: r for m, r in by.items() if m not in BASELINES}
    base = [r["test_ppl"] for m, r in by.items() if m in BASELINES]
    if not ours:
        return []
    best_name = min(ours, key=lambda m: ours[m]["test_ppl"])
    best = ours[best_name]
    out = ["", "| goal (20%) | measured | limit | met |", "|---|---:|---:|---|"]
    if base:
        ratio = best["test_ppl"] / min(base)
        met = "yes" if ratio <= 0.85 else "no"
        out.append(f"| best method (`{best_name}`) PPL / best baseline | {ratio:.3f} | 0.850 | {met} |")
    if "comp" in by and "comp-nocomp" in by:
        with_c, without = by["comp"]["test_ppl"], by["comp-nocomp"]["test_ppl"]
        out.append(f"| compensation helps: `comp` vs `comp-nocomp` PPL | {with_c:.2f} vs {without:.2f} | lower | "
                   f"{'yes' if with_c < without else 'no'} |")  # fmt: skip
    if "comp" in by:
        limit = 0.35 * meta["dense_fp32_mib"] + meta["calibration_activations_mib"]
        peak, wall = by["comp"]["prune_peak_rss_mib"], by["comp"]["prune_wall_s"]
        out.append(f"| `comp` peak RSS (MiB), 0.35 x dense fp32 + calibration activations | {peak:.0f} | "
                   f"{limit:.1f} | {'yes' if peak <= limit else 'no'} |")  # fmt: skip
        out.append(f"| `comp` wall time (s), 2 cores | {wall:.0f} | 600 | {'yes' if wall <= 600 else 'no'} |")
    return out


if __name__ == "__main__":
    main()
