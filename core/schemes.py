"""The quantization-scheme table: one row per weight scheme an exporter implements.

A row says which runtime runs it, what a weight costs in bytes (scales included), its group size,
whether int4-style groups must tile a weight's input width (else the weight stays in the model's
precision), whether a tied lm_head gets its own quantized copy, and, where its loading differs from
the runtime's fp32 weights, its own memory-model constants. The profile validates ``quantize:``
against it, the memory model counts bytes from it, the exporters implement it
(``exporters/quantize.py``). Adding a scheme is one row here plus its branch in the exporter.

The embedding table is a component of its own (``EMBEDDING_TABLE``): its schemes are chosen apart
from the linear weights' (``quantize_embedding:``), since the embedding is a gather, not a GEMM, and
on a large-vocabulary model it is most of the weights (Gemma 3 270M: 63%).

The lm_head is a component of its own too (``quantize_head:``): the vocabulary projection is one
GEMM as wide as the vocabulary, so its bytes, its load-time packing and its rounding error differ
from the blocks' (Gemma 3 270M: 168M of its 268M parameters; SmolLM2-135M: 28M of 135M). Its schemes
are the runtime's linear schemes that store a head of its own (``head_schemes_for``), or fp32;
absent, the head follows the linear scheme, as it always has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from core.errors import ConfigError
from core.runtimes import RUNTIME_TABLE, Runtime, RuntimeCost

Scheme = Literal["int8", "int8w", "int4w", "int4w-b128", "8da4w", "8da8w"]

GROUP_SIZE = 32  # int4 group: XNNPACK's blockwise kernels take multiples of 32; int8w's block too


@dataclass(frozen=True)
class SchemeSpec:
    """One weight quantization scheme of one runtime."""

    name: Scheme
    runtime: Runtime
    # Bytes per quantized linear weight element, scales included: int8 per channel ~1 B; int4 in
    # groups of 32 with one fp32 scale per group 0.5 + 4/32; int8 in blocks of 32 with one fp32
    # scale each 1 + 4/32.
    weight_bytes: float
    group_size: int  # 0: per output channel
    bits: int = 8  # of each weight code
    # int4 groups must tile the input width: a (pruned) weight whose input width is not a multiple
    # of the group stays in the model's precision
    whole_groups: bool = False
    unties_head: bool = False  # a tied lm_head is stored as its own quantized weight
    cost: RuntimeCost | None = None  # load-time constants where they differ from the runtime's fp32
    summary: str = ""
    # "nearest": the runtime's quantizer rounds the fp32 weights as they are. "gptq": the weights are
    # first rounded by GPTQ on the calibration text (exporters/rounding.py), onto the very grid the
    # quantizer recomputes, so the artifact holds GPTQ's codes (int4 blocks on small models: Gemma 3
    # 270M's int4w 2.0x -> 1.16x calibration perplexity).
    rounding: Literal["nearest", "gptq"] = "nearest"
    # the lm_head's scheme only (``quantize_head``), never the blocks' (``quantize``): a coarser grid
    # that pays off on one vocabulary-wide GEMM, not on every block
    head_only: bool = False


# MatMulNBits with int8 compute packs every weight into its own layout at load while the mapped source
# pages are resident too, and keeps the packed copy while running: 0.27 / 1.31 of the block weights /
# lm_head at load, 0.32 / 0.20 kept (fitted on SmolLM2 filled to 1024-4096, Gemma 3 270M and three
# tiny models, with the chunk's logits held twice: benchmarks/results/memory_calibration.md; counted
# once, Gemma's excess had gone into the head's term, 0.87).
MATMULNBITS_COST = replace(
    RUNTIME_TABLE["onnxruntime"].cost, session_mib=4.304, gemm_transient_ratio=0.274, head_transient_ratio=1.307,
    gemm_resident_ratio=0.324, head_resident_ratio=0.197, kv_copies=2.249, prediction_margin=0.041,
)  # fmt: skip

# XNNPACK's qd8 GEMMs (8da8w, 8da4w) pack the quantized weights at load and keep packed copies beside
# the program's: the lm_head most (Gemma 3 270M's 262144 x 640 head). Fitted on 8da8w (SmolLM2 at 512
# and 2048 positions, Gemma 3 270M at 1024 on the LLM kernels with its sliding layers' rings), with the
# program's planned activations resident from load on (RuntimeSpec.activations_at_load) and its
# session held at fp32's; 8da4w has its own head terms (below).
QD8_COST = replace(
    RUNTIME_TABLE["executorch"].cost, session_mib=0.31, gemm_transient_ratio=0.09, head_transient_ratio=0.915,
    gemm_resident_ratio=0.0, head_resident_ratio=0.222, kv_copies=1.0, prediction_margin=0.014,
)  # fmt: skip

INT4W_COST = replace(
    MATMULNBITS_COST, session_mib=0.029, gemm_transient_ratio=0.693, head_transient_ratio=1.343,
    gemm_resident_ratio=0.161, head_resident_ratio=1.006, kv_copies=2.483, prediction_margin=0.045,
)  # fmt: skip

SCHEME_TABLE: dict[Scheme, SchemeSpec] = {
    "int8": SchemeSpec(
        "int8", "onnxruntime", weight_bytes=1.0, group_size=0,
        summary="onnxruntime dynamic int8: per-channel uint8 weights, activations per tensor (MatMulInteger)",
    ),
    "int8w": SchemeSpec(
        "int8w", "onnxruntime", weight_bytes=1.0 + 4 / GROUP_SIZE, group_size=GROUP_SIZE, unties_head=True,
        cost=MATMULNBITS_COST,
        summary="onnxruntime MatMulNBits: int8 weights and activations in blocks of 32",
    ),
    "int4w": SchemeSpec(
        "int4w", "onnxruntime", weight_bytes=0.5 + 4 / GROUP_SIZE, group_size=GROUP_SIZE, bits=4, unties_head=True,
        # MatMulNBits' 4-bit blocks (onnxruntime-genai's default precision). With int8 compute MLAS packs
        # them into a layout (codes, scales, block sums) that is not smaller than int8w's, so per stored
        # byte the packed copy is larger. Fitted on SmolLM2 (load and 1024-4096 positions) and Gemma 3
        # 270M (512 positions), whose 28 and 100 MiB heads tell the block and head terms apart: the head
        # packs like int8w's at load (1.34 of its bytes; kept 1.01). The session term is held at
        # SmolLM2's fit (free, four points leave it degenerate).
        cost=INT4W_COST,
        rounding="gptq",
        summary="onnxruntime MatMulNBits: int4 weights in blocks of 32 (GPTQ-rounded), int8 activations per block",
    ),
    "int4w-b128": SchemeSpec(
        "int4w-b128", "onnxruntime", weight_bytes=0.5 + 4 / 128, group_size=128, bits=4, unties_head=True,
        # int4w's blocks four times as long, for the lm_head alone: MLAS's int8-compute layout keeps a
        # scale and a block sum per block, so on Gemma 3 270M's 262144 x 640 head the packed copy is
        # 45 MiB smaller, its stored codes 15 MiB (the dense model at 512 positions: run peak 497.9 ->
        # 421.5 MiB, load 344.4 -> 284.4, decode 35.0 -> 36.3 tok/s), at a coarser grid (its head
        # alone, rounded to nearest: 1.09x -> 1.17x calibration perplexity). The head's terms: int4w's
        # less that pair's measured difference (load 1.047; kept 1.006 - 0.516); the rest is int4w's.
        cost=replace(INT4W_COST, head_transient_ratio=1.047, head_resident_ratio=0.49),
        rounding="gptq",
        head_only=True,
        summary="onnxruntime MatMulNBits: int4 lm_head in blocks of 128 (GPTQ-rounded), int8 activations per block",
    ),
    "8da4w": SchemeSpec(
        "8da4w", "executorch", weight_bytes=0.5 + 4 / GROUP_SIZE, group_size=GROUP_SIZE, bits=4, whole_groups=True,
        # its int4 head keeps more while running than 8da8w's (fitted on SmolLM2 at 512 and 2048
        # positions; the session and the blocks' terms held at 8da8w's); its load transient is held
        # at Gemma 3 270M's 100 MiB head's (0.761: SmolLM2's 17 MiB heads fitted 0.166 and
        # under-predicted Gemma's load by 23%)
        cost=replace(QD8_COST, head_transient_ratio=0.761, head_resident_ratio=0.483, prediction_margin=0.001),
        rounding="gptq",
        summary="torchao 8-bit dynamic activations, int4 weights in groups of 32 (XNNPACK)",
    ),
    "8da8w": SchemeSpec(
        "8da8w", "executorch", weight_bytes=1.0, group_size=0, cost=QD8_COST,
        summary="torchao 8-bit dynamic activations, int8 weights per channel (XNNPACK)",
    ),
}  # fmt: skip


def genai_shares_quantized_table(scheme: str | None) -> bool:
    """Whether onnxruntime-genai's builder gathers the embedding from the quantized lm_head's codes
    (GatherBlockQuantized takes 4-bit codes only), i.e. a tied table is stored once, quantized. With
    int8 weights it keeps an fp32 Gather table beside the int8 head."""
    return scheme is not None and SCHEME_TABLE[scheme].bits == 4  # type: ignore[index]


EmbeddingScheme = Literal["int8", "int4"]


@dataclass(frozen=True)
class EmbeddingSpec:
    """One embedding-table scheme: symmetric integer codes gathered and dequantized per looked-up row.

    ExecuTorch runs them with its portable ``quantized_decomposed::embedding_byte`` / ``embedding_4bit``
    kernels (``executorch.kernels.quantized``), the ops its own ``export_llm --embedding_quantize``
    emits. onnxruntime has none here: with the head untied (``int8w``) its fp32 embedding stays
    memory-mapped and only the rows looked up are resident, so quantizing it saves disk, not memory."""

    name: EmbeddingScheme
    runtimes: tuple[Runtime, ...]
    bits: int
    group_size: int  # 0: one scale per row (the whole hidden width)

    def bytes_per_row(self, width: int) -> float:
        """Stored bytes of one row of ``width`` values: the codes and one fp32 scale per group."""
        groups = 1 if self.group_size == 0 else math.ceil(width / self.group_size)
        return width * self.bits / 8 + 4 * groups


EMBEDDING_TABLE: dict[EmbeddingScheme, EmbeddingSpec] = {
    # int8 per row: export_llm's "8,0"; int4 in groups of 32: its "4,32"
    "int8": EmbeddingSpec("int8", ("executorch",), bits=8, group_size=0),
    "int4": EmbeddingSpec("int4", ("executorch",), bits=4, group_size=GROUP_SIZE),
}


def embedding_schemes_for(runtime: str) -> tuple[EmbeddingScheme, ...]:
    """The embedding schemes ``runtime`` runs, in table order."""
    return tuple(name for name, spec in EMBEDDING_TABLE.items() if runtime in spec.runtimes)


def smallest_embedding_scheme(runtime: str) -> EmbeddingScheme | None:
    """The embedding scheme of ``runtime`` with the fewest bits (None: it has none)."""
    by_bits = sorted(embedding_schemes_for(runtime), key=lambda name: EMBEDDING_TABLE[name].bits)
    return by_bits[0] if by_bits else None


def embedding_spec(name: str, runtime: str) -> EmbeddingSpec:
    """The embedding row of ``name`` for ``runtime``, or a ConfigError listing the choices."""
    spec = EMBEDDING_TABLE.get(name)  # type: ignore[call-overload]
    if spec is None or runtime not in spec.runtimes:
        choices = embedding_schemes_for(runtime)
        raise ConfigError(
            f"Embedding quantization '{name}' is not available for {runtime}; "
            f"it supports: {', '.join(choices) or 'none'}."
        )
    return spec


HEAD_FP32 = "fp32"  # quantize_head's value for a vocabulary projection kept in the model's precision
HeadScheme = Literal["int8w", "int4w", "int4w-b128", "8da4w", "8da8w", "fp32"]


def head_schemes_for(runtime: str) -> tuple[Scheme, ...]:
    """The linear schemes of ``runtime`` the lm_head may take on its own: those whose exporter
    quantizes a head apart from the blocks (MatMulNBits on its own MatMul, torchao on its own
    Linear), and the head-only rows (``SchemeSpec.head_only``). onnxruntime's dynamic ``int8`` is not
    one: it quantizes every MatMul with a constant weight or none, and a tied head reads the table
    through a Transpose."""
    return tuple(
        name for name, spec in SCHEME_TABLE.items() if spec.runtime == runtime and name != "int8"
    )  # fmt: skip


def effective_head(linear: str | None, head: str | None) -> str | None:
    """The scheme the lm_head is stored in: ``head`` where set (``fp32``: None), else the linear
    scheme's (the head follows the blocks unless told otherwise)."""
    if head is None:
        return linear
    return None if head == HEAD_FP32 else head


def precision_text(linear: str | None, embedding: str | None = None, head: str | None = None) -> str:
    """A runtime's precision in words: its linear scheme (left out when None), its lm_head's where it
    differs (``head``: None follows the linear scheme), and, where quantized, its embedding table's:
    ``8da8w + 8da4w head + int8 embedding``. The one wording of the report, gates and logs."""
    parts = [linear] if linear else []
    blocks = None if linear in (None, HEAD_FP32) else linear  # "fp32" as candidates spell it
    if head is not None and effective_head(blocks, head) != blocks:
        parts.append(f"{head} head")
    if embedding and embedding != "fp32":
        parts.append(f"{embedding} embedding")
    return " + ".join(parts)


def schemes_for(runtime: str) -> tuple[Scheme, ...]:
    """The schemes ``runtime`` implements for the blocks' linear weights, in table order (head-only
    rows are ``head_schemes_for``'s)."""
    return tuple(name for name, spec in SCHEME_TABLE.items() if spec.runtime == runtime and not spec.head_only)


def smallest_scheme(runtime: str) -> Scheme:
    """The scheme of ``runtime`` that stores a weight in the fewest bytes (the floor of its options)."""
    return min(schemes_for(runtime), key=lambda s: SCHEME_TABLE[s].weight_bytes)


def scheme_spec(name: str, runtime: str | None = None) -> SchemeSpec:
    """The row of ``name`` (checked against ``runtime`` when given), or a ConfigError listing the choices."""
    spec = SCHEME_TABLE.get(name)  # type: ignore[call-overload]
    if spec is None or (runtime is not None and spec.runtime != runtime):
        choices = schemes_for(runtime) if runtime is not None else tuple(SCHEME_TABLE)
        where = f" for {runtime}" if runtime is not None else ""
        raise ConfigError(
            f"Quantization '{name}' is not available{where}; it supports: {', '.join(choices) or 'none'}."
        )
    return spec


def rounds_by_gptq(scheme: str | None) -> bool:
    """Whether ``scheme``'s weights are GPTQ-rounded on calibration text before its quantizer runs."""
    spec = SCHEME_TABLE.get(scheme) if scheme else None  # type: ignore[call-overload]
    return spec is not None and spec.rounding == "gptq"


def runtime_cost(runtime: Runtime, scheme: str | None = None) -> RuntimeCost:
    """The memory model's constants for ``runtime`` running weights quantized with ``scheme`` (None: fp32)."""
    spec = SCHEME_TABLE.get(scheme) if scheme else None  # type: ignore[call-overload]
    return spec.cost if spec is not None and spec.cost is not None else RUNTIME_TABLE[runtime].cost


def component_costs(runtime: Runtime, linear: str | None, head: str | None) -> tuple[RuntimeCost, RuntimeCost]:
    """The constants of a program whose blocks are in ``linear`` and whose lm_head is in ``head``
    (both None: fp32; ``head`` the effective one, :func:`effective_head`): (the program's, the
    head's). The program's give the session, the KV and logits copies and the blocks' packing: the
    blocks' scheme's, or, where the blocks are fp32, the head's session and copies (a quantized head
    brings the quantized kernels' session) with fp32's packing, since fp32 blocks pack as fp32 whatever
    the head (Gemma 3 270M's fp32 blocks + int8w head loaded 793.8 MiB; int8w's block ratios predicted
    907.1, fp32's 811). The head's give the vocabulary projection's packing. The one rule for the
    memory model (``targets.budget.estimate``) and its calibration."""
    program, head_cost = runtime_cost(runtime, linear or head), runtime_cost(runtime, head)
    if linear is None and head is not None:
        fp32 = runtime_cost(runtime)
        program = replace(
            program, gemm_transient_ratio=fp32.gemm_transient_ratio, gemm_resident_ratio=fp32.gemm_resident_ratio
        )
    return program, head_cost


def cost_group(runtime: str, scheme: str | None = None) -> str:
    """Which constants ``runtime`` running ``scheme`` uses, by name: ``runtime/scheme`` where the
    scheme has its own (``runtime_cost`` returns them), else ``runtime`` (fp32's). The calibration
    fits, and holds margins to, one set of constants per name."""
    spec = SCHEME_TABLE.get(scheme) if scheme else None  # type: ignore[call-overload]
    return f"{runtime}/{scheme}" if spec is not None and spec.cost is not None else runtime
