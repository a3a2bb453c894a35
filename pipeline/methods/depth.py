"""``depth``: remove whole decoder blocks, least Block Influence first (ShortGPT), re-scored after
each removal because the remaining blocks' roles shift. Every step is applied at once, so the
calibration perplexity after each is measured."""

from __future__ import annotations

from typing import Any

import torch

from core.arch import decoder_layers
from core.methods import DepthConfig
from pipeline.methods.base import PruneContext
from pipeline.methods.scores import block_influence
from pipeline.methods.units import biggest_blocks, max_removable_layers
from targets.budget import ModelShape, model_shape


class DepthPruner:
    name = "depth"
    streams = False
    applied = True

    def __init__(self, cfg: DepthConfig) -> None:
        self.cfg = cfg
        self.original_layers = 0
        self.ctx: PruneContext | None = None

    def prepare(self, model: Any, calib: torch.Tensor, ctx: PruneContext) -> None:
        self.original_layers = len(decoder_layers(model))
        self.ctx = ctx

    def shape(self, model: Any) -> ModelShape:
        return model_shape(model)

    def finalize(self, model: Any) -> None:
        return None

    def most_pruned_shape(self, model: Any, shape: ModelShape) -> ModelShape:
        n = max_removable_layers(len(shape.layers), self.cfg.max_removed_layer_ratio)
        return shape.without_layers(biggest_blocks(shape, n))

    def can_step(self, model: Any) -> bool:
        removed = self.original_layers - len(decoder_layers(model))
        return removed < max_removable_layers(self.original_layers, self.cfg.max_removed_layer_ratio)

    def step(self, model: Any, calib: torch.Tensor) -> tuple[str, float]:
        assert self.ctx is not None
        scores = block_influence(model, calib, self.cfg.batch_size)
        idx = min(range(len(scores)), key=scores.__getitem__)
        original = self.ctx.kept_layers[idx]
        self.ctx.remove_blocks(model, [idx])
        return f"block {original}", scores[idx]
