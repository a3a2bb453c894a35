"""What pruning a given amount would cost, measured cheaply enough to rank every candidate plan.

A candidate precision that does not fit on its own needs pruning for the rest, and comparing it
with a smaller precision that fits needs the loss of that pruning. Running the pruning method for
every candidate would take minutes each, so the proxy prunes without compensation: every block
gives up the same share of its MLP channels, the lowest by their share of the block's output energy
(``pipeline/methods/scores.py``), masked (their ``down_proj`` columns zeroed) rather than removed,
and the calibration perplexity is measured with the mask on. The pruning methods compensate what
they remove (comp) and choose where to remove it, so the proxy over-states their loss: it ranks
candidates conservatively, and the report shows the measured loss of the plan chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from core.arch import decoder_layers
from core.perplexity import perplexity
from pipeline.methods.scores import LayerStats, channel_scores, collect_stats
from pipeline.methods.units import narrowed
from targets.budget import ModelShape

log = logging.getLogger(__name__)

MAX_SHARE = 0.9  # the proxy never masks more than this share of a block's MLP channels
STEP = 0.01  # shares are searched on this grid


def share_shape(shape: ModelShape, share: float) -> ModelShape:
    """``shape`` with ``share`` of every block's MLP channels removed."""
    layers = tuple(
        narrowed(layer, shape.hidden_size, round(share * layer.intermediate_size), 0) for layer in shape.layers
    )
    return replace(shape, layers=layers)


def smallest_share(shape: ModelShape, fits: Callable[[ModelShape], bool]) -> float | None:
    """The smallest MLP-channel share (on the :data:`STEP` grid) whose shape ``fits``; 0 when the
    model fits as it is; None when even :data:`MAX_SHARE` does not."""
    if fits(shape):
        return 0.0
    lo, hi = 0, round(MAX_SHARE / STEP)
    if not fits(share_shape(shape, hi * STEP)):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(share_shape(shape, mid * STEP)) else (mid, hi)
    return hi * STEP


class PruningProxy:
    """Calibration perplexity after uniform, uncompensated MLP-channel pruning of a given share."""

    def __init__(self, model: Any, calib: torch.Tensor, batch_size: int = 4) -> None:
        self.model, self.calib, self.batch_size = model, calib, batch_size
        self._stats: list[LayerStats] | None = None
        self._cache: dict[float, float] = {}

    @torch.no_grad()
    def perplexity(self, share: float) -> float:
        share = round(share, 4)
        if share in self._cache:
            return self._cache[share]
        if self._stats is None:
            self._stats = collect_stats(self.model, self.calib, self.batch_size)
        saved = []
        try:
            for layer, st in zip(decoder_layers(self.model), self._stats, strict=True):
                down = layer.mlp.down_proj
                k = round(share * down.in_features)
                if k == 0:
                    continue
                drop = torch.argsort(channel_scores(layer, st))[:k]
                saved.append((down, down.weight.data[:, drop].clone(), drop))
                down.weight.data[:, drop] = 0
            ppl = perplexity(self.model, self.calib, self.batch_size, desc=f"pruning proxy ({share:.0%})")
        finally:
            for down, cols, drop in saved:
                down.weight.data[:, drop] = cols
        log.info("pruning proxy: %.0f%% of MLP channels masked -> calibration perplexity %.2f", 100 * share, ppl)
        self._cache[share] = ppl
        return ppl
