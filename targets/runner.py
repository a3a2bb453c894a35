"""Child-process runner: load one exported artifact in its real runtime, run it, measure it.

Runs as ``python -m targets.runner`` so the measurement sees only that runtime (no PyTorch model,
no exporter state). Peak memory comes from the kernel's high-water mark (``ru_maxrss``); the mark
just before loading the model is the host baseline (interpreter + runtime library), so
``model_peak = peak - baseline`` is what the model itself costs. On a device the host is the
runtime's C++ runner, whose cost the budget model carries as the runtime overhead term.

Keep this module's imports minimal: everything imported here is counted in the baseline.
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

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_rss_bytes() -> int:
    """VmHWM: this process's RSS high-water mark. Unlike ``ru_maxrss`` it is not inherited from
    the (large) parent across fork+exec, so it measures only what this runner touched."""
    return _status_kib("VmHWM") * 1024


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _onnxruntime(path: Path, threads: int) -> tuple[Any, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def load() -> Any:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(sess: Any, ids: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"input_ids": ids})[0]

    return load, run


def _executorch(path: Path, threads: int) -> tuple[Any, Any]:
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)
    torch.set_num_threads(threads)

    def load() -> Any:
        return Runtime.get().load_program(path).load_method("forward")

    def run(method: Any, ids: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(ids)])[0].numpy()

    return load, run


RUNTIMES = {"onnxruntime": _onnxruntime, "executorch": _executorch}


def measure(runtime: str, artifact: Path, inputs: Path, logits_out: Path, threads: int, repeats: int) -> dict[str, Any]:
    ids = np.load(inputs, allow_pickle=False).astype(np.int64)
    rss_start = current_rss_bytes()
    load, run = RUNTIMES[runtime](artifact, threads)
    baseline = current_rss_bytes()
    peak_was_reset = reset_peak()
    t0 = time.perf_counter()
    session = load()
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_bytes()
    load_peak = peak_rss_bytes()
    latencies = []
    logits = None
    for _ in range(repeats + 1):  # first run is warm-up (allocations, kernel selection)
        logits = None  # never hold two outputs at once: that is the runner's cost, not the model's
        t = time.perf_counter()
        logits = run(session, ids)
        latencies.append(time.perf_counter() - t)
    peak = peak_rss_bytes()
    assert logits is not None
    np.save(logits_out, np.asarray(logits, dtype=np.float32), allow_pickle=False)
    return {
        "runtime": runtime,
        "artifact": str(artifact),
        "threads": threads,
        "input_shape": list(ids.shape),
        "interpreter_rss_mib": rss_start / MIB,
        "baseline_rss_mib": baseline / MIB,
        "loaded_rss_mib": rss_loaded / MIB,
        "load_peak_mib": (load_peak - baseline) / MIB,
        "peak_rss_mib": peak / MIB,
        "model_peak_mib": (peak - baseline) / MIB,
        "peak_reset": peak_was_reset,
        "load_s": load_s,
        "first_forward_s": latencies[0],
        "forward_s": statistics.median(latencies[1:]) if repeats else latencies[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runtime", choices=sorted(RUNTIMES), required=True)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--inputs", type=Path, required=True, help=".npy int64 [batch, seq]")
    ap.add_argument("--logits-out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--probe", action="store_true", help="only import the runtime and report the host's RSS")
    args = ap.parse_args(argv)
    if args.probe:
        try:
            RUNTIMES[args.runtime](args.artifact, args.threads)
        except ImportError as exc:
            print(json.dumps({"error": "runtime_missing", "message": str(exc)}))
            return 3
        print(json.dumps({"baseline_rss_mib": current_rss_bytes() / MIB}))
        return 0
    try:
        result = measure(args.runtime, args.artifact, args.inputs, args.logits_out, args.threads, args.repeats)
    except ImportError as exc:
        print(json.dumps({"error": "runtime_missing", "message": str(exc)}))
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
