"""Each quantization scheme simulated in PyTorch, to measure what it costs before anything is exported.

The fitting stage ranks precisions by the calibration loss they add. Exporting every candidate to
measure it would take minutes per scheme, so each scheme of ``core.schemes`` is reproduced here as
quantize-dequantize arithmetic on the fp32 model: weights rounded to the scheme's grid (per output
channel, or in groups along the input), and activations rounded as the runtime rounds them at run
time (per token, per block of the input, or per tensor). The weights of the modules a scheme touches
are swapped for rounded copies and restored on exit, so the model is left exactly as it was.

How each runtime quantizes (the exporters in ``exporters/quantize.py``):

- ``int8`` (onnxruntime ``quantize_dynamic``): uint8 weights per output channel, asymmetric;
  activations uint8 with one scale per tensor (``DynamicQuantizeLinear``). A tied lm_head reads the
  embedding through a Transpose, not a constant, so it stays fp32.
- ``int8w`` / ``int4w`` (``MatMulNBits`` 8- or 4-bit, accuracy level 4): symmetric weights in blocks
  of 32 along the input, scaled as MLAS scales them (the block's signed peak on the most negative
  code); activations symmetric int8 per block of 32 (MLAS's integer GEMM). The head is untied and
  quantized. ``int4w-b128`` (a lm_head's only): blocks of 128, and MLAS quantizes the activations in
  blocks of the weights' length (measured on a 640 x 512 MatMul: its output matches 128-long
  activation blocks, not 32).
- ``int4w`` and ``8da4w`` are exported GPTQ-rounded (``exporters/rounding.py``); given windows, the
  simulation rounds so too, with Hessians from them (the fit passes windows held out from its score
  where it has any: in-sample flatters it, Gemma 3 270M int4w 1.09x vs 1.16x held out).
- ``8da8w`` / ``8da4w`` (torchao on every nn.Linear, head included): int8 per output channel or int4
  in groups of 32, symmetric; activations asymmetric int8 per token. ``8da4w`` leaves a Linear whose
  input width is not a whole number of groups in fp32, as the exporter does.
- The lm_head (``quantize_head``): its own scheme's rounding, or fp32, where it differs from the blocks'.
- Embedding tables (``quantize_embedding``, ExecuTorch): rows rounded by the exporter's own function,
  the lm_head left as it is (``simulated_embedding``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.arch import decoder_layers, tied_head
from core.schemes import GROUP_SIZE, effective_head, embedding_spec, scheme_spec
from exporters.quantize import tiles
from exporters.quantized_embedding import dequantized, symmetric_grid
from exporters.rounding import gptq, grid_of, hessians_of

Rounding = Callable[[torch.Tensor], torch.Tensor]


def _symmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` (last dim = one scale group) to a symmetric signed grid, as torchao does:
    scale = max|x| / ((qmax - qmin) / 2), codes clamped to [qmin, qmax]."""
    codes, scale = symmetric_grid(x, bits)
    return codes * scale


def _signed_absmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` (last dim = one block) as onnxruntime's MatMulNBits quantizer does (MLAS): the
    value of largest magnitude maps to the most negative code, scale = that value / -2^(bits-1), so
    the block's range spends the full negative end (measured on its output: scales are exactly
    signed absmax / -8 for 4 bits, / -128 for 8 bits)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    peak = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))
    scale = peak / qmin
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (x / scale).round().clamp(qmin, qmax) * scale


def _asymmetric(x: torch.Tensor, bits: int, dim: int | None = -1) -> torch.Tensor:
    """Round ``x`` to an unsigned grid spanning [min, max] (zero always representable), one scale per
    slice along ``dim`` (None: the whole tensor)."""
    levels = 2**bits - 1
    if dim is None:
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    else:
        lo = x.amin(dim=dim, keepdim=True).clamp(max=0)
        hi = x.amax(dim=dim, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = (-lo / scale).round()
    return ((x * (1.0 / scale)).round() + zero).clamp(0, levels).sub(zero) * scale


def _in_groups(fn: Callable[[torch.Tensor], torch.Tensor], group: int) -> Rounding:
    """Apply ``fn`` to consecutive groups of ``group`` elements of the last dim (zero-padded)."""

    def grouped(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        pad = (-n) % group
        y = nn.functional.pad(x, (0, pad)) if pad else x
        out = fn(y.reshape(*y.shape[:-1], -1, group)).reshape(y.shape)
        return out[..., :n] if pad else out

    return grouped


@dataclass(frozen=True)
class Simulation:
    """How one scheme rounds a Linear's weight ([out, in]) and its input activations."""

    weight: Rounding
    activation: Rounding
    quantizes_tied_head: bool  # a lm_head that shares the embedding's weight is quantized too


def _matmulnbits(scheme: str) -> Simulation:
    """A MatMulNBits scheme (accuracy level 4) as its row in ``core.schemes`` says: weights rounded as
    MLAS rounds them, in blocks of the row's length, and activations symmetric int8 in blocks of the
    same length (MLAS quantizes them per weight block)."""
    spec = scheme_spec(scheme)
    return Simulation(
        weight=_in_groups(lambda w: _signed_absmax(w, spec.bits), spec.group_size),
        activation=_in_groups(lambda x: _symmetric(x, 8), spec.group_size),
        quantizes_tied_head=True,
    )


SIMULATIONS: dict[str, Simulation] = {
    "int8": Simulation(
        weight=lambda w: _asymmetric(w, 8, dim=-1),
        activation=lambda x: _asymmetric(x, 8, dim=None),
        quantizes_tied_head=False,
    ),
    "int8w": _matmulnbits("int8w"),
    "int4w": _matmulnbits("int4w"),
    "int4w-b128": _matmulnbits("int4w-b128"),
    "8da8w": Simulation(
        weight=lambda w: _symmetric(w, 8),
        activation=lambda x: _asymmetric(x, 8, dim=-1),
        quantizes_tied_head=True,
    ),
    "8da4w": Simulation(
        weight=_in_groups(lambda w: _symmetric(w, 4), GROUP_SIZE),
        activation=lambda x: _asymmetric(x, 8, dim=-1),
        quantizes_tied_head=True,
    ),
}


def quantized_linears(model: Any, scheme: str | None, head: str | None = None) -> list[tuple[nn.Linear, str]]:
    """The Linear modules the exporters quantize, each with its scheme: every decoder block's in
    ``scheme`` (None: none), and the lm_head in its own scheme (``head``: ``quantize_head``'s value,
    None following ``scheme``, ``fp32`` none), unless it is tied and that scheme keeps a tied head
    fp32; never one whose input width does not tile its scheme's groups when it requires whole groups."""
    picked: list[tuple[nn.Linear, str]] = []
    if scheme is not None:
        picked += [(m, scheme) for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]
    lm_head, head_scheme = model.get_output_embeddings(), effective_head(scheme, head)
    quantizes = head_scheme is not None and (SIMULATIONS[head_scheme].quantizes_tied_head or not tied_head(model))
    if isinstance(lm_head, nn.Linear) and quantizes:
        picked.append((lm_head, head_scheme))  # type: ignore[arg-type]
    return [(m, s) for m, s in picked if tiles(m, s)]


@contextmanager
def simulated(
    model: Any, scheme: str | None, windows: torch.Tensor | None = None, head: str | None = None
) -> Iterator[int]:
    """Within the block, ``model`` computes as an artifact with the blocks in ``scheme`` and the
    lm_head in ``head`` (None: ``scheme``; ``fp32``: unquantized) would (weights and activations
    rounded); yields how many Linear modules were quantized. Restores every weight on exit. A scheme
    that rounds by GPTQ (``core.schemes.rounds_by_gptq``) takes its Hessians from ``windows`` (None:
    rounded to nearest, as its exporter does without calibration text)."""
    linears = quantized_linears(model, scheme, head)
    saved: list[tuple[nn.Linear, Any]] = []
    handles = []
    start: dict[nn.Linear, torch.Tensor] = {lin: lin.weight.detach().float() for lin, _ in linears}
    by_gptq = [(lin, s) for lin, s in linears if scheme_spec(s).rounding == "gptq"]
    if by_gptq and windows is not None:
        hessians = hessians_of(model, [lin for lin, _ in by_gptq], windows)
        for lin, s in by_gptq:
            spec = scheme_spec(s)
            if lin.in_features % spec.group_size == 0:
                start[lin] = gptq(lin.weight, hessians.pop(lin), spec.bits, spec.group_size, grid_of(s))

    def rounding_inputs(sim: Simulation) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def round_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (sim.activation(args[0].float()).to(args[0].dtype), *args[1:])

        return round_input

    try:
        for lin, s in linears:
            sim = SIMULATIONS[s]
            saved.append((lin, lin.weight))
            lin.weight = nn.Parameter(sim.weight(start.pop(lin)).to(lin.weight.dtype), requires_grad=False)
            handles.append(lin.register_forward_pre_hook(rounding_inputs(sim)))
        yield len(linears)
    finally:
        for h in handles:
            h.remove()
        for lin, weight in saved:
            lin.weight = weight


@contextmanager
def simulated_embedding(model: Any, scheme: str, runtime: str = "executorch") -> Iterator[int]:
    """Within the block, ``model``'s embedding lookups return what ``scheme``'s quantized table gives
    back (the exporter's own rounding, :func:`exporters.quantized_embedding.dequantized`), while a tied
    lm_head keeps the weight it had; yields the rows rounded. Restores the embedding's weight on exit."""
    embed = model.get_input_embeddings()
    spec = embedding_spec(scheme, runtime)
    original = embed.weight
    try:
        embed.weight = nn.Parameter(dequantized(original.detach(), spec), requires_grad=False)
        yield int(original.shape[0])
    finally:
        embed.weight = original
