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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from core.arch import arch_for, head_dim
from pipeline.rewrite import remove_layers
from pipeline.stream import LayerStream
from pipeline.width import _narrowed, kv_group_dims, narrowest_shape, prune_kv_groups, prune_mlp, record_widths
from targets.budget import ModelShape, layer_shape, model_shape

log = logging.getLogger(__name__)


# -- condition-aware greedy removal ---------------------------------------------------------------
def greedy_obs(
    weight: torch.Tensor,
    gram: torch.Tensor,
    blocks: list[torch.Tensor],
    n_steps: int,
    per_step: int = 1,
    ridge: float = 1e-3,
) -> tuple[list[list[int]], list[float]]:
    """Remove ``n_steps`` x ``per_step`` input blocks of ``weight`` [out, n], cheapest first.

    ``blocks`` are groups of input dims that leave together (one channel, or one KV group's
    query-head dims). Returns the block ids removed at each step and the increase of the
    compensated squared output error (summed over calibration tokens) that step caused.

    ``G^-1`` and ``W`` are down-dated after each step *and compacted* to the dims still alive, so
    the work shrinks as channels leave: measured 2x faster than full-size down-dates on a
    1536-channel MLP (this loop was over half of comp's wall time at 32 x 128 calibration tokens).
    """
    w = weight.detach().double()
    ginv = _ridge_inverse(gram, ridge)
    dims = torch.arange(ginv.shape[0])  # original dim of each row/column still in ``ginv`` (sorted)
    alive = list(range(len(blocks)))
    singles = all(len(b) == 1 for b in blocks)
    if singles:  # position of block j is its dim's position in ``dims``
        dims = torch.cat(blocks)
        w = w.index_select(1, dims)
        ginv = ginv.index_select(0, dims).index_select(1, dims)
    steps: list[list[int]] = []
    costs: list[float] = []
    for _ in range(n_steps):
        if singles:  # positions and blocks are aligned: alive[p] is the block at position p
            cost = w.pow(2).sum(0) / ginv.diagonal().clamp_min(1e-30)
            picked = torch.argsort(cost)[:per_step]
            take = [alive[int(p)] for p in picked]
            pos = picked
        else:
            where = {b: torch.searchsorted(dims, blocks[b]) for b in alive}
            cost_b = []
            for b in alive:
                d = where[b]
                m = torch.linalg.pinv(ginv[d][:, d])
                cost_b.append(float(((w[:, d] @ m) * w[:, d]).sum()))
            take = [alive[j] for j in sorted(range(len(alive)), key=cost_b.__getitem__)[:per_step]]
            pos = torch.cat([where[b] for b in take])
        mask = torch.ones(ginv.shape[0], dtype=torch.bool)
        mask[pos] = False
        keep = torch.nonzero(mask).squeeze(1)  # index_select with indices: boolean masks gather slowly
        rows = ginv.index_select(0, pos)  # [|s|, n]
        m = torch.linalg.pinv(rows.index_select(1, pos))
        w_s = w.index_select(1, pos)
        steps.append(take)
        costs.append(max(float(((w_s @ m) * w_s).sum()), 0.0))
        cross = rows.index_select(1, keep)  # [|s|, n_keep]
        w = w.index_select(1, keep)
        w.addmm_(w_s @ m, cross, alpha=-1.0)
        ginv = ginv.index_select(0, keep).index_select(1, keep)
        ginv.addmm_(cross.T @ m, cross, alpha=-1.0)
        dims = dims.index_select(0, keep)
        alive = [alive[p] for p in keep.tolist()] if singles else [b for b in alive if b not in set(take)]
    return steps, costs


def _ridge_inverse(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + lam I)^-1`` in float64 with ``lam = ridge x mean(diag G)``, holding one n x n copy
    besides ``gram`` (Cholesky in place, then its inverse; 1536^2 doubles are 18 MiB a copy)."""
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    g = gram.double().clone() if gram.dtype == torch.float64 else gram.double()  # own copy either way
    g.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(g, out=(g, torch.empty((), dtype=torch.int32)))
    if int(info):  # not positive definite in floating point: fall back to a general inverse
        g = gram.double().clone()
        g.diagonal().add_(lam)
        return torch.linalg.inv(g)
    return torch.cholesky_inverse(chol)


def ls_fit(
    cross: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """argmin_W sum ||W x_keep - t||^2 + lam ||W - prior||^2 with ``cross = sum t x^T`` [out, n] and
    ``gram = sum x x^T``; ``lam`` is ``ridge`` times the mean diagonal of the kept Gram block.

    Shrinking toward the layer's own (sliced) weights rather than toward zero means a strong
    ridge degrades gracefully to plain slicing instead of to a dead layer.
    """
    g = gram.index_select(0, keep).index_select(1, keep).double()
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
    g.diagonal().add_(lam)
    rhs = cross.index_select(1, keep).double()
    if prior is not None:
        rhs = rhs + lam * prior.double()
    return torch.linalg.solve(g, rhs.T).T


RIDGE_TOKENS = 4096  # calibration tokens at which ``PruneConfig.comp_ridge`` applies as given


def comp_ridge(ridge: float, tokens: int) -> float:
    """The relative ridge for ``tokens`` calibration tokens: ``ridge`` up to RIDGE_TOKENS, then
    shrinking as ``1 / sqrt(tokens)``, the rate at which the Gram matrices' sampling noise shrinks:
    more data needs less shrinkage. Never more than ``ridge`` (smaller sets were not measured)."""
    return ridge * min(1.0, (RIDGE_TOKENS / max(tokens, 1)) ** 0.5)


# -- capturing sub-layer inputs and outputs ------------------------------------------------------
@contextmanager
def _tap(layer: Any, keys: str = "zoam") -> Iterator[dict[str, torch.Tensor]]:
    """While the block runs, keep the latest input/output of o_proj (z, o) and down_proj (a, m) as
    [tokens, features], only those named in ``keys``. One batch at a time: statistics are
    accumulated by the caller."""
    rec: dict[str, torch.Tensor] = {}

    def hook(kin: str, kout: str) -> Any:
        def fn(mod: Any, args: tuple, out: torch.Tensor) -> None:
            if kin in keys:
                rec[kin] = _flat(args[0])
            if kout in keys:
                rec[kout] = _flat(out)

        return fn

    handles = [
        layer.self_attn.o_proj.register_forward_hook(hook("z", "o")),
        layer.mlp.down_proj.register_forward_hook(hook("a", "m")),
    ]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def _flat(h: torch.Tensor) -> torch.Tensor:
    return h.detach().reshape(-1, h.shape[-1]).float()


@dataclass
class _Moments:
    """Running ``sum x x^T``, ``sum t x^T`` and ``sum ||t||^2`` of a linear layer's input x and target t.

    Accumulated in float32 (each batch's product by sgemm, about twice the speed of float64 and
    half the memory; the products grow with the calibration set) and solved in float64: the ridge
    (``comp_ridge`` x the mean diagonal) bounds the conditioning far above float32's 1e-7 rounding."""

    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    target_energy: float = 0.0

    def add(self, x: torch.Tensor, t: torch.Tensor | None = None) -> None:
        # accumulate in place (addmm_): no n x n temporary per batch
        if self.gram is None:
            self.gram = x.T @ x
        else:
            self.gram.addmm_(x.T, x)
        if t is not None:
            if self.cross is None:
                self.cross = t.T @ x
            else:
                self.cross.addmm_(t.T, x)
            self.target_energy += float(t.pow(2).sum(dtype=torch.float64))

    def error(self, w: torch.Tensor, keep: torch.Tensor) -> float:
        """sum ||W x_keep - t||^2 over the accumulated tokens, from the moments alone."""
        assert self.gram is not None and self.cross is not None
        w = w.double()
        g = self.gram[keep][:, keep].double()
        quad = float(((w @ g) * w).sum())
        lin = float((w * self.cross[:, keep].double()).sum())
        return quad - 2.0 * lin + self.target_energy


def _pack(h: torch.Tensor) -> torch.Tensor:
    """Calibration hidden states rest in float16 between blocks: half the memory of the largest
    thing pruning holds, at a rounding (2^-11 relative) far below the pruning error it measures.
    Blocks still compute in float32 (:func:`_unpack`). A batch outside float16's range stays float32."""
    half = h.detach().half()
    return half if bool(torch.isfinite(half).all()) else h.detach().float()


def _unpack(h: torch.Tensor) -> torch.Tensor:
    return h.float()


def _paired_moments(
    layer: Any,
    reference: Any,
    dense: list[torch.Tensor],
    pruned: list[torch.Tensor],
    kw: list[dict[str, Any]],
    key: str,
    target: Target,
    advance: bool,
) -> _Moments:
    """Moments of ``layer``'s sub-layer input ``key`` (z or a) on the pruned stream against
    ``target``, computed per batch from the dense block ``reference`` run on the dense stream.

    Targets are recomputed here rather than kept for the whole calibration set: a copy of one
    block costs less than two hidden-state-sized target lists. With ``advance`` the dense stream
    moves on to the reference block's output as each batch is done."""
    mom = _Moments()
    for b, k in enumerate(kw):
        h_d = _unpack(dense[b])
        with _tap(reference, "om") as ref:
            out = reference(h_d, **k)
        h_p = _unpack(pruned[b])
        with _tap(layer, key + "o") as rec:
            layer(h_p, **k)
        mom.add(rec[key], target(h_d, ref, h_p, rec))
        if advance:
            dense[b] = _pack(out)
        del h_d, h_p, out, ref, rec
    return mom


Target = Callable[[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def _attn_target(residual: bool) -> Target:
    """What o_proj should produce on a batch: the dense block's attention output, plus
    (``residual``) the gap between the dense and the pruned stream entering the block."""

    def target(h_d: torch.Tensor, ref: dict[str, torch.Tensor], h_p: torch.Tensor, rec: dict) -> torch.Tensor:
        return ref["o"] + _flat(h_d) - _flat(h_p) if residual else ref["o"]

    return target


def _mlp_target(residual: bool) -> Target:
    """What down_proj should produce: the dense MLP output, plus (``residual``) the dense minus the
    pruned residual stream after attention."""

    def target(h_d: torch.Tensor, ref: dict[str, torch.Tensor], h_p: torch.Tensor, rec: dict) -> torch.Tensor:
        if not residual:
            return ref["m"]
        return ref["m"] + (_flat(h_d) + ref["o"]) - (_flat(h_p) + rec["o"])

    return target


@dataclass
class _Unit:
    layer: int
    kind: str  # "block" | "mlp" | "kv"
    count: int  # channels or KV groups this unit removes (block: 0)
    cost: float  # share of the residual stream's energy lost
    params: int
    priority: float = 0.0


@dataclass
class _LayerPlan:
    mlp: int = 0  # channels to remove
    kv: int = 0  # KV groups to remove
    drop: bool = False


class CompPruner:
    """Plan blocks, MLP channels and KV groups by compensated cost per parameter; apply layer-wise."""

    name = "comp"

    def __init__(self) -> None:
        self.units: list[_Unit] = []
        self.next = 0
        self.plan: list[_LayerPlan] = []
        self.base: ModelShape | None = None
        self.compensate = True
        self.cfg: Any = None
        self.stream: LayerStream | None = None
        self.calib: torch.Tensor | None = None
        self.reconstruction: list[dict[str, Any]] = []
        self.ridge = 0.0

    # -- pass 1: score ---------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, model: Any, calib: torch.Tensor, cfg: Any) -> None:
        self.cfg, self.calib = cfg, calib
        self.compensate = cfg.compensate
        self.ridge = comp_ridge(cfg.comp_ridge, calib.numel())
        self.stream = getattr(model, "prunefit_stream", None) or LayerStream(model)
        stream = self.stream
        self.base = model_shape(model)
        hd = head_dim(model.config)
        hidden_size = model.config.hidden_size
        multiple = max(1, cfg.width_multiple)
        heads_prunable = arch_for(model.config.model_type).per_layer_heads
        allow_blocks = cfg.comp_blocks
        hidden, kwargs = stream.capture(calib, cfg.batch_size)
        for b, h in enumerate(hidden):
            hidden[b] = _pack(h)
        units: list[_Unit] = []
        for i in tqdm(range(len(stream)), desc="comp: score blocks", leave=False, disable=None):
            layer = stream.layer(i)
            kw = [k[i] for k in kwargs]
            mlp_m, attn_m = _Moments(), _Moments()
            resid = update = 0.0
            with _tap(layer, "za") as rec:
                for b, k in enumerate(kw):
                    h = _unpack(hidden[b])
                    out = layer(h, **k)
                    mlp_m.add(rec["a"])
                    attn_m.add(rec["z"])
                    resid += float(h.pow(2).sum(dtype=torch.float64))
                    update += float((out - h).pow(2).sum(dtype=torch.float64))
                    hidden[b] = _pack(out)  # the stream moves on in place: one copy of it at a time
            resid = resid or 1.0
            shape = self.base.layers[i]
            if allow_blocks:
                units.append(_Unit(i, "block", 0, update / resid, shape.params))
            assert mlp_m.gram is not None and attn_m.gram is not None
            inter = mlp_m.gram.shape[0]
            removable = inter - max(multiple, int(cfg.comp_min_keep_ratio * inter))
            removable -= removable % multiple
            if removable > 0:
                w = layer.mlp.down_proj.weight
                _, costs = greedy_obs(w, mlp_m.gram, [torch.tensor([j]) for j in range(inter)], removable // multiple,
                                      multiple, self.ridge)  # fmt: skip
                units += self._chain(i, "mlp", multiple, costs, resid, 3 * hidden_size * multiple)
            if heads_prunable and shape.num_kv_heads > 1:
                groups = [kv_group_dims(layer, [g], hd) for g in range(shape.num_kv_heads)]
                _, costs = greedy_obs(layer.self_attn.o_proj.weight, attn_m.gram, groups, shape.num_kv_heads - 1, 1,
                                      self.ridge)  # fmt: skip
                rep = shape.num_heads // shape.num_kv_heads
                units += self._chain(i, "kv", 1, costs, resid, 2 * (rep + 1) * hd * hidden_size)
            del mlp_m, attn_m
            stream.release(i)
        if cfg.comp_allocation == "uniform":
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
    def _chain(layer: int, kind: str, count: int, costs: list[float], resid: float, params: int) -> list[_Unit]:
        """Units of one layer in removal order; costs made non-decreasing so they leave in order."""
        out, running = [], 0.0
        for c in costs:
            running = max(running, c / resid)
            out.append(_Unit(layer, kind, count, running, params))
        return out

    # -- planning (driven by prune_to_budget) ----------------------------------------------------
    def most_pruned_shape(self, model: Any, shape: ModelShape, cfg: Any) -> ModelShape:
        floor = dataclasses.replace(cfg, min_keep_ratio=cfg.comp_min_keep_ratio)
        return narrowest_shape(model, shape, floor, drop_blocks=cfg.comp_blocks)

    def can_step(self, model: Any, cfg: Any) -> bool:
        return any(self._usable(u, cfg) for u in self.units[self.next :])

    def _usable(self, u: _Unit, cfg: Any) -> bool:
        lp = self.plan[u.layer]
        if lp.drop:
            return False
        if u.kind == "block":
            from pipeline.prune import max_removable_layers

            dropped = sum(p.drop for p in self.plan)
            return dropped < max_removable_layers(len(self.plan), cfg)
        return True

    def step(self, model: Any, calib: torch.Tensor, cfg: Any) -> tuple[str, float]:
        while not self._usable(self.units[self.next], cfg):
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
        layers = [_narrowed(layer, base.hidden_size, lp.mlp, lp.kv) for layer, lp in zip(base.layers, self.plan)]
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
            dense[b] = _pack(h)
        pruned = [h.clone() for h in dense]
        for i in tqdm(range(len(stream)), desc="comp: prune + compensate", leave=False, disable=None):
            lp = self.plan[i]
            layer = stream.layer(i)
            kw = [k[i] for k in kwargs]
            if lp.drop or not (lp.kv or lp.mlp):
                for b, k in enumerate(kw):
                    dense[b] = _pack(layer(_unpack(dense[b]), **k))
                    if not lp.drop:  # an untouched block: both streams go through it
                        pruned[b] = _pack(layer(_unpack(pruned[b]), **k))
                if lp.drop:
                    stream.release(i)
                else:
                    stream.store(i)
                continue
            residual = cfg.comp_target == "residual" and not spec.sandwich_norms
            reference = copy.deepcopy(layer)  # the dense block: targets and the dense stream's next step
            if lp.kv:
                mom = _paired_moments(layer, reference, dense, pruned, kw, "z", _attn_target(residual), not lp.mlp)
                self._prune_heads(layer, mom, lp.kv, hd, i)
                del mom
            if lp.mlp:
                mom = _paired_moments(layer, reference, dense, pruned, kw, "a", _mlp_target(residual), True)
                self._prune_channels(layer, mom, lp.mlp, multiple, i)
                del mom
            del reference
            for b, k in enumerate(kw):
                pruned[b] = _pack(layer(_unpack(pruned[b]), **k))
            stream.store(i)
        dropped = [i for i, lp in enumerate(self.plan) if lp.drop]
        if dropped:
            remove_layers(model, dropped)
        record_widths(model)

    def _prune_channels(self, layer: Any, mom: _Moments, n: int, multiple: int, li: int) -> None:
        assert mom.gram is not None and mom.cross is not None
        w = layer.mlp.down_proj.weight
        steps, _ = greedy_obs(w, mom.gram, [torch.tensor([j]) for j in range(w.shape[1])], n // multiple, multiple,
                              self.ridge)  # fmt: skip
        gone = {j for s in steps for j in s}
        keep = torch.tensor([j for j in range(w.shape[1]) if j not in gone], dtype=torch.long)
        fitted = ls_fit(mom.cross, mom.gram, keep, self.ridge) if self.compensate else None
        self._record(li, "mlp", mom, w.double()[:, keep], fitted, keep)
        prune_mlp(layer, keep, None, weight=fitted)

    def _prune_heads(self, layer: Any, mom: _Moments, n: int, hd: int, li: int) -> None:
        assert mom.gram is not None and mom.cross is not None
        w = layer.self_attn.o_proj.weight
        n_kv = layer_shape(layer, hd).num_kv_heads
        groups = [kv_group_dims(layer, [g], hd) for g in range(n_kv)]
        steps, _ = greedy_obs(w, mom.gram, groups, n, 1, self.ridge)
        gone = {g for s in steps for g in s}
        keep_g = [g for g in range(n_kv) if g not in gone]
        keep = kv_group_dims(layer, keep_g, hd)
        fitted = ls_fit(mom.cross, mom.gram, keep, self.ridge) if self.compensate else None
        self._record(li, "kv", mom, w.double()[:, keep], fitted, keep)
        prune_kv_groups(layer, torch.tensor(keep_g), hd, None, weight=fitted)

    def _record(
        self, li: int, kind: str, mom: _Moments, sliced: torch.Tensor, fitted: torch.Tensor | None, keep: torch.Tensor
    ) -> None:
        """Relative reconstruction error of the sub-layer on calibration data, sliced vs fitted."""
        norm = mom.target_energy or 1.0
        entry: dict[str, Any] = {"layer": li, "kind": kind, "sliced": mom.error(sliced, keep) / norm}
        if fitted is not None:
            entry["compensated"] = mom.error(fitted, keep) / norm
        self.reconstruction.append(entry)
        log.debug("block %d %s reconstruction error %s", li, kind, entry)
