"""Post-export quantization, per runtime, as each runtime's own tooling does it.

- ``int8`` (onnxruntime): ``onnxruntime.quantization.quantize_dynamic``: MatMul weights to 8 bits,
  per output channel, activations quantized per call (MatMulInteger). The embedding Gather stays
  fp32 (a tied lm_head that reads it through a Transpose stays fp32 with it). Activations get one
  scale per tensor, which a model with outlier activation channels does not survive (SmolLM2-135M:
  top-1 agreement 48% with fp32, measured with int8 weights). Weights are uint8 (U8U8), not int8:
  on x86 CPUs without VNNI, MLAS's U8S8 kernel sums pairs of products in saturating int16
  (``vpmaddubsw``). On such a host (AVX2 EPYC), a tiny wide Llama's prompt logits were off by 10.4%
  relative RMS with int8 weights, 3.8% with ``reduce_range`` (7-bit weights), and 2.8% with uint8.
  U8U8 has no saturating path on any CPU, and it keeps all 8 bits.
- ``int8w`` (onnxruntime): int8 weights with ``MatMulNBitsQuantizer`` (bits=8, symmetric blocks of 32
  along the input: ``MatMulNBits``), ``accuracy_level=4``: MLAS's int8 GEMM, activations quantized
  per block of 32 at run time (much finer than ``int8``'s one scale per tensor, so outlier channels
  survive). A tied lm_head is untied first: its ``Transpose`` of the embedding becomes its own
  [hidden, vocab] initializer, quantized like the other weights; the embedding Gather stays fp32.
  Measured on SmolLM2-135M pruned to 25 blocks (android-go, 64-token prompt): run peak 236 MiB vs
  285 with the tied fp32 head at ``accuracy_level=0`` (fp32 compute: MLAS dequantizes each weight per
  call, and the fp32 head's transpose is materialised at run time), the same decode speed, top-1
  agreement with fp32 93.8% (96.9%). Untied at ``accuracy_level=0`` peaked at 332 MiB and decoded
  at a third of the speed (the 49152-wide head dequantized per call). A 4-bit embedding
  (``GatherBlockQuantized``) saved 18 MiB more but agreement fell to 90.6%: not taken.
- ``int4w`` (onnxruntime): the same with 4-bit blocks (``MatMulNBits`` bits=4, onnxruntime-genai's
  default precision): weights 0.625 bytes each with their scales, the same int8 activation blocks.
  ``int4w-b128``: the lm_head alone in blocks of 128 (``quantize_head``; see ``core.schemes``).
- ``8da4w`` / ``8da8w`` (executorch): torchao's ``Int8DynamicActivationIntxWeightConfig`` on every
  nn.Linear (lm_head included): int4 weights in groups of 32 (or int8 per channel), activations
  quantized per token at run time; the XNNPACK partitioner lowers them to its dynamically
  quantized GEMMs. The embedding is its own component (``quantize_embedding``: int8 rows or int4
  groups, :mod:`exporters.quantized_embedding`); without it, it stays fp32.

Why these: they are what each runtime accelerates on ARM CPUs without calibration data (dynamic
activation scales), so they need no extra data beyond what pruning already used.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from core.errors import ConfigError, ExportError
from core.schemes import GROUP_SIZE, SchemeSpec, effective_head, embedding_spec, precision_text, scheme_spec

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

# MatMulNBits compute type: 4 = int8 activations per block (MLAS's integer GEMM); 0 = fp32 compute,
# which dequantizes every weight on every call (slower, and a full fp32 copy of the widest weight).
INT8W_ACCURACY_LEVEL = 4


def untie_transposed_weights(model: onnx.ModelProto) -> list[str]:
    """Replace every ``MatMul(x, Transpose(W))`` whose ``W`` is an initializer by ``MatMul(x, W^T)``
    with ``W^T`` its own initializer, so the weight quantizer sees a constant B.

    This is how a tied lm_head looks after export (the embedding transposed); the Gather keeps the
    original. Returns the names of the new initializers."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    untied = []
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        users = consumers.get(node.output[0], [])
        perm = [a.ints for a in node.attribute if a.name == "perm"]
        if not users or any(u.op_type != "MatMul" or u.input[1] != node.output[0] for u in users):
            continue
        if perm and list(perm[0]) != [1, 0]:
            continue
        w = numpy_helper.to_array(inits[node.input[0]], base_dir="")
        if w.ndim != 2:
            continue
        name = f"{node.input[0]}.transposed"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name=name))
        for u in users:
            u.input[1] = name
        graph.node.remove(node)
        untied.append(name)
    return untied


def check_scheme(runtime: str, scheme: str) -> SchemeSpec:
    """``scheme``'s row in ``core.schemes``; an ExportError unless it is one of ``runtime``'s."""
    try:
        return scheme_spec(scheme, runtime)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


def check_embedding_scheme(runtime: str, scheme: str) -> None:
    """ExportError unless ``scheme`` is one of ``runtime``'s embedding rows in ``core.schemes``."""
    try:
        embedding_spec(scheme, runtime)
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


def quantize_torch(model: nn.Module, scheme: str | None, copy_model: bool = True, head: str | None = None) -> nn.Module:
    """A quantized copy of ``model`` (the fp32 model stays as it is, for parity references), the
    blocks' Linear modules in ``scheme`` (None: fp32) and the lm_head in ``head`` (None: ``scheme``;
    ``fp32``: left fp32); ``copy_model=False``: ``model`` itself, quantized in place (a copy the
    caller made already)."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup, quantize_

    def config(name: str) -> Any:
        if name == "8da4w":
            int4 = torch.int4  # type: ignore[attr-defined]
            return Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, weight_granularity=PerGroup(GROUP_SIZE))
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))

    for name in {scheme, effective_head(scheme, head)} - {None}:
        check_scheme("executorch", name)  # type: ignore[arg-type]
    q = copy.deepcopy(model) if copy_model else model
    assigned = linear_schemes(q, scheme, head)
    for name in dict.fromkeys(s for _, s in assigned.values()):

        def chosen(module: nn.Module, fqn: str, name: str = name) -> bool:
            return fqn in assigned and assigned[fqn][1] == name and tiles(module, name)  # type: ignore[arg-type]

        quantize_(q, config(name), filter_fn=chosen)
    return q


def linear_schemes(model: nn.Module, scheme: str | None, head: str | None = None) -> dict[str, tuple[nn.Linear, str]]:
    """Each Linear module of ``model`` that is quantized, by name, with its scheme: the lm_head's
    ``head`` (None: ``scheme``; ``fp32``: none), every other one's ``scheme`` (None: none). Whether
    the scheme can take it (:func:`tiles`) is the caller's to check."""
    lm_head, head_scheme = model.get_output_embeddings(), effective_head(scheme, head)  # type: ignore[operator]
    out = {}
    for fqn, m in model.named_modules():
        wanted = head_scheme if m is lm_head else scheme
        if isinstance(m, nn.Linear) and wanted is not None:
            out[fqn] = (m, wanted)
    return out


def tiles(linear: nn.Linear, scheme: str) -> bool:
    """Whether ``scheme`` can quantize ``linear``: groups that must be whole tile its input width."""
    spec = scheme_spec(scheme)
    return not spec.whole_groups or linear.in_features % spec.group_size == 0


def left_unquantized(model: nn.Module, scheme: str | None, head: str | None = None) -> list[str]:
    """The Linear modules the blocks' ``scheme`` and the lm_head's ``head`` (None: ``scheme``) leave in
    fp32 (a pruned input width that is not a whole number of its groups): named in the export's
    details and the report, never skipped silently."""
    return [fqn for fqn, (m, s) in linear_schemes(model, scheme, head).items() if not tiles(m, s)]


def head_matmul(model: onnx.ModelProto) -> Any | None:
    """The node that computes the logits (the lm_head's MatMul, or its quantized form): found walking
    back from the graph's ``logits`` output through the ops after it (a cast, a soft-cap), or None."""
    producers = {out: node for node in model.graph.node for out in node.output}
    name = next((o.name for o in model.graph.output if o.name == "logits"), model.graph.output[0].name)
    seen = 0
    while name in producers and seen < 16:
        node = producers[name]
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger"):
            return node
        name, seen = node.input[0], seen + 1
    return None


def quantize_onnx(src: Path, dst: Path, scheme: str | None = "int8", head: str | None = None) -> None:
    """Quantize ``src`` into ``dst``, weights in ``dst``'s ``.data`` sidecar: the blocks' MatMuls in
    ``scheme`` (``int8`` dynamic, or ``int8w`` / ``int4w`` MatMulNBits; None: fp32) and the lm_head's in
    ``head`` (None: ``scheme``; ``fp32``: left as it is; else a MatMulNBits scheme). A head quantized
    apart is its own pass over its one node (``nodes_to_include``); the blocks' pass excludes it."""
    head_scheme = effective_head(scheme, head)
    spec = check_scheme("onnxruntime", scheme) if scheme is not None else None
    head_spec = check_scheme("onnxruntime", head_scheme) if head_scheme is not None else None
    dynamic = spec is not None and not spec.group_size
    try:
        if dynamic and head_scheme == scheme:  # every MatMul with a constant weight, the head's too
            _dynamic_int8(src, dst, None)
        else:
            import onnx
            from onnxruntime.quantization.onnx_model import ONNXModel

            model = onnx.load(str(src))
            node = head_matmul(model)
            if node is not None and not node.name:
                node.name = "lm_head_matmul"
            apart = [node.name] if node is not None and head_scheme != scheme else None
            if head_spec is not None:  # MatMulNBits reads a constant B: the tied head gets its own
                untied = untie_transposed_weights(model)
                log.info("%s head: untied %s before quantizing", head_scheme, ", ".join(untied) or "nothing")
            if spec is not None and not dynamic:
                model = _nbits(model, spec, exclude=apart)
            if apart and head_spec is not None:  # only the head: every other MatMul excluded
                others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in apart]
                model = _nbits(model, head_spec, exclude=others)
            target = dst.with_name("head-" + dst.name) if dynamic else dst
            ONNXModel(model).save_model_to_file(str(target), use_external_data_format=True)
            if dynamic:  # the blocks' dynamic int8 after the head's own pass
                _dynamic_int8(target, dst, apart)
    except Exception as exc:
        raise ExportError(
            f"onnxruntime {precision_text(scheme, None, head)} quantization of {src.name} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not dst.with_name(dst.name + ".data").is_file():
        raise ExportError(f"{scheme} quantization wrote no external data file beside {dst}")


def _nbits(model: onnx.ModelProto, spec: SchemeSpec, exclude: list[str] | None = None) -> onnx.ModelProto:
    """``model`` with its MatMuls (less those named in ``exclude``) in MatMulNBits of ``spec``'s bits
    and blocks. (The quantizer's ``nodes_to_include`` adds to its op types, it does not narrow them.)"""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model, bits=spec.bits, block_size=spec.group_size, is_symmetric=True, accuracy_level=INT8W_ACCURACY_LEVEL,
        op_types_to_quantize=("MatMul",), nodes_to_exclude=exclude,
    )  # fmt: skip
    quantizer.process()
    return quantizer.model.model


def _dynamic_int8(src: Path, dst: Path, exclude: list[str] | None) -> None:
    """onnxruntime's dynamic int8 (uint8 weights per channel, see the module docstring) of ``src``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QUInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"],
        use_external_data_format=True, nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True},
    )  # fmt: skip
