"""MultiPruner-style pruning: training-free, iterative, balanced across blocks, MLP channels and heads.

Ideas from MultiPruner (Munoz et al., arXiv 2501.09949), written for prunefit:

* The removal target is split across three dimensions by a distribution (``shares``,
  shares of removed parameters for blocks : MLP channels : KV groups). Each step serves the
  dimension furthest below its share, so the mix holds at every point of the budget search.
* Inside a dimension every layer offers one candidate: the block itself, its next group of
  ``group`` MLP channels, or its next KV group (with its query heads). Channels and
  groups are ordered beforehand by an importance score (their output energy) so that groups are
  contiguous in importance. The step removes the candidate whose removal raises calibration
  perplexity least, scored by a real forward pass. Only the ``shortlist`` candidates
  that change their own block's output least (one block forward each) get that pass: a candidate
  in block ``L`` costs the blocks from ``L`` on plus the lm_head, and scoring all of them made a
  20% run on SmolLM2-135M take over 40 minutes.
* Candidates are evaluated by masking (zeroing the output columns a removal takes away, or skipping
  the block), which is exactly the pruned function; the slicing happens once at the end.
  Hidden states entering each block are cached, so a candidate in block ``L`` only re-runs the
  blocks from ``L`` on.

No compensation (the paper has none); ``comp`` is prunefit's compensated method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from core.arch import arch_for, decoder_layers, head_dim
from core.methods import MultiPrunerConfig
from pipeline.methods.base import PruneContext
from pipeline.methods.scores import channel_scores, collect_stats, kv_group_scores
from pipeline.methods.units import (
    kv_group_dims,
    kv_group_params,
    max_removable_layers,
    mlp_unit_params,
    narrowed,
    narrowest_shape,
    prune_kv_groups,
    prune_mlp,
)
from pipeline.stream import LayerStream
from targets.budget import ModelShape, model_shape

log = logging.getLogger(__name__)
EVAL_WINDOWS = 4  # calibration windows scored per candidate (MultiPruner uses a small subset too)


class MultiPruner:
    name = "multipruner"
    streams = False
    applied = False  # candidates are masked while scoring; slicing happens in finalize

    def __init__(self, cfg: MultiPrunerConfig) -> None:
        self.cfg = cfg
        self.ctx: PruneContext | None = None
        self.base: ModelShape | None = None
        self.dropped: set[int] = set()
        self.mlp_removed: dict[int, list[int]] = {}
        self.kv_removed: dict[int, list[int]] = {}
        self.mlp_order: list[list[int]] = []
        self.kv_order: list[list[int]] = []
        self.removed_params = {"block": 0, "mlp": 0, "kv": 0}
        self.hidden: list[torch.Tensor] = []  # hidden state entering each block (current model)
        self.kwargs: list[dict[str, Any]] = []
        self.ids: torch.Tensor | None = None

    # -- setup ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model: Any, calib: torch.Tensor, ctx: PruneContext) -> None:
        cfg, self.ctx = self.cfg, ctx
        self.base = model_shape(model)
        hd = head_dim(model.config)
        stats = collect_stats(model, calib, cfg.batch_size)
        layers = decoder_layers(model)
        self.mlp_order = [torch.argsort(channel_scores(layer, st)).tolist() for layer, st in zip(layers, stats)]
        self.heads = arch_for(model.config.model_type).per_layer_heads
        self.kv_order = [
            torch.argsort(kv_group_scores(layer, st, hd)).tolist() if self.heads else []
            for layer, st in zip(layers, stats)
        ]
        del stats
        self.ids = calib[:EVAL_WINDOWS]
        hidden, kwargs = LayerStream(model).capture(self.ids, self.ids.shape[0])
        self.kwargs = kwargs[0]
        self.hidden = [hidden[0]] + [hidden[0]] * len(layers)
        self._refresh(model, 0)

    def _block_out(self, model: Any, i: int, h: torch.Tensor) -> torch.Tensor:
        if i in self.dropped:
            return h
        return decoder_layers(model)[i](h, **self.kwargs[i])

    @torch.no_grad()
    def _refresh(self, model: Any, start: int) -> None:
        """Recompute cached block inputs from block ``start`` on (after a change there)."""
        for i in range(start, len(decoder_layers(model))):
            self.hidden[i + 1] = self._block_out(model, i, self.hidden[i])

    @torch.no_grad()
    def _ppl_from(self, model: Any, start: int, skip: int | None = None) -> float:
        h = self.hidden[start]
        for i in range(start, len(decoder_layers(model))):
            h = h if i == skip else self._block_out(model, i, h)
        logits = model.lm_head(model.get_decoder().norm(h))[:, :-1].float()
        assert self.ids is not None
        target = self.ids[:, 1:]
        return math.exp(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))))

    # -- candidates ----------------------------------------------------------------------------------
    def _next_mlp(self, model: Any, i: int) -> list[int] | None:
        done = self.mlp_removed.get(i, [])
        inter = len(self.mlp_order[i])
        keep_min = max(self.cfg.width_multiple, int(self.cfg.min_keep_ratio * inter))
        g = self.cfg.group
        if i in self.dropped or inter - len(done) - g < keep_min:
            return None
        return self.mlp_order[i][len(done) : len(done) + g]

    def _next_kv(self, i: int) -> int | None:
        done = self.kv_removed.get(i, [])
        if not self.heads or i in self.dropped or len(self.kv_order[i]) - len(done) <= 1:
            return None
        return self.kv_order[i][len(done)]

    @contextlib.contextmanager
    def _masked(self, model: Any, i: int, kind: str, unit: Any) -> Iterator[None]:
        """Block ``i`` computes as if the MLP channels / KV group ``unit`` were removed (their
        output columns zeroed), until the context exits."""
        layer = decoder_layers(model)[i]
        if kind == "mlp":
            w = layer.mlp.down_proj.weight
            cols = torch.tensor(unit)
        else:
            w = layer.self_attn.o_proj.weight
            cols = kv_group_dims(layer, [unit], head_dim(model.config))
        saved = w[:, cols].clone()
        w[:, cols] = 0.0
        try:
            yield
        finally:
            w[:, cols] = saved

    def _masked_ppl(self, model: Any, i: int, kind: str, unit: Any) -> float:
        """Calibration perplexity with the candidate removed."""
        if kind == "block":
            return self._ppl_from(model, i, skip=i)
        with self._masked(model, i, kind, unit):
            return self._ppl_from(model, i)

    def _local_change(self, model: Any, i: int, kind: str, unit: Any) -> float:
        """Relative change of block ``i``'s output if the candidate goes: the shortlist's cheap proxy."""
        ref = self.hidden[i + 1]
        if kind == "block":
            out = self.hidden[i]
        else:
            with self._masked(model, i, kind, unit):
                out = self._block_out(model, i, self.hidden[i])
        return float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12))

    def _unit_params(self, i: int, kind: str) -> int:
        assert self.base is not None
        shape, hidden = self.base.layers[i], self.base.hidden_size
        if kind == "block":
            return self.shape_params(i)
        if kind == "mlp":
            return mlp_unit_params(hidden, self.cfg.group)
        return kv_group_params(hidden, shape.num_heads // shape.num_kv_heads, shape.head_dim)

    def shape_params(self, i: int) -> int:
        return self._current_layers()[i].params

    # -- Pruner protocol -------------------------------------------------------------------------------
    def _dimensions(self, model: Any) -> list[str]:
        shares = dict(zip(("block", "mlp", "kv"), self.cfg.shares, strict=True))
        dims = [d for d, s in shares.items() if s > 0 and self._has_candidate(model, d)]
        return sorted(dims, key=lambda d: self.removed_params[d] / shares[d])

    def _has_candidate(self, model: Any, kind: str) -> bool:
        n = len(decoder_layers(model))
        if kind == "block":
            return len(self.dropped) < max_removable_layers(n, self.cfg.max_removed_layer_ratio)
        if kind == "mlp":
            return any(self._next_mlp(model, i) is not None for i in range(n))
        return any(self._next_kv(i) is not None for i in range(n))

    def can_step(self, model: Any) -> bool:
        return bool(self._dimensions(model))

    @torch.no_grad()
    def step(self, model: Any, calib: torch.Tensor) -> tuple[str, float]:
        cfg = self.cfg
        kind = self._dimensions(model)[0]
        best: tuple[float, int, Any] | None = None
        candidates: list[tuple[int, Any]] = []
        for i in range(len(decoder_layers(model))):
            unit: Any
            if kind == "block":
                unit = None if i in self.dropped else i
            elif kind == "mlp":
                unit = self._next_mlp(model, i)
            else:
                unit = self._next_kv(i)
            if unit is not None:
                candidates.append((i, unit))
        if len(candidates) > cfg.shortlist:
            change = [self._local_change(model, i, kind, unit) for i, unit in candidates]
            ranked = sorted(range(len(candidates)), key=change.__getitem__)
            candidates = [candidates[k] for k in ranked[: cfg.shortlist]]
        for i, unit in candidates:
            ppl = self._masked_ppl(model, i, kind, unit)
            if best is None or ppl < best[0]:
                best = (ppl, i, unit)
        assert best is not None
        ppl, i, unit = best
        self.removed_params[kind] += self._unit_params(i, kind)
        layer = decoder_layers(model)[i]
        if kind == "block":
            self.dropped.add(i)
            what = f"block {i}"
        elif kind == "mlp":
            self.mlp_removed.setdefault(i, []).extend(unit)
            layer.mlp.down_proj.weight[:, torch.tensor(unit)] = 0.0
            what = f"block {i}: {len(unit)} MLP channels"
        else:
            self.kv_removed.setdefault(i, []).append(unit)
            layer.self_attn.o_proj.weight[:, kv_group_dims(layer, [unit], head_dim(model.config))] = 0.0
            what = f"block {i}: KV group {unit}"
        self._refresh(model, i)
        return what, ppl

    def _current_layers(self) -> list[Any]:
        assert self.base is not None
        return [
            narrowed(layer, self.base.hidden_size, len(self.mlp_removed.get(i, [])), len(self.kv_removed.get(i, [])))
            for i, layer in enumerate(self.base.layers)
        ]

    def shape(self, model: Any) -> ModelShape:
        assert self.base is not None
        return dataclasses.replace(self.base, layers=tuple(self._current_layers())).without_layers(self.dropped)

    def most_pruned_shape(self, model: Any, shape: ModelShape) -> ModelShape:
        cfg = self.cfg
        return narrowest_shape(model, shape, cfg.width_multiple, cfg.min_keep_ratio, cfg.max_removed_layer_ratio)

    def finalize(self, model: Any) -> None:
        hd = head_dim(model.config)
        for i, layer in enumerate(decoder_layers(model)):
            gone = set(self.mlp_removed.get(i, []))
            if gone and i not in self.dropped:
                keep = torch.tensor([j for j in range(layer.mlp.down_proj.in_features) if j not in gone])
                prune_mlp(layer, keep, None)
            gone_g = set(self.kv_removed.get(i, []))
            if gone_g and i not in self.dropped:
                n_kv = len(self.kv_order[i])
                prune_kv_groups(layer, torch.tensor([g for g in range(n_kv) if g not in gone_g]), hd, None)
        if self.dropped:
            assert self.ctx is not None
            self.ctx.remove_blocks(model, sorted(self.dropped))
        self.hidden = []
