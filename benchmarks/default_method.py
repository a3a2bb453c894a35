"""Which pruning method should the profiles default to? Measured where the default run prunes.

``make export`` prunes the default model to a profile's *budget* (not to a ratio) on *model-generated*
calibration text (no download). ``benchmarks/pruning.py`` compares methods at fixed ratios on
WikiText-2 calibration; this script checks the choice under the default run's own conditions:
the default model pruned to the profile's budget by each method, calibrated on the seeded
self-generated windows (the first 32 or all 256 of them), and scored on the first 16 x 512 tokens
of WikiText-2 test. Methods run one after the other in this process (each on a fresh copy).

    python benchmarks/default_method.py --target android

Writes ``benchmarks/results/default_method.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from core.perplexity import perplexity
from pipeline.data import first_windows, generate_samples, read_text
from pipeline.model import load_model
from pipeline.prune import prune_to_budget
from pipeline.run import profile_prune_config
from targets.profile import load_profile

ROOT = Path(__file__).resolve().parent
WIKI = ROOT.parent.parent / "shared" / "data" / "wikitext-2"
RUNS = (("depth", 32), ("comp", 32), ("comp", 256), ("depth+width", 32), ("width", 256))
log = logging.getLogger("bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="android", help="profile whose budget the model is pruned to")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    profile = load_profile(args.target)
    loaded = load_model()
    tok, dense = loaded.tokenizer, loaded.model
    evals = first_windows(read_text(str(WIKI / "wiki.test.tokens")), tok, 16, 512, where="test")
    t0 = time.perf_counter()
    calib = generate_samples(dense, tok, max(n for _, n in RUNS), 128, seed=0)  # the default run's windows
    meta = {"target": profile.name, "budget_mib": profile.memory_budget_mib, "generate_s": time.perf_counter() - t0,
            "dense_ppl": perplexity(dense, evals)}  # fmt: skip
    rows: list[dict[str, Any]] = []
    for method, n in RUNS:
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        plan = prune_to_budget(model, calib[:n], profile, profile_prune_config(profile, method))
        rows.append({"method": method, "calib_windows": n, "test_ppl": perplexity(model, evals),
                     "prune_s": time.perf_counter() - t, "blocks_left": len(model.model.layers),
                     "params_after": plan.params_after, "worst_mib": plan.after["worst_mib"]})  # fmt: skip
        log.info("%s (%d windows): ppl %.2f", method, n, rows[-1]["test_ppl"])
        del model
    write(args.out, rows, meta)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def write(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_method.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [
        f"Default model pruned to the `{meta['target']}` budget ({meta['budget_mib']} MiB) on seeded self-generated "
        f"calibration (128-token windows; generating 256 took {meta['generate_s']:.0f} s). WikiText-2 test "
        f"perplexity, first 16 x 512 tokens; dense {meta['dense_ppl']:.2f}.",
        "",
        "| method | calibration windows | test PPL | blocks left | params after | predicted worst MiB | prune (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["test_ppl"]):
        lines.append(
            f"| {r['method']} | {r['calib_windows']} | {r['test_ppl']:.2f} | {r['blocks_left']} | "
            f"{r['params_after'] / 1e6:.1f} M | {_mib(r.get('worst_mib'))} | {r['prune_s']:.0f} |"
        )
    (out / "default_method.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
