"""Where an ONNX model's decode step spends its time in onnxruntime, per operator type, side by side.

Why: the export goal "prunefit's dense ONNX decodes no slower than optimum-onnx's" is within this
machine's timing noise as a whole-step ratio. A profile says *why* two graphs of the same model
differ: how many nodes the session runs after its own graph optimizations (ORT_ENABLE_ALL, as
the validation runner uses), which fusions it found (SimplifiedLayerNormalization, ...), and the
kernel time per operator type per decoded token. The sum of kernel times against the run's wall
time shows the per-node dispatch overhead, which grows with the node count.

Each artifact is greedy-decoded from the same prompt with onnxruntime's profiler on (the
runner's own session options, one intra-op pool of ``--threads``); the first sequence is a
warm-up, and of each later one only the decode steps (not the prefill) are counted.

    python benchmarks/ort_profile.py prunefit=DIR/model.onnx optimum=DIR2/model.onnx --out DIR

Writes ``ort_profile.json`` and ``ort_profile.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from targets.runner import _onnxruntime, generate

log = logging.getLogger("bench.ort_profile")


def profile(
    path: Path, prompt: np.ndarray, new_tokens: int, sequences: int, threads: int, work: Path
) -> dict[str, Any]:
    """Per-op-type kernel time per decode step, node counts, and the steps' wall time."""
    options = {"enable_profiling": True, "profile_file_prefix": str(work / path.parent.name)}
    decoder: Any = _onnxruntime(path, threads, prompt.shape[1], options=options)()
    for _ in range(sequences + 1):
        generate(decoder, prompt, new_tokens)
    events = json.loads(Path(decoder.sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs.sort(key=lambda e: e["ts"])
    # each sequence: one prefill run, then new_tokens - 1 decode runs; the first sequence warms up
    per_seq = len(runs) // (sequences + 1)
    decode = [r for i, r in enumerate(runs) if i >= per_seq and i % per_seq != 0]
    starts = [r["ts"] for r in decode]
    kernel_us: dict[str, float] = defaultdict(float)
    nodes: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        nodes[op].add(e["name"])
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] <= decode[i]["ts"] + decode[i]["dur"]:
            kernel_us[op] += e["dur"]
    steps = len(decode)
    wall_ms = sum(r["dur"] for r in decode) / 1000 / steps
    return {
        "path": str(path),
        "decode_steps": steps,
        "step_wall_ms": wall_ms,
        "step_kernel_ms": sum(kernel_us.values()) / 1000 / steps,
        "nodes": sum(len(v) for v in nodes.values()),
        "ops": {
            op: {"nodes": len(nodes[op]), "ms_per_step": kernel_us[op] / 1000 / steps}
            for op in sorted(nodes, key=lambda o: -kernel_us[o])
        },
    }


def markdown(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    lines = [
        "# onnxruntime decode profile, per operator type", "",
        "Kernel time per decoded token (ms) and node count after the session's graph optimizations "
        "(ORT_ENABLE_ALL). 'dispatch' is the step's wall time not spent in kernels.", "",
        "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
        "| step wall ms | " + " | ".join(f"{results[n]['step_wall_ms']:.2f}" for n in names) + " |",
        "| kernels ms | " + " | ".join(f"{results[n]['step_kernel_ms']:.2f}" for n in names) + " |",
        "| dispatch ms | "
        + " | ".join(f"{results[n]['step_wall_ms'] - results[n]['step_kernel_ms']:.2f}" for n in names) + " |",
        "| nodes | " + " | ".join(str(results[n]["nodes"]) for n in names) + " |",
        "", "| op | " + " | ".join(f"{n} ms | {n} nodes" for n in names) + " |",
        "|---|" + "---:|---:|" * len(names),
    ]  # fmt: skip
    total: Counter[str] = Counter()
    for n in names:
        for op, v in results[n]["ops"].items():
            total[op] += v["ms_per_step"]
    for op, _ in total.most_common():
        cells = []
        for n in names:
            v = results[n]["ops"].get(op)
            cells += [f"{v['ms_per_step']:.3f}", str(v["nodes"])] if v else ["-", "0"]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", help="name=path/to/model.onnx")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sequences", type=int, default=3, help="profiled sequences after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn below this")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    prompt = np.random.default_rng(0).integers(0, args.vocab, (1, args.prompt_tokens), dtype=np.int64)
    results = {}
    with tempfile.TemporaryDirectory(prefix="prunefit-ort-profile-") as tmp:
        for spec in args.artifacts:
            name, _, path = spec.partition("=")
            log.info("profiling %s", name)
            results[name] = profile(Path(path), prompt, args.new_tokens, args.sequences, args.threads, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_profile.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "ort_profile.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
