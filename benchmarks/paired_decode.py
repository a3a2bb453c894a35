"""Paired decode timing: two artifacts decode side by side, their steps interleaved one by one.

Why: on a shared 2-core machine, timing each artifact in its own process (even in interleaved
rounds) leaves 10-20% round-to-round spread, more than the margins the export goals are judged
on. Here both artifacts stay loaded and decode in lockstep: step ``s`` of A and step ``s`` of B
run back to back (the order alternating A-B / B-A, so neither always follows the other), about
20-40 ms apart. A slow spell of the machine then lands on both steps of a pair, and the median of
the per-pair ratios ``t_A / t_B`` cancels it. Each artifact decodes its own greedy tokens with its
own KV cache from the same prompt, so both do the same work they would alone.

Where the two artifacts live:

- **onnxruntime pairs: one child process each**, driven step by step over pipes, with intra-op
  spinning off in both sessions. Two onnxruntime sessions in *one* process were measured to slow
  each other unevenly: prunefit's dense graph decoded 30 ms/token alone and 35-38 once optimum's
  graph was merely loaded beside it, which made that pair read 1.18 in one process against
  0.95-0.98 in two (session 9; self-pairs 1.003 / 1.019 in one process, 1.005 / 1.012 in two).
  Spinning is off because a session's pool keeps its threads spinning after each run (ORT's
  default), which on 2 cores steals the other process's step: with it on, steps took 51-62
  ms/token against 34-49 with it off, same hour. Turning it off costs both sides the same thread
  wake-ups (the two graphs have the same 271-272 MatMuls, the only ops big enough to run in
  parallel), so ratios hold; the absolute ms/token stayed within 5% of the alone medians of
  ``targets.runner`` in session 9's run (30.5 vs 29.6, 31.7 vs 31.0).
- **ExecuTorch pairs: one process**, as measured since session 6: its threadpool is process-wide,
  one pool serves both programs, and its spin-wait cannot be turned off from Python.

Decode on a CPU streams every weight once per token (far more than any cache holds), so the two
models do not warm each other's caches; the ratio is what each would measure alone.

Run as a child: ``python benchmarks/paired_decode.py RT_A PATH_A RT_B PATH_B PROMPT.npy`` prints
one ``PAIR {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from targets.runner import RUNTIMES, Decoder, _onnxruntime, prefill

NO_SPIN = {"session.intra_op.allow_spinning": "0"}


class Stepper(Protocol):
    token: int  # the greedy token just produced (batch 1)

    def prefill(self) -> float: ...  # start the prompt's sequence; seconds
    def step(self) -> float: ...  # one greedy decode step; seconds
    def close(self) -> None: ...


class LocalStepper:
    """A decoder in this process."""

    def __init__(self, decoder: Decoder, prompt: np.ndarray) -> None:
        self.decoder, self.prompt = decoder, prompt
        self.token = 0

    def prefill(self) -> float:
        t = time.perf_counter()
        self.token = int(prefill(self.decoder, self.prompt)[0, -1].argmax())
        return time.perf_counter() - t

    def step(self) -> float:
        t = time.perf_counter()
        self.token = int(self.decoder.forward(np.array([[self.token]], np.int64))[0, -1].argmax())
        return time.perf_counter() - t

    def close(self) -> None:
        del self.decoder


class RemoteStepper:
    """A decoder in a child process (``--serve``): one command line in, its seconds and token back."""

    def __init__(self, runtime: str, path: Path, prompt: Path, threads: int, chunk: int) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", runtime, str(path), str(prompt),
               "--threads", str(threads), "--chunk", str(chunk)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.token = 0
        self._expect("READY")

    def _expect(self, what: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith(what):
            self.proc.kill()
            raise RuntimeError(f"decode server answered {line!r} instead of {what} (its stderr has the cause)")
        return line[len(what) :].strip()

    def _ask(self, command: str) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        seconds, token = self._expect("T").split()
        self.token = int(token)
        return float(seconds)

    def prefill(self) -> float:
        return self._ask("P")

    def step(self) -> float:
        return self._ask("S")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def serve(runtime: str, path: Path, prompt_path: Path, threads: int, chunk: int) -> None:
    """The child of :class:`RemoteStepper`. Replies go to a private copy of stdout; fd 1 itself is
    pointed at stderr, so a library printing to stdout cannot corrupt the protocol."""
    replies: IO[str] = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if runtime == "onnxruntime":
        decoder = _onnxruntime(path, threads, chunk, config=NO_SPIN)()
    else:
        decoder = RUNTIMES[runtime](path, threads, chunk)()
    stepper = LocalStepper(decoder, np.load(prompt_path, allow_pickle=False).astype(np.int64))
    replies.write("READY\n")
    replies.flush()
    for line in sys.stdin:
        command = line.strip()
        dt = stepper.prefill() if command == "P" else stepper.step() if command == "S" else None
        if dt is None:
            break
        replies.write(f"T {dt!r} {stepper.token}\n")
        replies.flush()


def paired_decode(
    a: tuple[str, Path], b: tuple[str, Path], prompt_path: Path, threads: int, chunk: int, steps: int, repeats: int
) -> dict[str, Any]:
    """Per-step decode seconds of A and B, measured in adjacent pairs; a warm-up sequence first."""
    separate = "executorch" not in (a[0], b[0])
    prompt = None if separate else np.load(prompt_path, allow_pickle=False).astype(np.int64)
    steppers: list[Stepper] = []
    times: list[list[float]] = [[], []]
    prefill_s: list[list[float]] = [[], []]
    tokens: list[list[int]] = [[], []]  # the last sequence's greedy tokens
    try:  # built inside: a second server that fails to start must not orphan the first
        for rt, path in (a, b):
            if prompt is None:
                steppers.append(RemoteStepper(rt, path, prompt_path, threads, chunk))
            else:
                steppers.append(LocalStepper(RUNTIMES[rt](path, threads, chunk)(), prompt))
        for rep in range(repeats + 1):  # the first sequence is warm-up: allocations, kernel selection
            for i in (0, 1) if rep % 2 == 0 else (1, 0):
                dt = steppers[i].prefill()
                tokens[i] = [steppers[i].token]
                if rep:
                    prefill_s[i].append(dt)
            for s in range(steps):
                for i in (0, 1) if (s + rep) % 2 == 0 else (1, 0):
                    dt = steppers[i].step()
                    tokens[i].append(steppers[i].token)
                    if rep:
                        times[i].append(dt)
    finally:
        for st in steppers:
            st.close()
    ratios = [x / y for x, y in zip(times[0], times[1], strict=True)]
    return {
        "a": {"runtime": a[0], "artifact": str(a[1])},
        "b": {"runtime": b[0], "artifact": str(b[1])},
        "threads": threads,
        "processes": 2 if separate else 1,  # 2: onnxruntime with intra-op spinning off (module docstring)
        "steps": len(ratios),
        "decode_ms_a": 1000 * statistics.median(times[0]),
        "decode_ms_b": 1000 * statistics.median(times[1]),
        "prefill_ms_a": 1000 * statistics.median(prefill_s[0]),
        "prefill_ms_b": 1000 * statistics.median(prefill_s[1]),
        "ratio": statistics.median(ratios),
        "ratio_q25": float(np.quantile(ratios, 0.25)),
        "ratio_q75": float(np.quantile(ratios, 0.75)),
        "tokens_a": tokens[0],
        "tokens_b": tokens[1],
    }


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        sp = argparse.ArgumentParser()
        sp.add_argument("runtime")
        sp.add_argument("artifact", type=Path)
        sp.add_argument("prompt", type=Path)
        sp.add_argument("--threads", type=int, default=2)
        sp.add_argument("--chunk", type=int, default=128)
        sa = sp.parse_args(sys.argv[2:])
        serve(sa.runtime, sa.artifact, sa.prompt, sa.threads, sa.chunk)
        return
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
    res = paired_decode(
        (args.runtime_a, args.artifact_a), (args.runtime_b, args.artifact_b), args.prompt,
        args.threads, args.chunk, args.steps, args.repeats,
    )  # fmt: skip
    print("PAIR " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
