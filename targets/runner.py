"""Child-process runner: load one exported artifact in its real runtime, generate with it, measure it.

Runs as ``python -m targets.runner`` so the measurement sees only that runtime (no PyTorch model,
no exporter state). It prefills the prompt and greedy-decodes ``--new-tokens`` tokens with the
artifact's own KV cache, timing load, prefill and each decode step. Peak memory comes from the
kernel's high-water mark (VmHWM, reset after the runtime is imported); the mark
just before loading the model is the host baseline (interpreter + runtime library), so
``model_peak = peak - baseline`` is what the model itself costs. On a device the host is the
runtime's C++ runner, whose cost the budget model carries as the runtime overhead term.

The host's code keeps paging in after the baseline (kernels first run by the model: 6 MiB of
libtorch/ExecuTorch text on a tiny model here), and how much depends on the host, not on the
model: the kernel maps more than the faulting page from what the page cache holds, and that
depends on how the library files got there (the same tiny-model run measured 18 MiB more in a
freshly installed venv than in this one, on the same machine). That growth is the runtime
library's term, so it is taken out:
``model_peak = peak - baseline - growth of file pages mapped from outside the artifact's folder``.
The artifact's own mapped pages (ONNX external data, the .pte) stay in.

Keep this module's imports minimal: everything imported here is counted in the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

try:
    from core.measure import MIB, current_rss_bytes, host_file_rss_bytes, peak_rss_bytes, reset_peak
except ModuleNotFoundError:  # shipped to a device by scripts/validate_*.sh: core/measure.py is copied beside it
    from measure import MIB, current_rss_bytes, host_file_rss_bytes, peak_rss_bytes, reset_peak  # type: ignore[no-redef]


class Decoder(Protocol):
    """A loaded artifact driven as a language model: its KV cache grows with every ``forward``."""

    chunk: int  # the most tokens one call takes (0: any)

    def reset(self) -> None: ...  # forget the cache: the next forward starts at position 0

    # [batch, seq] -> logits [batch, seq, vocab], possibly the runtime's own output buffer: valid until
    # the next call (copy what is kept longer)
    def forward(self, ids: np.ndarray) -> np.ndarray: ...


class StaleArtifactError(RuntimeError):
    """The artifact predates KV-cache export (a bare logits graph)."""


def _fixed(axis: int | str | None) -> int:
    """A past axis's starting length: its number where the graph fixes one (a rolling window), else 0."""
    return axis if isinstance(axis, int) else 0


class _OrtDecoder:
    """Explicit cache: ``present.*`` outputs are fed back as ``past_key_values.*`` inputs."""

    def __init__(self, sess: Any, chunk: int, head_size: int | None = None) -> None:
        self.sess, self.chunk = sess, chunk
        self.head_size = head_size  # a GenAI graph leaves the last cache axis symbolic (kv_cache_dim)
        self.takes = {i.name for i in sess.get_inputs()}  # a GenAI graph takes no position_ids
        self.past_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        if not self.past_inputs:
            raise StaleArtifactError(
                "model.onnx takes no past_key_values inputs: it was exported without a KV cache by an "
                "older prunefit; re-run `prunefit export --force`."
            )
        self.outputs = ["logits"] + [i.name.replace("past_key_values.", "present.") for i in self.past_inputs]
        self.past: dict[str, np.ndarray] = {}
        self.length = 0

    def reset(self) -> None:
        self.past, self.length = {}, 0

    def _past_shape(self, shape: list[Any], batch: int) -> tuple[int, int, int, int]:
        """[batch, kv_heads_i, past, head_dim]: heads fixed, past from 0 (or a rolling window's
        fixed slots), head_dim from the graph or, where it is symbolic (GenAI), the config."""
        head = _fixed(shape[3]) or self.head_size
        assert head, "a symbolic head axis needs the genai_config.json head_size"
        return batch, int(shape[1]), _fixed(shape[2]), head

    def forward(self, ids: np.ndarray) -> np.ndarray:
        batch, seq = ids.shape
        if not self.past:  # [batch, kv_heads_i, past, head_dim]: a past axis that is a number is a
            # rolling sliding-window layer's fixed slots (zeros, masked until written), else it grows from 0
            self.past = {i.name: np.zeros(self._past_shape(i.shape, batch), np.float32) for i in self.past_inputs}
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, self.length + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(self.length, self.length + seq, dtype=np.int64), (batch, seq)),
            **self.past,
        }
        feed = {k: v for k, v in feed.items() if k in self.takes}
        logits, *present = self.sess.run(self.outputs, feed)
        self.past = {i.name: p for i, p in zip(self.past_inputs, present, strict=True)}
        self.length += seq
        return np.asarray(logits)


class _GenaiDecoder:
    """onnxruntime-genai's Generator, as an app drives it: the past/present buffer is shared and
    allocated at the model's ``max_length`` (genai_config.json's search); prompt chunks and decode
    steps are appended tokens, and each call's logits are every appended position's."""

    def __init__(self, model: Any, og: Any, chunk: int) -> None:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False)
        self.gen, self.chunk = og.Generator(model, params), chunk
        self.length = 0

    def reset(self) -> None:
        self.gen.rewind_to(0)
        self.length = 0

    def forward(self, ids: np.ndarray) -> np.ndarray:
        if ids.shape[0] != 1:
            raise ValueError("the GenAI runner drives batch 1 (the Generator's own batching is not measured)")
        self.gen.append_tokens(np.ascontiguousarray(ids, dtype=np.int64))
        self.length += ids.shape[1]
        return np.array(self.gen.get_output("logits"), dtype=np.float32)


class _EtDecoder:
    """Static cache inside the program: the caller passes the cache positions, and no call may
    exceed the program's ``get_max_seq_len`` (ExecuTorch's LLM runner chunks prompts the same way)."""

    def __init__(self, program: Any, torch: Any, chunk: int) -> None:
        names = set(program.method_names)
        if "get_max_context_len" not in names:
            raise StaleArtifactError(
                "model.pte has no KV cache (no get_max_context_len method): it was exported by an older "
                "prunefit; re-run `prunefit export --force`."
            )
        self.method, self.torch = program.load_method("forward"), torch
        self.run = _in_place(self.method)
        limit = int(program.load_method("get_max_seq_len").execute([])[0])
        self.chunk = min(chunk, limit) if chunk else limit
        self.length = 0

    def reset(self) -> None:
        self.length = 0  # stale cache entries past the position are masked, then overwritten

    def forward(self, ids: np.ndarray) -> np.ndarray:
        seq = ids.shape[1]
        pos = self.torch.arange(self.length, self.length + seq, dtype=self.torch.long)
        out = self.run([self.torch.from_numpy(np.ascontiguousarray(ids)), pos])[0].numpy()
        self.length += seq
        return np.asarray(out)


def _in_place(method: Any) -> Callable[[list[Any]], list[Any]]:
    """Run ``method`` returning its outputs in the program's own memory, as ExecuTorch's C++ LLM
    runner reads them. Why: the Python binding otherwise clones every output, a second copy of
    the chunk's logits that no app on the device holds; on a 262k vocabulary that is 1 MiB per
    prefilled token (256 MiB a chunk on Gemma 3 270M, measured: its run peak fell by that much).
    ``executorch.runtime.Method`` exposes no flag for it; its binding object does
    (``call(inputs, clone_outputs)``); without it, the cloning ``execute``."""
    raw = getattr(method, "_method", None)
    if raw is None or not hasattr(raw, "call"):
        return method.execute  # type: ignore[no-any-return]
    return lambda inputs: raw.call(inputs, False)


def prefill(decoder: Decoder, ids: np.ndarray) -> np.ndarray:
    """Start a new sequence: the prompt in chunks of at most ``decoder.chunk`` tokens."""
    decoder.reset()
    chunk = decoder.chunk or ids.shape[1]
    chunks = [np.array(decoder.forward(ids[:, i : i + chunk])) for i in range(0, ids.shape[1], chunk)]
    return np.concatenate(chunks, axis=1)


def perplexity(decoder: Decoder, windows: np.ndarray) -> tuple[float, np.ndarray]:
    """Teacher-forced perplexity of ``windows`` [n, length] through the artifact, chunk by chunk
    (never a whole window's logits at once: 512 x 49152 fp32 logits alone are 96 MiB), and the
    artifact's top-1 prediction at every scored position ([n, length - 1], int32): what a quantized
    artifact's agreement with the fp32 model is measured on, thousands of tokens, not one prompt."""
    nll, count = 0.0, 0
    top1 = np.zeros((windows.shape[0], max(windows.shape[1] - 1, 0)), dtype=np.int32)
    for r, row in enumerate(windows):
        decoder.reset()
        ids = row[None, :].astype(np.int64)
        chunk = decoder.chunk or ids.shape[1]
        for i in range(0, ids.shape[1] - 1, chunk):
            x = decoder.forward(ids[:, i : i + chunk])[0]
            targets = ids[0, i + 1 : i + 1 + x.shape[0]]
            x = np.array(x[: targets.shape[0]], dtype=np.float32)  # own copy: runtimes may lend their buffers
            top1[r, i : i + targets.shape[0]] = x.argmax(-1)
            # log-softmax in place, in float32 with float64 sums: no vocabulary-sized temporaries
            top = x.max(-1, keepdims=True)
            x -= top
            picked = x[np.arange(targets.shape[0]), targets].astype(np.float64)
            np.exp(x, out=x)
            nll -= float((picked - np.log(x.sum(-1, dtype=np.float64))).sum())
            count += targets.shape[0]
    return float(np.exp(nll / count)), top1


def _onnxruntime(
    path: Path,
    threads: int,
    chunk: int,
    options: dict[str, Any] | None = None,
    config: dict[str, str] | None = None,
) -> Callable[[], Decoder]:
    """``options``: more ``SessionOptions`` attributes (benchmarks/ort_profile.py: the profiler);
    ``config``: session config entries (benchmarks/paired_decode.py: intra-op spinning off)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    for name, value in (options or {}).items():
        setattr(opts, name, value)
    for key, val in (config or {}).items():
        opts.add_session_config_entry(key, val)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    genai = path.parent / "genai_config.json"
    head_size = json.loads(genai.read_text())["model"]["decoder"]["head_size"] if genai.is_file() else None

    def load() -> Decoder:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return _OrtDecoder(sess, chunk, head_size)

    return load


def _genai(path: Path, threads: int, chunk: int) -> Callable[[], Decoder]:
    """The GenAI folder ``path`` is in, run by onnxruntime-genai's Generator (exporters/genai.py)."""
    import onnxruntime_genai as og

    def load() -> Decoder:
        config = og.Config(str(path.parent))
        threading = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threading}}}))
        return _GenaiDecoder(og.Model(config), og, chunk)

    return load


CAP_IPC_LOCK = 14  # linux/capability.h
_CAP_VERSION_3 = 0x20080522


def mlock_allowed(nbytes: int = 4096) -> bool:
    """Whether this process may lock ``nbytes`` in memory (root's CAP_IPC_LOCK, or a lock limit that
    large); a libc without ``mlock`` locks nothing."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(nbytes)
        if libc.mlock(buf, nbytes) != 0:
            return False
    except (AttributeError, OSError):
        return False
    libc.munlock(buf, nbytes)
    return True


def without_mlock() -> bool:
    """Make this process's ``mlock`` fail, so that ExecuTorch maps the program without locking it, as
    an app loading with ``Module.LOAD_MODE_MMAP`` does. Why: the binding's loader maps the .pte with
    ``UseMlockIgnoreErrors``, so whether the program's constant data (the embedding table, read by a
    portable gather a few rows at a time) is all resident depends on this process's privileges: locked
    as root (CAP_IPC_LOCK), paged in as read where the lock limit is small (an app, a CI user). Measured
    on Gemma 3 270M's int8 table: 161 MiB resident locked, 0.2 MiB mapped after load. The lock limit
    goes to 0 and CAP_IPC_LOCK leaves the effective set; returns whether mlock is now refused."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
    with contextlib.suppress(AttributeError, OSError):
        libc = ctypes.CDLL(None, use_errno=True)
        header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: low words, then high words
        if libc.capget(header, data) == 0 and data[0] & (1 << CAP_IPC_LOCK):
            data[0] &= ~(1 << CAP_IPC_LOCK)
            libc.capset(header, data)
    return not mlock_allowed()


def _executorch(path: Path, threads: int, chunk: int) -> Callable[[], Decoder]:
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    try:  # the LLM kernels (llama::custom_sdpa, update_cache) that prunefit's programs call
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    except ImportError:  # an older runtime: programs exported with llm_ops=False still run
        pass
    try:  # quantized_decomposed::embedding_byte / embedding_4bit (quantize_embedding programs)
        import executorch.kernels.quantized  # noqa: F401
    except ImportError:
        pass
    portable_lib._unsafe_reset_threadpool(threads)
    torch.set_num_threads(threads)

    def load() -> Decoder:
        return _EtDecoder(Runtime.get().load_program(path), torch, chunk)

    return load


# runner backends: the profile's runtimes, and onnxruntime's GenAI folder through its Generator
RUNTIMES = {"onnxruntime": _onnxruntime, "executorch": _executorch, "onnxruntime-genai": _genai}


def generate(
    decoder: Decoder, ids: np.ndarray, new_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, list[float]]:
    """Greedy decoding with the artifact's own cache: (prefill logits, step logits [batch, n, vocab],
    tokens [batch, n], prefill seconds, per-step seconds). Step i's logits are those that chose
    token i, as in ``generate(output_logits=True)``."""
    t = time.perf_counter()
    logits = prefill(decoder, ids)
    prefill_s = time.perf_counter() - t
    last = logits[:, -1]  # logits: prefill's own concatenation
    steps, tokens, times = [last], [last.argmax(-1)], []
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        last = decoder.forward(tokens[-1][:, None].astype(np.int64))[:, -1].copy()
        times.append(time.perf_counter() - t)
        steps.append(last)
        tokens.append(last.argmax(-1))
    return logits, np.stack(steps, 1), np.stack(tokens, 1), prefill_s, times


def fill(
    decoder: Decoder,
    prompt: np.ndarray,
    positions: int,
    decode: int,
    baseline: int,
    trace: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Fill the cache to ``positions``: the prompt tiled to that length, prefilled in chunks up to
    ``positions - decode``, then ``decode`` greedy steps. The worst case a profile claims is its last
    chunk (attention over the whole context, every cache position written) and a step at full
    context; a short validation run never sees either (issue 20: onnxruntime peaked 20% above a
    projection from 160 positions).

    Returns one point per call: positions filled after it, the call's own resident peak (VmHWM
    reset before it) and RSS after it, both above ``baseline``, and the seconds so far. Each point
    also goes to ``trace`` as it is measured, so a run killed at the budget still says how far it got.
    """
    ids = np.resize(prompt, (prompt.shape[0], positions))  # tiled: memory does not depend on the text
    decode = max(0, min(decode, positions - 1))
    decoder.reset()
    chunk = decoder.chunk or positions
    points: list[dict[str, Any]] = []
    t0, pos = time.perf_counter(), 0

    def call(x: np.ndarray, kind: str) -> np.ndarray:
        nonlocal pos
        reset_peak()
        out = decoder.forward(x)
        pos += x.shape[1]
        point = {"positions": pos, "kind": kind, "peak_mib": (peak_rss_bytes() - baseline) / MIB,
                 "rss_mib": (current_rss_bytes() - baseline) / MIB, "s": time.perf_counter() - t0}  # fmt: skip
        points.append(point)
        if trace is not None:
            trace(point)
        return out

    token = ids[:, :1]
    while pos < positions - decode:  # only the next token is kept: no chunk's logits outlive its call
        token = call(ids[:, pos : min(pos + chunk, positions - decode)], "prefill")[:, -1].argmax(-1)[:, None]
    token = token.astype(np.int64)
    for _ in range(decode):
        token = call(token, "decode")[:, -1].argmax(-1)[:, None].astype(np.int64)
    return points


def measure(
    runtime: str,
    artifact: Path,
    inputs: Path,
    logits_out: Path,
    threads: int,
    repeats: int,
    new_tokens: int,
    chunk: int = 0,
    fill_positions: int = 0,
    trace_out: Path | None = None,
) -> dict[str, Any]:
    ids = np.load(inputs, allow_pickle=False).astype(np.int64)
    rss_start = current_rss_bytes()
    load = RUNTIMES[runtime](artifact, threads, chunk)
    baseline = current_rss_bytes()
    host_files = host_file_rss_bytes(artifact.parent)
    peak_was_reset = reset_peak()
    t0 = time.perf_counter()
    decoder = load()
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_bytes()
    load_peak = peak_rss_bytes()
    load_host_growth = max(0, host_file_rss_bytes(artifact.parent) - host_files)
    prefill_times, step_times = [], []
    result = None
    for _ in range(repeats + 1):  # first run is warm-up (allocations, kernel selection)
        result = None  # never hold two runs' outputs at once: that is the runner's cost, not the model's
        result = generate(decoder, ids, new_tokens)
        prefill_times.append(result[3])
        step_times.append(result[4])
    peak = peak_rss_bytes()
    assert result is not None
    logits, steps, tokens = result[:3]
    np.savez(logits_out, prefill=logits.astype(np.float32), steps=steps.astype(np.float32), tokens=tokens)
    del result, logits, steps, tokens  # the fill must not be charged for the parity run's outputs
    points: list[dict[str, Any]] = []
    if fill_positions:
        with contextlib.ExitStack() as stack:
            fh = stack.enter_context(open(trace_out, "w")) if trace_out else None

            def trace(point: dict[str, Any]) -> None:
                if fh is not None:
                    fh.write(json.dumps(point) + "\n")
                    fh.flush()  # a run killed at the budget leaves every point measured so far

            points = fill(decoder, ids, fill_positions, new_tokens, baseline, trace)
    host_growth = max(0, host_file_rss_bytes(artifact.parent) - host_files)  # never unmapped: the end is its max
    fill_peak = max((p["peak_mib"] for p in points), default=0.0) * MIB + baseline
    for p in points:  # the host's paged-in code is the library's, not the model's (module docstring)
        p["peak_mib"] -= host_growth / MIB
        p["rss_mib"] -= host_growth / MIB
    timed = step_times[1:] if repeats else step_times
    per_token = statistics.median(t for run in timed for t in run) if new_tokens > 1 else float("nan")
    return {
        "runtime": runtime,
        "artifact": str(artifact),
        "threads": threads,
        "input_shape": list(ids.shape),
        "new_tokens": new_tokens,
        "interpreter_rss_mib": rss_start / MIB,
        "baseline_rss_mib": baseline / MIB,
        "loaded_rss_mib": rss_loaded / MIB,
        "load_peak_mib": (load_peak - baseline) / MIB,
        "peak_rss_mib": max(peak, fill_peak) / MIB,  # everything, the parity run's logits too
        "host_code_growth_mib": host_growth / MIB,
        "load_host_code_growth_mib": load_host_growth / MIB,  # of which while loading
        # with a fill, the workload is loading + the fill: the parity run holds every prompt position's
        # logits for the comparison (Gemma 3: 120 x 262144 x 4 bytes), which no device runner keeps
        "model_peak_mib": (max(load_peak - load_host_growth, fill_peak - host_growth) if points else peak - host_growth)
        / MIB
        - baseline / MIB,
        "short_run_peak_mib": (peak - baseline - host_growth) / MIB,
        "fill_positions": points[-1]["positions"] if points else 0,
        "fill_s": points[-1]["s"] if points else 0.0,
        "fill": points,
        "peak_reset": peak_was_reset,
        "load_s": load_s,
        "first_prefill_s": prefill_times[0],
        "prefill_s": statistics.median(prefill_times[1:]) if repeats else prefill_times[0],
        "decode_s_per_token": per_token,
        "decode_tokens_per_s": 1.0 / per_token if per_token == per_token and per_token > 0 else float("nan"),
        "prefill_chunk": decoder.chunk,
    }


def evaluate(
    runtime: str, artifact: Path, eval_inputs: Path, threads: int, chunk: int, top1_out: Path | None = None
) -> dict[str, Any]:
    """The artifact's own perplexity on token windows (a separate run: not the measured workload);
    with ``top1_out`` its top-1 predictions there are saved (.npy int32) too."""
    decoder = RUNTIMES[runtime](artifact, threads, chunk)()
    t = time.perf_counter()
    ppl, top1 = perplexity(decoder, np.load(eval_inputs, allow_pickle=False))
    if top1_out is not None:
        np.save(top1_out, top1, allow_pickle=False)
    return {"perplexity": ppl, "perplexity_s": time.perf_counter() - t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runtime", choices=sorted(RUNTIMES), required=True)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--inputs", type=Path, required=True, help=".npy int64 [batch, seq]: the prompt")
    ap.add_argument("--logits-out", type=Path, required=True, help=".npz: prefill, steps, tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy tokens decoded after the prompt")
    ap.add_argument("--chunk", type=int, default=0, help="prefill at most this many tokens per call (0: all)")
    ap.add_argument(
        "--fill",
        type=int,
        default=0,
        help="after the measured runs, fill the KV cache to this many positions (the profile's "
        "context): prompt tiled, prefilled in chunks, then --new-tokens decode steps",
    )
    ap.add_argument("--trace-out", type=Path, help="with --fill: one JSON line per call, written as it is measured")
    ap.add_argument("--eval-inputs", type=Path, help=".npy int64 [n, length]: with --eval-only, their perplexity")
    ap.add_argument("--eval-only", action="store_true", help="only report the perplexity of --eval-inputs")
    ap.add_argument("--top1-out", type=Path, help=".npy: with --eval-only, the top-1 token at every scored position")
    ap.add_argument("--probe", action="store_true", help="only import the runtime and report the host's RSS")
    ap.add_argument("--result-out", type=Path, help="write the result JSON here (default: the last stdout line)")
    ap.add_argument(
        "--no-mlock",
        action="store_true",
        help="load the program mapped and unlocked, as ExecuTorch's LOAD_MODE_MMAP (the profile's "
        "executorch_load_mode: mmap); default: as the binding loads it (locked where allowed)",
    )
    args = ap.parse_args(argv)

    def emit(result: dict[str, Any]) -> None:
        _emit(result, args.result_out)

    if args.no_mlock and not without_mlock():
        emit({"error": "mlock_allowed", "message": "--no-mlock: this process can still lock memory"})
        return 2
    if args.probe:
        try:
            RUNTIMES[args.runtime](args.artifact, args.threads, args.chunk)
        except ImportError as exc:
            emit({"error": "runtime_missing", "message": str(exc)})
            return 3
        emit({"baseline_rss_mib": current_rss_bytes() / MIB})
        return 0
    try:
        if args.eval_only:
            if args.eval_inputs is None:
                ap.error("--eval-only needs --eval-inputs")
            result = evaluate(args.runtime, args.artifact, args.eval_inputs, args.threads, args.chunk, args.top1_out)
        else:
            result = measure(
                args.runtime,
                args.artifact,
                args.inputs,
                args.logits_out,
                args.threads,
                args.repeats,
                args.new_tokens,
                args.chunk,
                args.fill,
                args.trace_out,
            )
    except ImportError as exc:
        emit({"error": "runtime_missing", "message": str(exc)})
        return 3
    except StaleArtifactError as exc:
        emit({"error": "stale_artifact", "message": str(exc)})
        return 4
    emit(result)
    return 0


def _emit(result: dict[str, Any], path: Path | None) -> None:
    """The result as JSON: into ``path`` (written to a temp name, then renamed, so a reader never
    sees half of it), or as the last stdout line (the device scripts capture stdout)."""
    text = json.dumps(result)
    if path is None:
        print(text)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
