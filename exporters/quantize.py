"""Post-export quantization, per runtime, as each runtime's own tooling does it.

- ``int8`` (onnxruntime): ``onnxruntime.quantization.quantize_dynamic``: MatMul weights to int8,
  per output channel, activations quantized per call (MatMulInteger). The embedding Gather stays
  fp32 (a tied lm_head that reads it through a Transpose stays fp32 with it). Activations get one
  scale per tensor, which a model with outlier activation channels does not survive (SmolLM2-135M:
  top-1 agreement 48% with fp32).
- ``int8w`` (onnxruntime): weight-only int8 with ``MatMulNBitsQuantizer`` (bits=8, symmetric blocks of
  32 along the input, fp32 activations: ``MatMulNBits``): the same ~4x smaller weights with no
  activation quantization, for models with outliers. Same fp32 embedding / tied lm_head.
- ``8da4w`` / ``8da8w`` (executorch): torchao's ``Int8DynamicActivationIntxWeightConfig`` on every
  nn.Linear (lm_head included): int4 weights in groups of 32 (or int8 per channel), activations
  quantized per token at run time; the XNNPACK partitioner lowers them to its dynamically
  quantized GEMMs. Embeddings stay fp32.

Why these: they are what each runtime accelerates on ARM CPUs without calibration data (dynamic
activation scales), so they need no extra data beyond what pruning already used.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from torch import nn

from pipeline.errors import ExportError
from targets.profile import QUANT_SCHEMES

log = logging.getLogger(__name__)

SCHEMES = QUANT_SCHEMES  # one table: the profile validates against it, the exporters implement it
GROUP_SIZE = 32  # int4 group: XNNPACK's blockwise kernels take multiples of 32; int8w's block too

# Bytes per quantized linear weight element, scales included (the memory model uses these):
# int8 per channel ~1 B; int4 in groups of 32 with one fp32 scale per group: 0.5 + 4/32.
# int8w: int8 in blocks of 32 along the input with one fp32 scale each: 1 + 4/32.
WEIGHT_BYTES: dict[str, float] = {
    "int8": 1.0,
    "int8w": 1.0 + 4 / GROUP_SIZE,
    "8da8w": 1.0,
    "8da4w": 0.5 + 4 / GROUP_SIZE,
}


def check_scheme(runtime: str, scheme: str) -> None:
    if scheme not in SCHEMES.get(runtime, ()):
        raise ExportError(
            f"Quantization '{scheme}' is not available for {runtime}; it supports: "
            f"{', '.join(SCHEMES.get(runtime, ())) or 'none'}."
        )


def quantize_torch(model: nn.Module, scheme: str) -> nn.Module:
    """A quantized copy of ``model`` (the fp32 model stays as it is, for parity references)."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup, quantize_

    check_scheme("executorch", scheme)
    q = copy.deepcopy(model)
    if scheme == "8da4w":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE))  # type: ignore[attr-defined]
    else:
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))

    def linear_with_groups(module: nn.Module, fqn: str) -> bool:
        # int4 groups must tile the input width; a pruned width that does not is left in fp32
        return isinstance(module, nn.Linear) and (scheme != "8da4w" or module.in_features % GROUP_SIZE == 0)

    quantize_(q, config, filter_fn=linear_with_groups)
    return q


def quantize_onnx(src: Path, dst: Path, scheme: str = "int8") -> None:
    """Quantize ``src`` into ``dst`` (``int8`` dynamic or ``int8w`` weight-only), weights in ``dst``'s
    ``.data`` sidecar."""
    check_scheme("onnxruntime", scheme)
    try:
        if scheme == "int8w":
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
            quantizer = MatMulNBitsQuantizer(
                onnx.load(str(src)), bits=8, block_size=GROUP_SIZE, is_symmetric=True, op_types_to_quantize=("MatMul",)
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(src),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"],
                use_external_data_format=True,
                extra_options={"MatMulConstBOnly": True},
            )
    except Exception as exc:
        raise ExportError(
            f"onnxruntime {scheme} quantization of {src.name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not dst.with_name(dst.name + ".data").is_file():
        raise ExportError(f"{scheme} quantization wrote no external data file beside {dst}")
