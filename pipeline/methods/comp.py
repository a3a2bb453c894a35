"""COMP-style layer-wise structured pruning with condition-aware importance and LS compensation.

Ideas from COMP (Xu et al., arXiv 2501.15255), written for prunefit and its memory budget:

* **Layer-wise, low memory.** Two passes over the decoder, one block resident at a time
  (:class:`pipeline.stream.LayerStream`; with a checkpoint directory the blocks stream from
  safetensors). Pass 1 scores, pass 2 prunes and compensates. Nothing but one block, the
  calibration hidden states and one block's Gram matrices is ever held.
* **Hybrid granularity.** Whole blocks and, inside the blocks that stay, MLP channels and KV
  groups (a KV head with its query heads) compete in one plan. A unit's cost is the share of the
  residual stream's energy that removing it destroys: for a block, ``||h_out - h_in||^2 / ||h||^2``;
  for channels and heads, the *compensated* output error below.
* **Matrix-condition-based importance.** For an output projection ``y = W x`` with calibration Gram
  ``G = sum x x^T``, removing input set ``S`` and re-fitting the rest optimally costs
  ``tr(W_S [G^-1]_SS^-1 W_S^T)``. Compared with the plain energy ``||W_j||^2 G_jj`` this divides by
  the variance inflation factor ``G_jj [G^-1]_jj``: a channel that is well conditioned (independent
  of the others) is expensive to lose, one that is collinear with others is cheap, because the
  others can take over its output. Channels leave greedily in groups of the width multiple, with
  ``G^-1`` and ``W`` down-dated after each group (Optimal Brain Surgeon, structured).
* **Compensation instead of fine-tuning (COMP's mask tuning, in closed form).** Pass 2 runs the
  dense and the pruned model side by side: for every block it re-selects the planned number of
  units on the *pruned* stream's statistics, then solves a ridge least-squares problem for the
  remaining columns of ``o_proj`` / ``down_proj`` so that, on the pruned stream's inputs, the
  sub-layer reproduces the dense model's output (``target="sublayer"``) or also pulls the residual
  stream back toward the dense one (``target="residual"``, Llama-layout blocks).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from core.arch import arch_for, attention_heads, head_dim
from core.methods import CompConfig
from pipeline.methods.base import PruneContext
from pipeline.methods.comp_math import (
    Moments,
    attn_target,
    comp_ridge,
    greedy_obs,
    mlp_target,
    pack,
    paired_moments,
    tap,
    unpack,
)
from pipeline.methods.units import (
    Unit,
    UnitKind,
    kv_group_dims,
    kv_group_params,
    ls_fit,
    max_removable_layers,
    mlp_unit_params,
    narrowed,
    narrowest_shape,
    prune_kv_groups,
    prune_mlp,
    removable_channels,
)
from pipeline.stream import LayerStream
from targets.budget import ModelShape, model_shape

log = logging.getLogger(__name__)


@dataclass
class _LayerPlan:
    mlp: int = 0  # channels to remove
    kv: int = 0  # KV groups to remove
    drop: bool = False


class CompPruner:
    """Plan blocks, MLP channels and KV groups by compensated cost per parameter; apply layer-wise."""

    name = "comp"
    streams = True  # layer-wise: one block resident at a time, from a checkpoint too
    applied = False  # units are planned in pass 1 and applied in finalize (pass 2)

    def __init__(self, cfg: CompConfig) -> None:
        self.cfg = cfg
        self.units: list[Unit] = []
        self.next = 0
        self.plan: list[_LayerPlan] = []
        self.base: ModelShape | None = None
        self.stream: LayerStream | None = None
        self.calib: torch.Tensor | None = None
        self.reconstruction: list[dict[str, Any]] = []
        self.ridge = 0.0
        self.ctx: PruneContext | None = None

    # -- pass 1: score ---------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model: Any, calib: torch.Tensor, ctx: PruneContext) -> None:
        cfg = self.cfg
        self.calib, self.ctx = calib, ctx
        self.ridge = comp_ridge(cfg.ridge, calib.numel())
        self.stream = ctx.stream or LayerStream(model)
        stream = self.stream
        self.base = model_shape(model)
        hd = head_dim(model.config)
        hidden_size = model.config.hidden_size
        multiple = max(1, cfg.width_multiple)
        heads_prunable = arch_for(model.config.model_type).per_layer_heads
        allow_blocks = cfg.blocks
        hidden, kwargs = stream.capture(calib, cfg.batch_size)
        for b, h in enumerate(hidden):
            hidden[b] = pack(h)
        units: list[Unit] = []
        for i in tqdm(range(len(stream)), desc="comp: score blocks", leave=False, disable=None):
            layer = stream.layer(i)
            kw = [k[i] for k in kwargs]
            mlp_m, attn_m = Moments(), Moments()
            resid = update = 0.0
            with tap(layer, "za") as rec:
                for b, k in enumerate(kw):
                    h = unpack(hidden[b])
                    out = layer(h, **k)
                    mlp_m.add(rec["a"])
                    attn_m.add(rec["z"])
                    resid += float(h.pow(2).sum(dtype=torch.float64))
                    update += float((out - h).pow(2).sum(dtype=torch.float64))
                    hidden[b] = pack(out)  # the stream moves on in place: one copy of it at a time
            resid = resid or 1.0
            shape = self.base.layers[i]
            if allow_blocks:
                units.append(Unit(i, "block", update / resid, shape.params))
            assert mlp_m.gram is not None and attn_m.gram is not None
            inter = mlp_m.gram.shape[0]
            removable = removable_channels(inter, cfg.min_keep_ratio, multiple)
            if removable > 0:
                w = layer.mlp.down_proj.weight
                _, costs = greedy_obs(w, mlp_m.gram, [torch.tensor([j]) for j in range(inter)], removable // multiple,
                                      multiple, self.ridge)  # fmt: skip
                units += self._chain(i, "mlp", multiple, costs, resid, mlp_unit_params(hidden_size, multiple))
            if heads_prunable and shape.num_kv_heads > 1:
                groups = [kv_group_dims(layer, [g], hd) for g in range(shape.num_kv_heads)]
                _, costs = greedy_obs(layer.self_attn.o_proj.weight, attn_m.gram, groups, shape.num_kv_heads - 1, 1,
                                      self.ridge)  # fmt: skip
                rep = shape.num_heads // shape.num_kv_heads
                units += self._chain(i, "kv", 1, costs, resid, kv_group_params(hidden_size, rep, hd))
            del mlp_m, attn_m
            stream.release(i)
        if cfg.allocation == "uniform":
            # every block gives up the same number of MLP channels, round by round (heads stay):
            # the n-th unit of each block before the (n+1)-th of any
            mlp_units = [u for u in units if u.kind == "mlp"]
            rank: dict[int, int] = {}
            for u in mlp_units:
                rank[u.layer] = rank.get(u.layer, -1) + 1
                u.priority = rank[u.layer] * len(stream) + u.layer
            units = mlp_units
        else:
            for u in units:
                u.priority = u.cost / u.params
        units.sort(key=lambda u: u.priority)
        self.units = units
        self.next = 0
        self.plan = [_LayerPlan() for _ in range(len(stream))]

    @staticmethod
    def _chain(layer: int, kind: UnitKind, count: int, costs: list[float], resid: float, params: int) -> list[Unit]:
        """Units of one layer in removal order; costs made non-decreasing so they leave in order."""
        out, running = [], 0.0
        for c in costs:
            running = max(running, c / resid)
            out.append(Unit(layer, kind, running, params, count=count))
        return out

    # -- planning (driven by prune_to_budget) ----------------------------------------------------
    def most_pruned_shape(self, model: Any, shape: ModelShape) -> ModelShape:
        cfg = self.cfg
        blocks = cfg.max_removed_layer_ratio if cfg.blocks else None
        return narrowest_shape(model, shape, cfg.width_multiple, cfg.min_keep_ratio, drop_blocks=blocks)

    def can_step(self, model: Any) -> bool:
        return any(self._usable(u) for u in self.units[self.next :])

    def _usable(self, u: Unit) -> bool:
        lp = self.plan[u.layer]
        if lp.drop:
            return False
        if u.kind == "block":
            dropped = sum(p.drop for p in self.plan)
            return dropped < max_removable_layers(len(self.plan), self.cfg.max_removed_layer_ratio)
        return True

    def step(self, model: Any, calib: torch.Tensor) -> tuple[str, float]:
        while not self._usable(self.units[self.next]):
            self.next += 1
        u = self.units[self.next]
        self.next += 1
        lp = self.plan[u.layer]
        if u.kind == "block":
            lp.drop = True
            return f"block {u.layer}", u.cost
        if u.kind == "mlp":
            lp.mlp += u.count
            return f"block {u.layer}: {u.count} MLP channels", u.cost
        lp.kv += u.count
        return f"block {u.layer}: KV group", u.cost

    def shape(self, model: Any) -> ModelShape:
        assert self.base is not None
        base = self.base
        layers = [narrowed(layer, base.hidden_size, lp.mlp, lp.kv) for layer, lp in zip(base.layers, self.plan)]
        return dataclasses.replace(base, layers=tuple(layers)).without_layers(
            {i for i, lp in enumerate(self.plan) if lp.drop}
        )

    # -- pass 2: select on the pruned stream, slice, compensate --------------------------------------
    @torch.no_grad()
    def finalize(self, model: Any) -> None:
        assert self.stream is not None and self.calib is not None
        stream, cfg = self.stream, self.cfg
        hd = head_dim(model.config)
        spec = arch_for(model.config.model_type)
        multiple = max(1, cfg.width_multiple)
        # Per calibration batch, two hidden-sized float16 tensors: the dense stream and the pruned
        # stream, each replaced in place as it moves through a block. The sub-layer targets are
        # recomputed batch by batch from a copy of the dense block (see _paired_moments).
        dense, kwargs = stream.capture(self.calib, cfg.batch_size)
        for b, h in enumerate(dense):
            dense[b] = pack(h)
        pruned = [h.clone() for h in dense]
        for i in tqdm(range(len(stream)), desc="comp: prune + compensate", leave=False, disable=None):
            lp = self.plan[i]
            layer = stream.layer(i)
            kw = [k[i] for k in kwargs]
            if lp.drop or not (lp.kv or lp.mlp):
                for b, k in enumerate(kw):
                    dense[b] = pack(layer(unpack(dense[b]), **k))
                    if not lp.drop:  # an untouched block: both streams go through it
                        pruned[b] = pack(layer(unpack(pruned[b]), **k))
                if lp.drop:
                    stream.release(i)
                else:
                    stream.store(i)
                continue
            residual = cfg.target == "residual" and not spec.sandwich_norms
            reference = copy.deepcopy(layer)  # the dense block: targets and the dense stream's next step
            if lp.kv:
                mom = paired_moments(layer, reference, dense, pruned, kw, "z", attn_target(residual), not lp.mlp)
                self._prune_heads(layer, mom, lp.kv, hd, i)
                del mom
            if lp.mlp:
                mom = paired_moments(layer, reference, dense, pruned, kw, "a", mlp_target(residual), True)
                self._prune_channels(layer, mom, lp.mlp, multiple, i)
                del mom
            del reference
            for b, k in enumerate(kw):
                pruned[b] = pack(layer(unpack(pruned[b]), **k))
            stream.store(i)
        dropped = [i for i, lp in enumerate(self.plan) if lp.drop]
        if dropped:
            assert self.ctx is not None
            self.ctx.remove_blocks(model, dropped)

    def _prune_channels(self, layer: Any, mom: Moments, n: int, multiple: int, li: int) -> None:
        assert mom.gram is not None and mom.cross is not None
        w = layer.mlp.down_proj.weight
        steps, _ = greedy_obs(w, mom.gram, [torch.tensor([j]) for j in range(w.shape[1])], n // multiple, multiple,
                              self.ridge)  # fmt: skip
        gone = {j for s in steps for j in s}
        keep = torch.tensor([j for j in range(w.shape[1]) if j not in gone], dtype=torch.long)
        fitted = ls_fit(mom.cross, mom.gram, keep, self.ridge) if self.cfg.compensate else None
        self._record(li, "mlp", mom, w.double()[:, keep], fitted, keep)
        prune_mlp(layer, keep, None, weight=fitted)

    def _prune_heads(self, layer: Any, mom: Moments, n: int, hd: int, li: int) -> None:
        assert mom.gram is not None and mom.cross is not None
        w = layer.self_attn.o_proj.weight
        n_kv = attention_heads(layer.self_attn, hd)[1]
        groups = [kv_group_dims(layer, [g], hd) for g in range(n_kv)]
        steps, _ = greedy_obs(w, mom.gram, groups, n, 1, self.ridge)
        gone = {g for s in steps for g in s}
        keep_g = [g for g in range(n_kv) if g not in gone]
        keep = kv_group_dims(layer, keep_g, hd)
        fitted = ls_fit(mom.cross, mom.gram, keep, self.ridge) if self.cfg.compensate else None
        self._record(li, "kv", mom, w.double()[:, keep], fitted, keep)
        prune_kv_groups(layer, torch.tensor(keep_g), hd, None, weight=fitted)

    def _record(
        self, li: int, kind: str, mom: Moments, sliced: torch.Tensor, fitted: torch.Tensor | None, keep: torch.Tensor
    ) -> None:
        """Relative reconstruction error of the sub-layer on calibration data, sliced vs fitted."""
        norm = mom.target_energy or 1.0
        entry: dict[str, Any] = {"layer": li, "kind": kind, "sliced": mom.error(sliced, keep) / norm}
        if fitted is not None:
            entry["compensated"] = mom.error(fitted, keep) / norm
        self.reconstruction.append(entry)
        log.debug("block %d %s reconstruction error %s", li, kind, entry)
