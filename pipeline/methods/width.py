"""Width pruning: remove MLP channels and attention KV groups, then compensate by least squares.

Ideas from COMP (arXiv 2501.15255) and Wanda-style structured scores, written for prunefit:

1. **Statistics.** One pass over the calibration windows accumulates, per decoder block, the Gram
   matrix of the input of ``down_proj`` (the MLP's intermediate activations, I x I) and of
   ``o_proj`` (the concatenated head outputs, D x D). Nothing else is kept.
2. **Importance.** A channel's score is the energy it contributes to the block's output:
   ``||W_down[:, j]||^2 * E[a_j^2]``; a KV group's score sums that over the rows of ``o_proj``'s
   input that belong to its query heads. Scores are normalised by the block's total so units in
   different blocks compete on the share of the block they carry.
3. **Budget.** Units (a group of ``width_multiple`` channels, or one KV group with its query heads)
   are taken cheapest-first by score per MiB saved, until the memory model says the model fits.
   Each block keeps at least one KV group and ``min_keep_ratio`` of its channels.
4. **Compensation instead of fine-tuning.** After slicing, the output projection's remaining
   columns are re-fit by ridge least squares so that, on calibration data, the block's output
   matches the dense output: ``W_S' = W Sigma[:, S] (Sigma[S, S] + lambda I)^-1``.

Per-layer widths may differ; the prune record (``pipeline/record.py``) keeps them and
:func:`pipeline.rewrite.load_pruned` rebuilds them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from tqdm.auto import tqdm

from core.arch import arch_for, attention_heads, decoder_layers, head_dim
from core.methods import WidthConfig
from pipeline.methods.base import PruneContext
from pipeline.methods.scores import LayerStats, channel_scores, collect_stats, kv_group_scores
from pipeline.methods.units import (
    Unit,
    kv_group_params,
    mlp_unit_params,
    narrowed,
    narrowest_shape,
    prune_kv_groups,
    prune_mlp,
    removable_channels,
)
from targets.budget import ModelShape, model_shape


class WidthPruner:
    """Plan MLP-channel and KV-group removals cheapest-first, then slice and compensate once."""

    name = "width"
    streams = False
    applied = False  # units are planned; the model changes in finalize

    def __init__(self, cfg: WidthConfig) -> None:
        self.cfg = cfg
        self.units: list[Unit] = []
        self.next = 0
        self.removed: dict[tuple[int, str], list[int]] = {}
        self.stats: list[LayerStats] = []
        self._base_shape: ModelShape | None = None

    def prepare(self, model: Any, calib: torch.Tensor, ctx: PruneContext) -> None:
        cfg = self.cfg
        hd = head_dim(model.config)
        multiple = max(1, cfg.width_multiple)
        self.stats = collect_stats(model, calib, cfg.batch_size)
        self._base_shape = model_shape(model)
        hidden = model.config.hidden_size
        heads_prunable = arch_for(model.config.model_type).per_layer_heads
        units: list[Unit] = []
        for li, (layer, st) in enumerate(zip(decoder_layers(model), self.stats, strict=True)):
            # What a unit adds to the residual stream, relative to what the stream already carries there.
            resid = st.resid_energy / max(st.tokens, 1) or 1.0
            if cfg.score != "energy":
                resid = 1.0  # baselines compare raw scores, as published
            ch = channel_scores(layer, st, cfg.score)
            order = torch.argsort(ch).tolist()
            for g in range(0, removable_channels(len(order), cfg.min_keep_ratio, multiple), multiple):
                idx = order[g : g + multiple]
                units.append(Unit(li, "mlp", float(ch[idx].sum()) / resid, mlp_unit_params(hidden, len(idx)),
                                  indices=idx))  # fmt: skip
            if not heads_prunable:
                continue
            kv = kv_group_scores(layer, st, hd, cfg.score)
            n_q, n_kv = attention_heads(layer.self_attn, hd)
            for g in torch.argsort(kv).tolist()[: n_kv - 1]:
                units.append(Unit(li, "kv", float(kv[g]) / resid, kv_group_params(hidden, n_q // n_kv, hd),
                                  indices=[g]))  # fmt: skip
        for u in units:
            u.priority = u.cost / u.params
        units.sort(key=lambda u: u.priority)
        self.units = units
        self.next = 0

    def most_pruned_shape(self, model: Any, shape: ModelShape) -> ModelShape:
        return narrowest_shape(model, shape, self.cfg.width_multiple, self.cfg.min_keep_ratio)

    def can_step(self, model: Any) -> bool:
        return self.next < len(self.units)

    def step(self, model: Any, calib: torch.Tensor) -> tuple[str, float]:
        u = self.units[self.next]
        self.next += 1
        self.removed.setdefault((u.layer, u.kind), []).extend(u.indices)
        unit = f"{len(u.indices)} MLP channels" if u.kind == "mlp" else f"KV group {u.indices[0]}"
        return f"block {u.layer}: {unit}", u.cost

    def shape(self, model: Any) -> ModelShape:
        base = self._base_shape
        assert base is not None
        layers = [
            narrowed(
                layer, base.hidden_size, len(self.removed.get((li, "mlp"), [])), len(self.removed.get((li, "kv"), []))
            )
            for li, layer in enumerate(base.layers)
        ]
        return dataclasses.replace(base, layers=tuple(layers))

    def finalize(self, model: Any) -> None:
        """Slice every planned unit out and re-fit the output projections by least squares."""
        hd = head_dim(model.config)
        cfg = self.cfg
        for li, layer in enumerate(tqdm(decoder_layers(model), desc="slice + compensate", leave=False, disable=None)):
            st = self.stats[li]
            gone = set(self.removed.get((li, "mlp"), []))
            if gone:
                keep = torch.tensor([i for i in range(layer.mlp.down_proj.in_features) if i not in gone])
                prune_mlp(layer, keep, st.mlp_gram if cfg.compensate else None, cfg.ridge)
            gone_g = set(self.removed.get((li, "kv"), []))
            if gone_g:
                keep_g = torch.tensor([g for g in range(attention_heads(layer.self_attn, hd)[1]) if g not in gone_g])
                prune_kv_groups(layer, keep_g, hd, st.attn_gram if cfg.compensate else None, cfg.ridge)
        self.stats = []
