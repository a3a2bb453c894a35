"""Data-driven importance of the units the methods remove, from one pass over calibration windows.

- :func:`collect_stats`: per block, the Gram matrices of ``down_proj``'s input (the MLP's
  intermediate activations) and ``o_proj``'s input (the heads' outputs), and the residual stream's
  energy entering the block. Nothing else is kept.
- :func:`channel_scores` / :func:`kv_group_scores`: a unit's share of its block's output energy
  (``||W[:, j]||^2 E[x_j^2]``), or the published Wanda / magnitude scores for baselines.
- :func:`block_influence`: ShortGPT's Block Influence of each block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from core.arch import attention_heads, decoder_layers


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
    n_kv = attention_heads(layer.self_attn, hd)[1]
    per_head = per_dim.view(n_q, hd).sum(1)
    return per_head.view(n_kv, n_q // n_kv).sum(1)


@torch.no_grad()
def block_influence(model: Any, calib: torch.Tensor, batch_size: int) -> list[float]:
    """ShortGPT's Block Influence per decoder block: mean over tokens of 1 - cos(h_in, h_out).

    A block whose output points where its input already pointed changes the residual stream
    least, so removing it disturbs the rest of the network least. Hooks capture each block's input
    and output; only running sums are kept, never the hidden states.
    """
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    handles = []

    def hook(idx: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[idx] += float((1.0 - cos).sum())

        return fn

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        for start in tqdm(range(0, calib.shape[0], batch_size), desc="block influence", leave=False, disable=None):
            ids = calib[start : start + batch_size]
            base(input_ids=ids, use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()
