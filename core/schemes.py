"""The quantization-scheme table: one row per weight scheme an exporter implements.

A row says which runtime runs it, what a weight costs in bytes (scales included), its group size,
whether int4-style groups must tile a weight's input width (else the weight stays in the model's
precision), whether a tied lm_head gets its own quantized copy, and, where its loading differs from
the runtime's fp32 weights, its own memory-model constants. The profile validates ``quantize:``
against it, the memory model counts bytes from it, the exporters implement it
(``exporters/quantize.py``). Adding a scheme is one row here plus its branch in the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from core.errors import ConfigError
from core.runtimes import RUNTIME_TABLE, Runtime, RuntimeCost

Scheme = Literal["int8", "int8w", "8da4w", "8da8w"]

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
    # int4 groups must tile the input width: a (pruned) weight whose input width is not a multiple
    # of the group stays in the model's precision
    whole_groups: bool = False
    unties_head: bool = False  # a tied lm_head is stored as its own quantized weight
    cost: RuntimeCost | None = None  # load-time constants where they differ from the runtime's fp32
    summary: str = ""


SCHEME_TABLE: dict[Scheme, SchemeSpec] = {
    "int8": SchemeSpec(
        "int8", "onnxruntime", weight_bytes=1.0, group_size=0,
        summary="onnxruntime dynamic int8: per-channel uint8 weights, activations per tensor (MatMulInteger)",
    ),
    "int8w": SchemeSpec(
        "int8w", "onnxruntime", weight_bytes=1.0 + 4 / GROUP_SIZE, group_size=GROUP_SIZE, unties_head=True,
        # MatMulNBits with int8 compute packs every weight into its own layout at load while the mapped
        # source pages are resident too: 0.41 of the block weights, 0.55 of the lm_head (fitted on
        # SmolLM2 for android-go and three tiny models; fp32's ratios under-predict them by 26-28%).
        cost=replace(
            RUNTIME_TABLE["onnxruntime"].cost, session_mib=5.66, gemm_transient_ratio=0.406, head_transient_ratio=0.552
        ),
        summary="onnxruntime MatMulNBits: int8 weights and activations in blocks of 32",
    ),
    "8da4w": SchemeSpec(
        "8da4w", "executorch", weight_bytes=0.5 + 4 / GROUP_SIZE, group_size=GROUP_SIZE, whole_groups=True,
        summary="torchao 8-bit dynamic activations, int4 weights in groups of 32 (XNNPACK)",
    ),
    "8da8w": SchemeSpec(
        "8da8w", "executorch", weight_bytes=1.0, group_size=0,
        summary="torchao 8-bit dynamic activations, int8 weights per channel (XNNPACK)",
    ),
}  # fmt: skip


def schemes_for(runtime: str) -> tuple[Scheme, ...]:
    """The schemes ``runtime`` implements, in table order."""
    return tuple(name for name, spec in SCHEME_TABLE.items() if spec.runtime == runtime)


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


def runtime_cost(runtime: Runtime, scheme: str | None = None) -> RuntimeCost:
    """The memory model's constants for ``runtime`` running weights quantized with ``scheme`` (None: fp32)."""
    spec = SCHEME_TABLE.get(scheme) if scheme else None  # type: ignore[call-overload]
    return spec.cost if spec is not None and spec.cost is not None else RUNTIME_TABLE[runtime].cost
