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

Per-layer widths may differ; they are recorded in ``config.prunefit["layers"]`` and rebuilt by
:func:`pipeline.rewrite.load_pruned`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from core.arch import arch_for, decoder_layers, head_dim
from targets.budget import LayerShape, layer_shape, model_shape

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    mlp_gram: torch.Tensor  # [I, I] sum of a a^T over calibration tokens (down_proj input)
    attn_gram: torch.Tensor  # [D, D] sum over tokens of o_proj input outer products
    tokens: int
    resid_energy: float = 0.0  # sum over tokens of ||h||^2 of the block's input (residual stream)


@torch.no_grad()
def collect_stats(model: Any, calib: torch.Tensor, batch_size: int = 8) -> list[LayerStats]:
    """Accumulate the Gram matrices of down_proj and o_proj inputs for every block (float64)."""
    layers = decoder_layers(model)
    stats: list[LayerStats] = []
    handles = []
    for layer in layers:
        down, o = _down_proj(layer), layer.self_attn.o_proj
        st = LayerStats(
            torch.zeros(down.in_features, down.in_features, dtype=torch.float64),
            torch.zeros(o.in_features, o.in_features, dtype=torch.float64),
            0,
        )
        stats.append(st)

        def mlp_hook(mod: nn.Module, args: tuple, st: LayerStats = st) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            st.mlp_gram += x.T @ x
            st.tokens += x.shape[0]

        def attn_hook(mod: nn.Module, args: tuple, st: LayerStats = st) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            st.attn_gram += x.T @ x

        def resid_hook(mod: nn.Module, args: tuple, kwargs: dict, st: LayerStats = st) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            st.resid_energy += float(h.double().pow(2).sum())

        handles.append(layer.register_forward_pre_hook(resid_hook, with_kwargs=True))
        handles.append(down.register_forward_pre_hook(mlp_hook))
        handles.append(o.register_forward_pre_hook(attn_hook))
    try:
        base = model.get_decoder()
        for start in tqdm(range(0, calib.shape[0], batch_size), desc="width statistics", leave=False, disable=None):
            base(input_ids=calib[start : start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def _down_proj(layer: Any) -> nn.Linear:
    return layer.mlp.down_proj


Score = Literal["energy", "wanda", "magnitude"]


def _column_scores(w: torch.Tensor, gram: torch.Tensor, tokens: int, score: Score) -> torch.Tensor:
    """Importance of each input column of an output projection ``w`` [out, in].

    energy (ours): ||W[:, j]||^2 E[x_j^2], the energy column j adds to the output.
    wanda: sum_i |W_ij| * ||x_j|| (Wanda's |W| x ||X||, summed over the structure).
    magnitude: ||W[:, j]||, no data.
    """
    w = w.double()
    if score == "magnitude":
        return w.pow(2).sum(0).sqrt()
    if score == "wanda":
        return w.abs().sum(0) * gram.diagonal().clamp_min(0).sqrt()
    return w.pow(2).sum(0) * gram.diagonal() / max(tokens, 1)


def channel_scores(layer: Any, st: LayerStats, score: Score = "energy") -> torch.Tensor:
    """Importance of each intermediate MLP channel."""
    return _column_scores(_down_proj(layer).weight, st.mlp_gram, st.tokens, score)


def kv_group_scores(layer: Any, st: LayerStats, hd: int, score: Score = "energy") -> torch.Tensor:
    """Importance of each KV group (its query heads' slice of o_proj's input)."""
    w = layer.self_attn.o_proj.weight
    per_dim = _column_scores(w, st.attn_gram, st.tokens, score)
    n_q = w.shape[1] // hd
    n_kv = _n_kv(layer, hd)
    per_head = per_dim.view(n_q, hd).sum(1)
    return per_head.view(n_kv, n_q // n_kv).sum(1)


def _n_kv(layer: Any, hd: int) -> int:
    return layer_shape(layer, hd).num_kv_heads


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
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


def _ls_refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """Columns for ``keep`` minimising E||W_keep' x_keep - W x||^2 over the calibration inputs."""
    g = gram.double()
    g_ss = g[keep][:, keep]
    lam = ridge * g_ss.diagonal().mean().clamp_min(1e-12)
    rhs = weight.double() @ g[:, keep]  # [out, |S|]
    sol = torch.linalg.solve(g_ss + lam * torch.eye(len(keep), dtype=torch.float64), rhs.T).T
    return sol.to(weight.dtype)


def _kept_columns(
    w: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor | None, ridge: float, fitted: torch.Tensor | None
) -> torch.Tensor:
    """The output projection's new columns: given (fitted elsewhere), re-fit on ``gram``, or sliced."""
    if fitted is not None:
        return fitted.to(w.dtype)
    if gram is not None:
        return _ls_refit(w, gram, keep, ridge)
    return w[:, keep]


def prune_mlp(
    layer: Any, keep: torch.Tensor, gram: torch.Tensor | None, ridge: float = 1e-3, weight: torch.Tensor | None = None
) -> None:
    """Keep intermediate channels ``keep`` (sorted); re-fit down_proj by least squares if ``gram``,
    or use the given ``weight`` (already fitted, [hidden, len(keep)]) for down_proj."""
    mlp = layer.mlp
    down = mlp.down_proj
    new_w = _kept_columns(down.weight.data, keep, gram, ridge, weight)
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: rows [gate | up]
        inter = mlp.gate_up_proj.out_features // 2
        mlp.gate_up_proj = _slice_linear(mlp.gate_up_proj, rows=torch.cat([keep, keep + inter]))
    else:
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=keep)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = _slice_linear(down, cols=keep)
    mlp.down_proj.weight.data.copy_(new_w)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def kv_group_dims(layer: Any, groups: list[int], hd: int) -> torch.Tensor:
    """o_proj input dims (query-head slices) that belong to KV groups ``groups``."""
    n_kv = _n_kv(layer, hd)
    rep = (layer.self_attn.o_proj.in_features // hd) // n_kv
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
    n_kv = _n_kv(layer, hd)
    n_q = attn.o_proj.in_features // hd
    rep = n_q // n_kv
    q_heads = torch.cat([torch.arange(g * rep, (g + 1) * rep) for g in keep_groups.tolist()])
    q_dims = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_heads.tolist()])
    kv_dims = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in keep_groups.tolist()])
    o = attn.o_proj
    new_w = _kept_columns(o.weight.data, q_dims, gram, ridge, weight)
    if hasattr(attn, "qkv_proj"):  # Phi-3: rows [q | k | v]
        rows = torch.cat([q_dims, n_q * hd + kv_dims, (n_q + n_kv) * hd + kv_dims])
        attn.qkv_proj = _slice_linear(attn.qkv_proj, rows=rows)
    else:
        attn.q_proj = _slice_linear(attn.q_proj, rows=q_dims)
        attn.k_proj = _slice_linear(attn.k_proj, rows=kv_dims)
        attn.v_proj = _slice_linear(attn.v_proj, rows=kv_dims)
    attn.o_proj = _slice_linear(o, cols=q_dims)
    attn.o_proj.weight.data.copy_(new_w)
    for name, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(keep_groups))):
        if hasattr(attn, name):
            setattr(attn, name, value)


def layer_widths(model: Any) -> list[dict[str, int]]:
    """Per-block widths as the config records them (read from the live modules by the budget model)."""
    hd = head_dim(model.config)
    return [
        {
            "intermediate_size": shape.intermediate_size,
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
        }
        for shape in (layer_shape(layer, hd) for layer in decoder_layers(model))
    ]


def record_widths(model: Any) -> None:
    """Write the live per-block widths into ``config.prunefit["layers"]`` (what load_pruned rebuilds)."""
    meta = dict(getattr(model.config, "prunefit", None) or {})
    meta["layers"] = layer_widths(model)
    model.config.prunefit = meta


def narrowest_shape(model: Any, shape: Any, cfg: Any, drop_blocks: bool = False) -> Any:
    """The smallest shape width pruning may reach under ``cfg``: every block down to
    ``min_keep_ratio`` of its MLP channels (in whole groups of ``width_multiple``) and one KV group,
    and with ``drop_blocks`` also the largest blocks ``max_removed_layer_ratio`` allows removed."""
    heads_prunable = arch_for(model.config.model_type).per_layer_heads
    multiple = max(1, cfg.width_multiple)
    layers = []
    for layer in shape.layers:
        drop_i = layer.intermediate_size - max(multiple, int(cfg.min_keep_ratio * layer.intermediate_size))
        drop_i -= drop_i % multiple
        drop_g = layer.num_kv_heads - 1 if heads_prunable else 0
        layers.append(_narrowed(layer, shape.hidden_size, drop_i, drop_g))
    narrow = dataclasses.replace(shape, layers=tuple(layers))
    if not drop_blocks:
        return narrow
    from pipeline.prune import max_removable_layers

    n = max_removable_layers(len(shape.layers), cfg)
    biggest = sorted(range(len(narrow.layers)), key=lambda i: -narrow.layers[i].params)[:n]
    return narrow.without_layers(set(biggest))


def _narrowed(layer: Any, hidden: int, drop_channels: int, drop_groups: int) -> Any:
    """A LayerShape with ``drop_channels`` MLP channels and ``drop_groups`` KV groups removed."""
    rep = layer.num_heads // layer.num_kv_heads
    params = layer.params - drop_channels * 3 * hidden - drop_groups * 2 * (rep + 1) * layer.head_dim * hidden
    return LayerShape(
        params, layer.num_heads - drop_groups * rep, layer.num_kv_heads - drop_groups, layer.head_dim,
        layer.intermediate_size - drop_channels,
    )  # fmt: skip


@dataclass
class _Unit:
    layer: int
    kind: str  # "mlp" | "kv"
    indices: list[int]  # original channel indices / KV group ids within the layer
    score: float  # share of the residual stream's energy the unit carries
    params: int
    priority: float = 0.0


class WidthPruner:
    """Plan MLP-channel and KV-group removals cheapest-first, then slice and compensate once."""

    name = "width"

    def __init__(self) -> None:
        self.units: list[_Unit] = []
        self.next = 0
        self.removed: dict[tuple[int, str], list[int]] = {}
        self.stats: list[LayerStats] = []
        self._base_shape: Any = None
        self.compensate = True
        self.ridge = 1e-3

    def prepare(self, model: Any, calib: torch.Tensor, cfg: Any) -> None:
        hd = head_dim(model.config)
        multiple = max(1, getattr(cfg, "width_multiple", 8))
        self.stats = collect_stats(model, calib, cfg.batch_size)
        self.compensate = cfg.compensate
        self.ridge = cfg.ridge
        self._base_shape = model_shape(model)
        hidden = model.config.hidden_size
        heads_prunable = arch_for(model.config.model_type).per_layer_heads
        units: list[_Unit] = []
        for li, (layer, st) in enumerate(zip(decoder_layers(model), self.stats, strict=True)):
            # What a unit adds to the residual stream, relative to what the stream already carries there.
            resid = st.resid_energy / max(st.tokens, 1) or 1.0
            if cfg.score != "energy":
                resid = 1.0  # baselines compare raw scores, as published
            ch = channel_scores(layer, st, cfg.score)
            order = torch.argsort(ch).tolist()
            n_inter = len(order)
            removable = n_inter - max(multiple, int(cfg.min_keep_ratio * n_inter))
            removable -= removable % multiple
            for g in range(0, removable, multiple):
                idx = order[g : g + multiple]
                units.append(_Unit(li, "mlp", idx, float(ch[idx].sum()) / resid, 3 * hidden * len(idx)))
            if not heads_prunable:
                continue
            kv = kv_group_scores(layer, st, hd, cfg.score)
            n_kv = len(kv)
            rep = (layer.self_attn.o_proj.in_features // hd) // n_kv
            for g in torch.argsort(kv).tolist()[: n_kv - 1]:
                units.append(_Unit(li, "kv", [g], float(kv[g]) / resid, 2 * (rep + 1) * hd * hidden))
        for u in units:
            u.priority = u.score / u.params
        # A layer's units must leave in score order, so sort within (layer, kind) by score and
        # make priorities monotone there before the global sort.
        units.sort(key=lambda u: u.priority)
        self.units = units
        self.next = 0

    def most_pruned_shape(self, model: Any, shape: Any, cfg: Any) -> Any:
        return narrowest_shape(model, shape, cfg)

    def can_step(self, model: Any, cfg: Any) -> bool:
        return self.next < len(self.units)

    def step(self, model: Any, calib: torch.Tensor, cfg: Any) -> tuple[str, float]:
        u = self.units[self.next]
        self.next += 1
        self.removed.setdefault((u.layer, u.kind), []).extend(u.indices)
        unit = f"{len(u.indices)} MLP channels" if u.kind == "mlp" else f"KV group {u.indices[0]}"
        what = f"block {u.layer}: {unit}"
        return what, u.score

    def shape(self, model: Any) -> Any:
        base = self._base_shape
        layers = [
            _narrowed(
                layer, base.hidden_size, len(self.removed.get((li, "mlp"), [])), len(self.removed.get((li, "kv"), []))
            )
            for li, layer in enumerate(base.layers)
        ]
        return dataclasses.replace(base, layers=tuple(layers))

    def finalize(self, model: Any) -> None:
        """Slice every planned unit out and re-fit the output projections by least squares."""
        hd = head_dim(model.config)
        for li, layer in enumerate(tqdm(decoder_layers(model), desc="slice + compensate", leave=False, disable=None)):
            st = self.stats[li]
            gone = set(self.removed.get((li, "mlp"), []))
            if gone:
                keep = torch.tensor([i for i in range(_down_proj(layer).in_features) if i not in gone])
                prune_mlp(layer, keep, st.mlp_gram if self.compensate else None, self.ridge)
            gone_g = set(self.removed.get((li, "kv"), []))
            if gone_g:
                keep_g = torch.tensor([g for g in range(_n_kv(layer, hd)) if g not in gone_g])
                prune_kv_groups(layer, keep_g, hd, st.attn_gram if self.compensate else None, self.ridge)
        record_widths(model)
        self.stats = []
