"""Error-compensated rounding (GPTQ, arXiv 2210.17323) baked into fp32 weights, for the exporter's own
quantizer to reproduce exactly.

Round-to-nearest int4 in groups of 32 is too coarse for small models: on Gemma 3 270M onnxruntime's
``int4w`` raised held-out WikiText-2 perplexity 1.56x through the decoder blocks alone (SmolLM2-135M:
1.27x for the whole artifact). GPTQ rounds one input column at a time and spreads each column's
rounding error over the columns not yet rounded, weighted by the inverse Hessian of the layer's
inputs (``X^T X`` on calibration text), so the layer's *outputs* move least. Measured on Gemma 3 270M
(Hessians from 32 x 128 WikiText-2 validation tokens, 8 other windows scored): 1.116x for the decoder.

The exporters quantize fp32 weights themselves (``MatMulNBitsQuantizer``, torchao's ``quantize_``), so
GPTQ's result is handed to them as fp32 values their round-to-nearest maps to GPTQ's codes:

- MatMulNBits (``int4w``/``int8w``, MLAS): a block's scale is its value of largest magnitude over the
  most negative code (``peak / -8``). GPTQ fixes each block's scale from its (error-updated) weights
  when it reaches the block and forces the peak's column to that most negative code, so the block's
  largest magnitude is exactly ``-8 * scale`` and the exporter recomputes the same scale and codes
  (checked bit for bit in tests/exporters/test_rounding.py).
- torchao (``8da4w``): a group's scale is its largest magnitude over 7.5, which does not reproduce
  itself from dequantized values (codes are integers), so the peak keeps its value as the scale's
  anchor (torchao rounds it to +7 or -8 codes, and GPTQ spreads that error like any other) and the
  other codes stay within +-7.

A layer's Hessian is taken from the unrounded model's inputs (all layers in one pass), not from
the already-rounded layers below it: one forward pass instead of one per block. The sequential
variant (each block calibrated on the rounded blocks below it) was not tried here.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from core.schemes import scheme_spec

log = logging.getLogger(__name__)

DAMPING = 0.01  # of the Hessian's mean diagonal, added to it: GPTQ's default, keeps it invertible


def hessians_of(
    model: nn.Module, linears: list[nn.Linear], windows: torch.Tensor, batch: int = 4
) -> dict[nn.Linear, torch.Tensor]:
    """``X^T X`` of every Linear's input over ``windows`` (token ids [n, length]), in fp32. Linears fed
    the same tensor one after another (q/k/v, gate/up) share its product, computed once."""
    acc: dict[nn.Linear, torch.Tensor] = {}
    last: dict[str, Any] = {}  # the previous call's input, its version (in-place writes bump it), X^T X

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inp = args[0]
        if last.get("input") is not inp or last["version"] != inp._version:
            x = inp.detach().reshape(-1, inp.shape[-1]).float()
            last.update(input=inp, version=inp._version, product=x.T @ x)
        product = last["product"]
        acc[module] = acc[module].add_(product) if module in acc else product.clone()  # type: ignore[index]

    handles = [lin.register_forward_pre_hook(hook) for lin in linears]
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch):
                model(windows[start : start + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        last.clear()  # the last input is not kept alive
    return acc  # type: ignore[return-value]


Grid = Literal["mlas", "torchao"]


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, grid: Grid = "mlas") -> torch.Tensor:
    """``weight`` [out, in] rounded by GPTQ in symmetric blocks of ``group`` along the input, returned
    as fp32 values the runtime's round-to-nearest maps to GPTQ's codes and scales:

    - ``mlas`` (MatMulNBits): scale = the block's signed peak / -2^(bits-1); the peak's column takes
      the most negative code, so the block's largest magnitude is exactly -2^(bits-1) scales;
    - ``torchao`` (8da4w): scale = max|block| / ((qmax - qmin) / 2) (7.5 for 4 bits); the peak keeps
      its value (the scale's anchor, which rounds to +7 or -8 codes as torchao computes it) and every
      other code stays within +-qmax, so no value outgrows it."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"input width {cols} is not a whole number of {group}-wide blocks")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # an input that never fires (a pruned channel's leftover): weight irrelevant
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(DAMPING * torch.diag(h).mean())
    # the upper Cholesky factor of H^-1: row c holds how column c's error spreads to the later columns
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    rows_idx = torch.arange(rows)
    for g in range(0, cols, group):
        end = g + group
        block = w[:, g:end]
        peak_col = block.abs().argmax(dim=1)
        peak = block[rows_idx, peak_col].clone()
        if grid == "mlas":
            scale = peak / qmin
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            low = qmin
        else:  # torchao's arithmetic, op for op (exporters.quantized_embedding.symmetric_grid)
            scale = peak.abs().clamp_min(1e-12) / ((qmax - qmin) / 2)
            low = -qmax
        inv = 1.0 / scale
        err = torch.empty_like(block)
        for j in range(group):
            c = g + j
            anchor = peak_col == j
            codes = (w[:, c] * inv if grid == "torchao" else w[:, c] / scale).round().clamp(low, qmax)
            if grid == "mlas":
                codes = torch.where(anchor, torch.full_like(codes, qmin), codes)
                q = baked = codes * scale
            else:
                anchor_code = (peak * inv).round().clamp(qmin, qmax)
                q = torch.where(anchor, anchor_code, codes) * scale
                baked = torch.where(anchor, peak, codes * scale)
            out[:, c] = baked
            e = (w[:, c] - q) / hinv[c, c]
            err[:, j] = e
            w[:, c + 1 : end] -= e[:, None] * hinv[c, c + 1 : end][None, :]
        w[:, end:] -= err @ hinv[g:end, end:]  # the block's errors, spread over the rest at once
    return out


def gptq_rounded(
    model: nn.Module, linears: Iterable[str], windows: torch.Tensor, bits: int, group: int, grid: Grid = "mlas"
) -> nn.Module:
    """A copy of ``model`` whose Linear modules named in ``linears`` hold GPTQ-rounded weights on
    ``grid`` (see :func:`gptq`); ``model`` is left as it was."""
    return gptq_rounded_by(model, dict.fromkeys(linears, (bits, group, grid)), windows)


def gptq_rounded_by(model: nn.Module, plan: dict[str, tuple[int, int, Grid]], windows: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose Linear modules named in ``plan`` hold GPTQ-rounded weights, each at
    its own (bits, group, grid): the blocks and the lm_head may be rounded for different schemes.
    ``model`` is left as it was."""
    rounded = copy.deepcopy(model)
    head, table = rounded.get_output_embeddings(), rounded.get_input_embeddings()  # type: ignore[operator]
    head_name = next((n for n, m in rounded.named_modules() if m is head), None)
    if head is not None and table is not None and head.weight is table.weight and head_name in plan:
        # a tied lm_head is rounded on its own (the schemes that round it store it apart: unties_head);
        # the table it shared stays the fp32 one
        head.weight = nn.Parameter(table.weight.detach().clone(), requires_grad=False)
        rounded.config.tie_word_embeddings = False  # type: ignore[union-attr]
    modules = {name: mod for name, mod in rounded.named_modules() if name in plan and isinstance(mod, nn.Linear)}
    if not modules:
        return rounded
    hessians = hessians_of(rounded, list(modules.values()), windows)
    with torch.no_grad():
        for name, lin in modules.items():
            bits, group, grid = plan[name]
            if lin.in_features % group:
                log.warning(
                    "%s: input width %d is not whole %d-wide blocks; rounded to nearest", name, lin.in_features, group
                )
                continue
            lin.weight.copy_(gptq(lin.weight, hessians[lin], bits, group, grid).to(lin.weight.dtype))
    log.info("GPTQ rounded %d Linear modules on %d calibration windows", len(modules), windows.shape[0])
    return rounded


GPTQ_WINDOWS = 64  # calibration windows the Hessians take at most (64 x 128 tokens)


def rounded_for_export(
    model: nn.Module, scheme: str | None, calibration: Path | None, head: str | None = None
) -> nn.Module:
    """``model`` as its exporter should quantize it, the blocks in ``scheme`` and the lm_head in
    ``head`` (None: ``scheme``; ``fp32``: unquantized): GPTQ-rounded (a copy) where a scheme rounds by
    GPTQ and calibration windows were given, else ``model`` itself (to nearest, warned)."""
    from exporters.quantize import linear_schemes

    plan: dict[str, tuple[int, int, Grid]] = {
        name: (scheme_spec(s).bits, scheme_spec(s).group_size, grid_of(s))
        for name, (_, s) in linear_schemes(model, scheme, head).items()
        if scheme_spec(s).rounding == "gptq"
    }
    if not plan:
        return model
    if calibration is None or not calibration.is_file():
        log.warning("%s: no calibration windows given; weights rounded to nearest, not by GPTQ", scheme or head)
        return model
    from safetensors.torch import load_file

    windows = load_file(str(calibration))["calibration"][:GPTQ_WINDOWS]
    return gptq_rounded_by(model, plan, windows)


def grid_of(scheme: str) -> Grid:
    """The grid ``scheme``'s quantizer rounds to: torchao's for ExecuTorch, MLAS's for onnxruntime."""
    return "torchao" if scheme_spec(scheme).runtime == "executorch" else "mlas"
