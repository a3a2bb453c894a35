"""Paired decode timing: two artifacts in one process, their decode steps interleaved one by one.

Why: on a shared 2-core machine, timing each artifact in its own process (even in interleaved
rounds) leaves 10-20% round-to-round spread, more than the margins the export goals are judged
on. Here both artifacts are loaded in one process and decode side by side: step ``s`` of A and
step ``s`` of B run back to back (the order alternating A-B / B-A, so neither always follows the
other), about 20-30 ms apart. A slow spell of the machine then lands on both steps of a pair, and
the median of the per-pair ratios ``t_A / t_B`` cancels it. Each artifact decodes its own greedy
tokens with its own KV cache from the same prompt, so both do the same work they would alone.

Decode on a CPU streams every weight once per token (far more than any cache holds), so the two
models do not warm each other's caches; the ratio is what each would measure alone.

Run as a child: ``python benchmarks/paired_decode.py RT_A PATH_A RT_B PATH_B PROMPT.npy`` prints
one ``PAIR {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from targets.runner import RUNTIMES, Decoder, _onnxruntime, prefill


def _load(runtime: str, path: Path, threads: int, chunk: int) -> Decoder:
    """The runner's loader, except onnxruntime sessions share one global intra-op pool: each
    session's own pool keeps its threads spinning after a run (ORT's default), and two spinning
    pools on 2 cores were measured to double both sessions' decode time. One shared pool behaves
    as one session alone does (ExecuTorch's threadpool is process-wide already)."""
    if runtime == "onnxruntime":
        return _onnxruntime(path, threads, chunk, shared_pool=True)()
    return RUNTIMES[runtime](path, threads, chunk)()


def _step(decoder: Decoder, token: np.ndarray) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    last = decoder.forward(token[:, None].astype(np.int64))[:, -1]
    return last.argmax(-1), time.perf_counter() - t


def paired_decode(
    a: tuple[str, Path], b: tuple[str, Path], prompt: np.ndarray, threads: int, chunk: int, steps: int, repeats: int
) -> dict[str, Any]:
    """Per-step decode seconds of A and B, measured in adjacent pairs; a warm-up sequence first."""
    if "onnxruntime" in (a[0], b[0]):
        import onnxruntime as ort

        ort.set_global_thread_pool_sizes(threads, 1)  # once, before any session
    decoders = [_load(rt, path, threads, chunk) for rt, path in (a, b)]
    times: list[list[float]] = [[], []]
    prefill_s: list[list[float]] = [[], []]
    for rep in range(repeats + 1):  # the first sequence is warm-up: allocations, kernel selection
        tokens = []
        for i in (0, 1) if rep % 2 == 0 else (1, 0):
            t = time.perf_counter()
            logits = prefill(decoders[i], prompt)
            if rep:
                prefill_s[i].append(time.perf_counter() - t)
            tokens.append((i, logits[:, -1].argmax(-1)))
        last = dict(tokens)
        for s in range(steps):
            for i in (0, 1) if (s + rep) % 2 == 0 else (1, 0):
                last[i], dt = _step(decoders[i], last[i])
                if rep:
                    times[i].append(dt)
    ratios = [x / y for x, y in zip(times[0], times[1], strict=True)]
    return {
        "a": {"runtime": a[0], "artifact": str(a[1])},
        "b": {"runtime": b[0], "artifact": str(b[1])},
        "threads": threads,
        "steps": len(ratios),
        "decode_ms_a": 1000 * statistics.median(times[0]),
        "decode_ms_b": 1000 * statistics.median(times[1]),
        "prefill_ms_a": 1000 * statistics.median(prefill_s[0]),
        "prefill_ms_b": 1000 * statistics.median(prefill_s[1]),
        "ratio": statistics.median(ratios),
        "ratio_q25": float(np.quantile(ratios, 0.25)),
        "ratio_q75": float(np.quantile(ratios, 0.75)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runtime_a")
    ap.add_argument("artifact_a", type=Path)
    ap.add_argument("runtime_b")
    ap.add_argument("artifact_b", type=Path)
    ap.add_argument("prompt", type=Path, help=".npy int64 [1, seq]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per sequence")
    ap.add_argument("--repeats", type=int, default=4, help="timed sequences (after one warm-up)")
    args = ap.parse_args()
    prompt = np.load(args.prompt, allow_pickle=False).astype(np.int64)
    res = paired_decode(
        (args.runtime_a, args.artifact_a), (args.runtime_b, args.artifact_b), prompt,
        args.threads, args.chunk, args.steps, args.repeats,
    )  # fmt: skip
    print("PAIR " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
