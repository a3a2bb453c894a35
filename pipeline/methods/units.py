"""The units every width method removes, in one place: MLP channels and KV groups (a KV head with
its query heads), what each costs in parameters, how many a block may give up, the ridge
least-squares re-fit of an output projection, and the slicing of Linear layers and of whole blocks.

Everything here works on live stock transformers modules (Llama layout, Phi-3's fused variants)
and on :class:`targets.budget.LayerShape` for planning, so a plan's shape and the sliced model's
shape come from the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from core.arch import arch_for, attention_heads, decoder_layers, head_dim
from targets.budget import LayerShape, ModelShape, layer_shape

UnitKind = Literal["block", "mlp", "kv"]


@dataclass
class Unit:
    """One removable unit in a method's plan.

    ``indices`` names the channels / KV groups where the method chose them while planning (width);
    ``count`` is how many a unit removes where they are chosen later (comp re-selects them on the
    pruned stream). ``cost`` is what removing it loses (a method's own measure), ``priority`` the
    key units leave by (cheapest first)."""

    layer: int
    kind: UnitKind
    cost: float
    params: int
    count: int = 0
    indices: list[int] = dataclasses.field(default_factory=list)
    priority: float = 0.0


# -- parameters per unit -------------------------------------------------------------------------
def mlp_unit_params(hidden: int, channels: int) -> int:
    """gate, up and down projections each lose ``channels`` rows / columns of ``hidden``."""
    return 3 * hidden * channels


def kv_group_params(hidden: int, queries_per_kv: int, hd: int) -> int:
    """One KV head (k and v rows) with its query heads (q rows and o_proj columns)."""
    return 2 * (queries_per_kv + 1) * hd * hidden


def removable_channels(intermediate: int, min_keep_ratio: float, multiple: int) -> int:
    """How many MLP channels a block may give up: all but ``min_keep_ratio`` of them (at least one
    group), in whole groups of ``multiple``."""
    removable = intermediate - max(multiple, int(min_keep_ratio * intermediate))
    return max(0, removable - removable % multiple)


def max_removable_layers(num_layers: int, ratio: float) -> int:
    """Whole blocks a method may remove: ``ratio`` of them, always leaving one."""
    return min(num_layers - 1, math.floor(ratio * num_layers))


def biggest_blocks(shape: ModelShape, n: int) -> set[int]:
    """The ``n`` blocks with the most parameters: what the most pruning removes (a feasibility floor)."""
    return set(sorted(range(len(shape.layers)), key=lambda i: -shape.layers[i].params)[:n])


# -- shapes ---------------------------------------------------------------------------------------
def narrowed(layer: LayerShape, hidden: int, drop_channels: int, drop_groups: int) -> LayerShape:
    """``layer`` with ``drop_channels`` MLP channels and ``drop_groups`` KV groups removed."""
    rep = layer.num_heads // layer.num_kv_heads
    params = layer.params - mlp_unit_params(hidden, drop_channels)
    params -= drop_groups * kv_group_params(hidden, rep, layer.head_dim)
    return LayerShape(
        params, layer.num_heads - drop_groups * rep, layer.num_kv_heads - drop_groups, layer.head_dim,
        layer.intermediate_size - drop_channels, layer.window,
    )  # fmt: skip


def narrowest_shape(
    model: Any, shape: ModelShape, multiple: int, min_keep_ratio: float, drop_blocks: float | None = None
) -> ModelShape:
    """The smallest shape a width method may reach: every block down to ``min_keep_ratio`` of its
    MLP channels (whole groups of ``multiple``) and one KV group, and with ``drop_blocks`` (a
    max_removed_layer_ratio) also the largest blocks that ratio allows removed."""
    heads_prunable = arch_for(model.config.model_type).per_layer_heads
    layers = []
    for layer in shape.layers:
        drop_i = removable_channels(layer.intermediate_size, min_keep_ratio, max(1, multiple))
        drop_g = layer.num_kv_heads - 1 if heads_prunable else 0
        layers.append(narrowed(layer, shape.hidden_size, drop_i, drop_g))
    narrow = dataclasses.replace(shape, layers=tuple(layers))
    if drop_blocks is None:
        return narrow
    return narrow.without_layers(biggest_blocks(narrow, max_removable_layers(len(shape.layers), drop_blocks)))


def layer_widths(model: Any) -> list[dict[str, int]]:
    """Per-block widths as the config records them (read from the live modules)."""
    hd = head_dim(model.config)
    return [
        {
            "intermediate_size": shape.intermediate_size,
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
        }
        for shape in (layer_shape(layer, hd) for layer in decoder_layers(model))
    ]


# -- ridge least squares ---------------------------------------------------------------------------
def _solve_ridge(g: torch.Tensor, rhs: torch.Tensor, ridge: float, prior: torch.Tensor | None) -> torch.Tensor:
    """Solve ``W (g + lam I) = rhs + lam prior`` for W in float64, ``lam = ridge x mean(diag g)``."""
    g = g.double().clone()
    lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
    g.diagonal().add_(lam)
    rhs = rhs.double()
    if prior is not None:
        rhs = rhs + lam * prior.double()
    return torch.linalg.solve(g, rhs.T).T


def ls_fit(
    cross: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """argmin_W sum ||W x_keep - t||^2 + lam ||W - prior||^2 with ``cross = sum t x^T`` [out, n] and
    ``gram = sum x x^T``; ``lam`` is ``ridge`` times the mean diagonal of the kept Gram block.

    Shrinking toward ``prior`` (the layer's own sliced weights) rather than toward zero means a
    strong ridge degrades gracefully to plain slicing instead of to a dead layer. float64 result.
    """
    g = gram.index_select(0, keep).index_select(1, keep)
    return _solve_ridge(g, cross.index_select(1, keep), ridge, prior)


def refit_to_dense(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """Columns for ``keep`` minimising E||W_keep' x_keep - W x||^2 over the calibration inputs: the
    target is the dense layer's own output (``t = W x``), so ``cross = W G``, of which only the kept
    columns are computed: ``W_S' = W G[:, S] (G[S, S] + lam I)^-1``."""
    g = gram.double()
    rhs = weight.double() @ g[:, keep]  # [out, |S|]
    return _solve_ridge(g[keep][:, keep], rhs, ridge, None).to(weight.dtype)


# -- slicing ---------------------------------------------------------------------------------------
def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping output ``rows`` and input ``cols`` of ``lin`` (bias follows the rows)."""
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    new.requires_grad_(False)
    return new


def _kept_columns(
    w: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor | None, ridge: float, fitted: torch.Tensor | None
) -> torch.Tensor:
    """The output projection's new columns: given (fitted elsewhere), re-fit on ``gram``, or sliced."""
    if fitted is not None:
        return fitted.to(w.dtype)
    if gram is not None:
        return refit_to_dense(w, gram, keep, ridge)
    return w[:, keep]


def prune_mlp(
    layer: Any, keep: torch.Tensor, gram: torch.Tensor | None, ridge: float = 1e-3, weight: torch.Tensor | None = None
) -> None:
    """Keep intermediate channels ``keep`` (sorted); re-fit down_proj by least squares if ``gram``,
    or use the given ``weight`` (already fitted, [hidden, len(keep)]) for down_proj."""
    mlp = layer.mlp
    down = mlp.down_proj
    new_w = _kept_columns(down.weight.data, keep, gram, ridge, weight)
    fused = getattr(mlp, "gate_up_proj", None)
    if fused is not None:  # Phi-3: rows [gate | up]
        inter = fused.out_features // 2
        mlp.gate_up_proj = slice_linear(fused, rows=torch.cat([keep, keep + inter]))
    else:
        mlp.gate_proj = slice_linear(mlp.gate_proj, rows=keep)
        mlp.up_proj = slice_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = slice_linear(down, cols=keep)
    mlp.down_proj.weight.data.copy_(new_w)
    if hasattr(mlp, "intermediate_size"):  # some MLP modules cache their width
        mlp.intermediate_size = len(keep)


def kv_group_dims(layer: Any, groups: list[int], hd: int) -> torch.Tensor:
    """o_proj input dims (query-head slices) that belong to KV groups ``groups``."""
    n_q, n_kv = attention_heads(layer.self_attn, hd)
    rep = n_q // n_kv
    return torch.tensor([d for g in groups for d in range(g * rep * hd, (g + 1) * rep * hd)], dtype=torch.long)


def prune_kv_groups(
    layer: Any,
    keep_groups: torch.Tensor,
    hd: int,
    gram: torch.Tensor | None,
    ridge: float = 1e-3,
    weight: torch.Tensor | None = None,
) -> None:
    """Keep KV groups ``keep_groups`` (sorted) with all their query heads; re-fit o_proj if ``gram``,
    or use the given ``weight`` (already fitted) for o_proj's remaining columns."""
    attn = layer.self_attn
    n_q, n_kv = attention_heads(attn, hd)
    rep = n_q // n_kv
    q_heads = torch.cat([torch.arange(g * rep, (g + 1) * rep) for g in keep_groups.tolist()])
    q_dims = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_heads.tolist()])
    kv_dims = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in keep_groups.tolist()])
    o = attn.o_proj
    new_w = _kept_columns(o.weight.data, q_dims, gram, ridge, weight)
    fused = getattr(attn, "qkv_proj", None)
    if fused is not None:  # Phi-3: rows [q | k | v]
        rows = torch.cat([q_dims, n_q * hd + kv_dims, (n_q + n_kv) * hd + kv_dims])
        attn.qkv_proj = slice_linear(fused, rows=rows)
    else:
        attn.q_proj = slice_linear(attn.q_proj, rows=q_dims)
        attn.k_proj = slice_linear(attn.k_proj, rows=kv_dims)
        attn.v_proj = slice_linear(attn.v_proj, rows=kv_dims)
    attn.o_proj = slice_linear(o, cols=q_dims)
    attn.o_proj.weight.data.copy_(new_w)
    for name, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(keep_groups))):
        if hasattr(attn, name):  # some attention modules cache their head counts
            setattr(attn, name, value)


def remove_layers(model: Any, remove: Iterable[int], kept: list[int] | None = None) -> list[int]:
    """Drop decoder blocks in place; returns the *original* indices of the blocks that remain.

    ``remove`` indexes the model's current layers; ``kept`` gives the original index of each
    current layer (default: none removed before). Attention ``layer_idx`` is renumbered so KV-cache
    slots stay contiguous, and per-layer config lists (``layer_types``) are sliced to match.
    """
    spec = arch_for(model.config.model_type)
    layers = decoder_layers(model)
    original = list(kept) if kept is not None else list(range(len(layers)))
    drop = set(remove)
    if not drop:
        return original
    if any(i < 0 or i >= len(layers) for i in drop):
        raise ValueError(f"layer indices {sorted(drop)} out of range for {len(layers)} layers")
    if len(drop) >= len(layers):
        raise ValueError("cannot remove every decoder layer")
    keep = [i for i in range(len(layers)) if i not in drop]
    new_layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new_layers):
        for mod in (layer, getattr(layer, "self_attn", None)):
            if mod is not None and hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    parent: Any = model
    *path, last = spec.layers_attr.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, new_layers)
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return [original[i] for i in keep]
