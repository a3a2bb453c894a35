"""The runtime table: one row per runtime prunefit exports to, with every fact other modules need.

A row says which exporter writes the artifact, which Python modules must be importable, how the
runtime stores weights (memory-mapped or loaded, a tied embedding once or twice), how its KV cache
is held, and the memory model's constants for it. Adding a runtime is one row here, one exporter
module and one loader in ``targets/runner.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from core.errors import ConfigError

Runtime = Literal["onnxruntime", "executorch"]


@dataclass(frozen=True)
class RuntimeCost:
    """What a runtime adds on top of weights, KV cache and activations.

    - ``library_mib``: resident code/data of the runtime library in the device's runner (not
      measurable here, where the host is Python; profiles override it via runtime_overhead_mib).
    - ``session_mib``: fixed allocations of a loaded session (thread pools, arenas, plans). The
      runtime's code is not in it: what the run pages in is the library's (the runner measures it
      out), so ExecuTorch, whose planned buffers are the activations and KV cache, fits at 0.
    - ``gemm_transient_ratio`` / ``head_transient_ratio``: both runtimes repack GEMM weights into
      their kernels' layout while loading (MLAS prepack, XNNPACK packing), and the peak holds part
      of the source and the packed copy at once. Two terms, because the measured share differs by
      an order of magnitude: the decoder blocks' GEMMs (many small weights, packed one after the
      other) cost a few percent of their size, the vocabulary projection (one 49152 x 576 weight
      for SmolLM2, packed or transposed whole) most of its size. One weight-proportional ratio
      could not fit both the default model and the tiny test models (three points off by 9-13%).

    The peak is the larger of two phases that never overlap: loading (weights + session + the
    transients, + the KV cache where it is preallocated: ExecuTorch's planned cache is resident from
    load on, measured growing the load peak by exactly its size from 1024 to 4096 positions) and
    running at full context (weights + session + ``kv_copies`` caches + activations).

    Fitted by least squares (``benchmarks/memory_calibration.py``) on the model-attributable peaks
    of every point in ``benchmarks/results/memory_calibration.json``, each residual relative to its
    point: the load phase on the runner's load peaks, ``kv_copies`` on its context fills.
    """

    library_mib: float
    session_mib: float
    gemm_transient_ratio: float
    head_transient_ratio: float
    # Copies of the KV cache resident at the run's peak (a prefill chunk at full context). A static
    # cache is one. onnxruntime's past/present is more: the past fed in and the present coming out
    # are both whole caches, and its arena keeps the blocks of earlier, shorter presents that the
    # next, longer one cannot reuse. Fitted on full-context runs (benchmarks/memory_calibration.py).
    kv_copies: float = 1.0
    # Weights kept resident beside the stored ones while running, as a share of them: kernels that
    # keep their packed layout as well as the (mapped) source (MatMulNBits: ~0.4 of the blocks), and
    # the same for the vocabulary projection (a quantized XNNPACK head on ExecuTorch).
    gemm_resident_ratio: float = 0.0
    head_resident_ratio: float = 0.0
    # The largest share by which these constants under-predicted a real model's measured peak in the
    # calibration data (benchmarks/memory_calibration.py writes it per runtime/scheme group; a test
    # holds it to the data). Fitting, pruning and the feasibility check add it to the prediction of
    # the model's part, so a plan they call fitting holds at the worst case the calibration saw, not
    # only on average (rpi4 with precision: fp32 pruned ExecuTorch to 796.0 MiB predicted of 800; it
    # measured 820.9). Per group, not per runtime: one runtime-wide margin charged fp32 the
    # quantized schemes' worst misses.
    prediction_margin: float = 0.0
    # Copies of one prefill chunk's logits resident at the run's peak (one is in the activations).
    # onnxruntime's memory pattern (SessionOptions.enable_mem_pattern, on by default) allocates one
    # block for a call's planned intermediates when its input shapes were seen before, while the
    # arena still holds the blocks the first such call took: an app that prefills a second prompt
    # from position 0 holds the chunk's intermediates twice, and on a large vocabulary they are its
    # logits. Measured, not fitted: Gemma 3 270M int8w, a second 128-token prefill from position 0
    # peaked 327-330 MiB over the loaded session where the first peaked 184 (+143-146 for 128 MiB of
    # logits); with the pattern off, 199. A static program (ExecuTorch) plans them once.
    logits_copies: float = 1.0

    def run_resident_mib(self, gemm_mib: float, head_mib: float) -> float:
        """Packed weight copies the run keeps beside the stored ``gemm_mib`` of block weights and
        the ``head_mib`` vocabulary projection."""
        return self.gemm_resident_ratio * gemm_mib + self.head_resident_ratio * head_mib

    def load_transient_mib(self, gemm_mib: float, head_mib: float) -> float:
        """What loading holds beyond the loaded weights while it repacks them (freed once loaded),
        for ``gemm_mib`` of decoder-block weights and a ``head_mib`` vocabulary projection."""
        return self.gemm_transient_ratio * gemm_mib + self.head_transient_ratio * head_mib


@dataclass(frozen=True)
class RuntimeSpec:
    """One runtime: who writes its artifact, what it needs installed, how it holds the model."""

    name: Runtime
    exporter: str  # "module:Class" of the exporter that writes its artifact (imported lazily)
    requires: tuple[str, ...]  # importable modules, checked before any model loads
    cost: RuntimeCost  # fp32 constants of the memory model
    # Whether the runtime memory-maps its weights from the artifact, so that an embedding table that
    # is only gathered from (not also read whole as the lm_head) stays on disk but for the rows looked
    # up. onnxruntime maps external-data initializers (measured: an int8w model with an untied head
    # peaked ~100 MiB under its stored weights); the ExecuTorch runner here loads the program's data.
    maps_weights: bool
    # Whether the runtime keeps one copy of a tied embedding / lm_head: ONNX from torch.onnx's dynamo
    # exporter shares the initializer; an ExecuTorch program serialises the lm_head weight separately.
    stores_tied_once: bool
    # Whether the KV cache is allocated whole at load (ExecuTorch's static cache is planned memory of
    # the program) or grows with the tokens seen (ONNX past/present tensors).
    kv_preallocated: bool
    # Whether a sliding-window layer's cache rolls (holds its window and one call's tokens, not the
    # context): both exporters' do, without data-dependent branches (exporters.kv_cache: a fixed
    # window - 1 ONNX past; exporters.llm_ops: an ExecuTorch ring). A runtime fed full caches would not.
    kv_windowed: bool
    # Whether one prefill chunk's attention materializes its scores against every cached position
    # (chunk x context per head): onnxruntime's exported softmax(QK^T)V does; ExecuTorch's
    # llama::custom_sdpa tiles them (measured: its run peak grew by the KV cache alone from 1024 to
    # 4096 positions), sliding-window rings included.
    materializes_scores: bool = True
    # Whether one prefill chunk's activations are resident from load on: an ExecuTorch program's
    # planned memory (activations sized for the largest chunk, its logits included) is allocated and
    # touched when the method loads, so the load phase holds it too. Measured on Gemma 3 270M, same
    # plan at 256- and 128-token chunks: load peaks 1173.5 vs 1041.4 MiB, 132.1 MiB apart where the
    # chunk's activations differ by 132.0 (a 262k-vocabulary logits row is 1 MiB a token).
    activations_at_load: bool = False


RUNTIME_TABLE: dict[Runtime, RuntimeSpec] = {
    "onnxruntime": RuntimeSpec(
        name="onnxruntime",
        exporter="exporters.onnx:OnnxExporter",
        requires=("onnx", "onnxscript", "onnxruntime"),
        # libonnxruntime.so for arm64 Android/Linux maps ~20 MiB; ORT Mobile minimal builds are smaller.
        cost=RuntimeCost(
            20.0,
            session_mib=4.251,
            gemm_transient_ratio=0.024,
            head_transient_ratio=0.999,
            gemm_resident_ratio=0.005,
            kv_copies=2.495,
            prediction_margin=0.038,
            logits_copies=2.0,
        ),
        maps_weights=True,
        stores_tied_once=True,
        kv_preallocated=False,
        kv_windowed=True,
    ),
    "executorch": RuntimeSpec(
        name="executorch",
        exporter="exporters.executorch:ExecuTorchExporter",
        requires=("executorch.exir", "executorch.runtime"),
        # The ExecuTorch runtime core + XNNPACK delegate is a few MiB of code. Loading holds the planned
        # memory (static cache, a chunk's activations) and packs the fp32 lm_head into a copy of its own
        # size (1.0: Gemma 3 270M's 640 MiB head added 640.5 MiB); every real point is predicted within
        # -2.6%..-0.4% (over), so no margin (benchmarks/results/memory_calibration.md).
        cost=RuntimeCost(
            4.0,
            session_mib=0.317,
            gemm_transient_ratio=0.025,
            head_transient_ratio=1.0,
            gemm_resident_ratio=0.032,
            head_resident_ratio=0.093,
            kv_copies=1.0,
            prediction_margin=0.0,
        ),
        maps_weights=False,
        stores_tied_once=False,
        kv_preallocated=True,
        kv_windowed=True,
        materializes_scores=False,
        activations_at_load=True,
    ),
}
RUNTIMES: tuple[Runtime, ...] = tuple(RUNTIME_TABLE)


def runner_backend(runtime: Runtime, onnx_format: str = "onnx") -> str:
    """The targets/runner.py backend that runs ``runtime``'s artifact as the device's app would:
    a GenAI folder through onnxruntime-genai's Generator, everything else in its own runtime."""
    return "onnxruntime-genai" if runtime == "onnxruntime" and onnx_format == "genai" else runtime


# A GenAI folder's quantized lm_head (one int4/int8 table shared with the embedding's
# GatherBlockQuantized) keeps a packed copy ~4.3x its stored size while running: SmolLM2 int4w filled to
# 1024 positions peaked 285.7 MiB where the MatMulNBits constants alone predict 213.4 (load: 201.7 vs
# 193.3). Provisional: one model, one point (benchmarks/results/genai.md), until the calibration has more.
GENAI_QUANTIZED_HEAD_RESIDENT = 4.28


def format_spec(
    runtime: Runtime, onnx_format: str = "onnx", cost: RuntimeCost | None = None, quantized: bool = False
) -> RuntimeSpec:
    """``runtime``'s row as its artifact format holds the KV cache, with ``cost`` (a scheme's
    constants, default the row's). onnxruntime-genai's Generator shares one past/present buffer per
    layer, allocated whole at ``max_length`` when the generator is created, so the cache is one
    copy, resident from load on, where a plain session holds 2.3-2.6; and it loads the weights
    instead of mapping them (targets.budget.genai_weight_terms). Measured on SmolLM2 fp32 filled to
    1024 positions: 780.2 MiB, predicted 778.7 with onnxruntime's other constants."""
    spec = RUNTIME_TABLE[runtime]
    cost = cost or spec.cost
    if runner_backend(runtime, onnx_format) != "onnxruntime-genai":
        return replace(spec, cost=cost)
    held = {"head_resident_ratio": GENAI_QUANTIZED_HEAD_RESIDENT} if quantized else {}
    # logits once: the Generator's one measured point (SmolLM2 int4w at 1024) was fitted so
    return replace(
        spec, kv_preallocated=True, maps_weights=False, cost=replace(cost, kv_copies=1.0, logits_copies=1.0, **held)
    )


def runtime_spec(name: str) -> RuntimeSpec:
    """The row of ``name``; an unknown runtime is a ConfigError listing the known ones."""
    try:
        return RUNTIME_TABLE[name]  # type: ignore[index]
    except KeyError:
        raise ConfigError(f"Unknown runtime '{name}'. Available: {', '.join(RUNTIMES)}.") from None
