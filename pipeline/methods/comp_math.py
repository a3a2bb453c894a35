"""comp's numerics, apart from its lifecycle (``pipeline/methods/comp.py``): the condition-aware
greedy removal (structured Optimal Brain Surgeon down-dates), the ridge for a calibration size,
the moments of a sub-layer's inputs against its targets, and the hidden-state streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


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
    ginv = ridge_inverse(gram, ridge)
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


def ridge_inverse(gram: torch.Tensor, ridge: float) -> torch.Tensor:
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


RIDGE_TOKENS = 4096  # calibration tokens at which ``CompConfig.ridge`` applies as given


def comp_ridge(ridge: float, tokens: int) -> float:
    """The relative ridge for ``tokens`` calibration tokens: ``ridge`` up to RIDGE_TOKENS, then
    shrinking as ``1 / sqrt(tokens)``, the rate at which the Gram matrices' sampling noise shrinks:
    more data needs less shrinkage. Never more than ``ridge`` (smaller sets were not measured)."""
    return ridge * min(1.0, (RIDGE_TOKENS / max(tokens, 1)) ** 0.5)


# -- capturing sub-layer inputs and outputs ------------------------------------------------------
@contextmanager
def tap(layer: Any, keys: str = "zoam") -> Iterator[dict[str, torch.Tensor]]:
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
class Moments:
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


def pack(h: torch.Tensor) -> torch.Tensor:
    """Calibration hidden states rest in float16 between blocks: half the memory of the largest
    thing pruning holds, at a rounding (2^-11 relative) far below the pruning error it measures.
    Blocks still compute in float32 (:func:`unpack`). A batch outside float16's range stays float32."""
    half = h.detach().half()
    return half if bool(torch.isfinite(half).all()) else h.detach().float()


def unpack(h: torch.Tensor) -> torch.Tensor:
    return h.float()


def paired_moments(
    layer: Any,
    reference: Any,
    dense: list[torch.Tensor],
    pruned: list[torch.Tensor],
    kw: list[dict[str, Any]],
    key: str,
    target: Target,
    advance: bool,
) -> Moments:
    """Moments of ``layer``'s sub-layer input ``key`` (z or a) on the pruned stream against
    ``target``, computed per batch from the dense block ``reference`` run on the dense stream.

    Targets are recomputed here rather than kept for the whole calibration set: a copy of one
    block costs less than two hidden-state-sized target lists. With ``advance`` the dense stream
    moves on to the reference block's output as each batch is done."""
    mom = Moments()
    for b, k in enumerate(kw):
        h_d = unpack(dense[b])
        with tap(reference, "om") as ref:
            out = reference(h_d, **k)
        h_p = unpack(pruned[b])
        with tap(layer, key + "o") as rec:
            layer(h_p, **k)
        mom.add(rec[key], target(h_d, ref, h_p, rec))
        if advance:
            dense[b] = pack(out)
        del h_d, h_p, out, ref, rec
    return mom


Target = Callable[[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def attn_target(residual: bool) -> Target:
    """What o_proj should produce on a batch: the dense block's attention output, plus
    (``residual``) the gap between the dense and the pruned stream entering the block."""

    def target(h_d: torch.Tensor, ref: dict[str, torch.Tensor], h_p: torch.Tensor, rec: dict) -> torch.Tensor:
        return ref["o"] + _flat(h_d) - _flat(h_p) if residual else ref["o"]

    return target


def mlp_target(residual: bool) -> Target:
    """What down_proj should produce: the dense MLP output, plus (``residual``) the dense minus the
    pruned residual stream after attention."""

    def target(h_d: torch.Tensor, ref: dict[str, torch.Tensor], h_p: torch.Tensor, rec: dict) -> torch.Tensor:
        if not residual:
            return ref["m"]
        return ref["m"] + (_flat(h_d) + ref["o"]) - (_flat(h_p) + rec["o"])

    return target
