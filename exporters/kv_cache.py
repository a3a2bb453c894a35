"""The modules that are actually exported: a decoder step with its KV cache.

Pruned models have per-layer KV head counts (a layer that lost a KV group keeps fewer heads),
which both wrappers take from the live modules, never from the global config:

- :class:`PastKeyValuesDecoder` (ONNX): the cache is explicit graph I/O. Inputs
  ``input_ids, attention_mask, position_ids, past_key_values.{i}.key/value``, outputs ``logits,
  present.{i}.key/value`` (Optimum's names, so ORT-GenAI-style loops drive it unchanged). A past
  length of 0 is valid, so one graph serves prefill and decode. A sliding-window layer whose
  window is shorter than the context has a fixed ``window - 1`` past (its axis is a number, not a
  name: start it with zeros), so its cache stops growing at the window.
- :class:`StaticCacheDecoder` (ExecuTorch): the cache is mutable state inside the program, one
  ``[batch, kv_heads_i, max_cache_len, head_dim]`` buffer pair per layer, updated in place at
  ``cache_position``: the ``forward(tokens, input_pos)`` signature of ExecuTorch's LLM runner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

from core.arch import attention_heads, decoder_layers, head_dim, layer_windows


@dataclass(frozen=True)
class KvLayout:
    """Per-layer KV heads and the shared head size: what sizes every cache tensor."""

    kv_heads: tuple[int, ...]
    head_dim: int
    # per layer, the window of a sliding-window layer whose cache rolls (a window shorter than the
    # context the export serves), else None: that layer keeps every position
    windows: tuple[int | None, ...] = ()

    @property
    def window(self) -> int | None:
        """The rolling window (one per model: the config's ``sliding_window``), or None."""
        return next((w for w in self.windows if w), None)

    @property
    def num_layers(self) -> int:
        return len(self.kv_heads)

    def input_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def bytes_per_token(self, element_bytes: int = 4) -> int:
        return 2 * sum(self.kv_heads) * self.head_dim * element_bytes


def kv_layout(model: PreTrainedModel, context: int | None = None) -> KvLayout:
    """Read each layer's KV head count from its projection shapes (Phi-3: the fused qkv_proj); with
    ``context``, which layers' caches roll: sliding-window layers (per the config's ``layer_types``)
    whose window is shorter than it."""
    hd = head_dim(model.config)
    layers = decoder_layers(model)
    heads = [attention_heads(layer.self_attn, hd)[1] for layer in layers]
    windows = [w if w and context and w < context else None for w in layer_windows(model.config, len(layers))]
    return KvLayout(tuple(heads), hd, tuple(windows))


def window_masks(attention_mask: torch.Tensor, seq: int, window: int) -> dict[str, torch.Tensor]:
    """Boolean ``[batch, 1, seq, keys]`` masks, by layer type, for a call whose sliding layers hold
    the ``window - 1`` positions before the call's ``seq`` new ones (zeros where fewer were seen).

    In the positions of ``attention_mask`` (past + new, padding 0): a new token at ``q`` sees keys
    ``k <= q`` (full layers: every position) and ``q - k < window`` (sliding layers: transformers'
    window, the token itself and ``window - 1`` before it), never padding."""
    total = attention_mask.shape[1]
    past = total - seq
    seen = attention_mask.bool()
    q = past + torch.arange(seq)
    k = torch.arange(total)
    full = (k[None, :] <= q[:, None])[None, None] & seen[:, None, None, :]
    keep = window - 1
    ks = past - keep + torch.arange(keep + seq)  # each slot's position; negative: not seen yet
    rel = q[:, None] - ks[None, :]
    inside = (ks >= 0)[None, :] & (rel >= 0) & (rel < window)
    padded = seen.gather(1, ks.clamp(min=0).expand(seen.shape[0], keep + seq))
    return {"full_attention": full, "sliding_attention": inside[None, None] & padded[:, None, None, :]}


class PastKeyValuesDecoder(nn.Module):
    """One decoder call with the cache as flat tensors in and out (ONNX).

    A sliding-window layer whose window is shorter than ``context`` rolls without a branch: its past
    is always ``window - 1`` slots (zeros until that many positions were seen), the call attends over
    past + new under :func:`window_masks`, and the present is the last ``window - 1`` of them. So
    Gemma 3's 15 sliding layers hold 511 positions at any context. transformers' own sliding cache
    layer drops old positions with a branch on the cache's length that export bakes in for its
    example: Gemma 3 270M's graph failed in onnxruntime (Expand: invalid shape) at the first call past
    its 512-position window. Without ``context`` (or a window at least as long) every layer keeps
    every position and transformers' masks apply the window."""

    def __init__(self, model: PreTrainedModel, context: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.layout = kv_layout(model, context)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(config=self.model.config)
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, DynamicSlidingWindowLayer):
                cache.layers[i] = DynamicLayer()  # see the class docstring: full length, the mask windows
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        seq = input_ids.shape[1]
        window = self.layout.window
        out = self.model(
            input_ids=input_ids,
            attention_mask=window_masks(attention_mask, seq, window) if window else attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present: list[torch.Tensor] = []
        for layer, rolls in zip(out.cache.layers, self.layout.windows, strict=True):
            keys, values = layer.keys, layer.values
            if rolls:  # past (window - 1) + new: keep the last window - 1
                keys, values = keys[:, :, seq:], values[:, :, seq:]
            present += [keys, values]
        return (out.logits, *present)


class StaticCacheDecoder(nn.Module):
    """One decoder call over a preallocated in-place cache (ExecuTorch).

    transformers' own ExecuTorch wrapper sizes every layer's cache from the global head count,
    which breaks on a pruned layer; here each layer is initialised with its own. Sliding-window
    layers get a full-length static layer (the mask still applies the window), as in transformers'
    wrapper, since the window's roll is data-dependent control flow that cannot be exported.
    """

    def __init__(self, model: PreTrainedModel, max_cache_len: int, batch_size: int = 1) -> None:
        super().__init__()
        self.model = model
        layout = kv_layout(model)
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        for i, layer in enumerate(self.cache.layers):
            if isinstance(layer, StaticSlidingWindowLayer) or not isinstance(layer, StaticLayer):
                self.cache.layers[i] = StaticLayer(max_cache_len)
        self.cache.early_initialization(
            batch_size, list(layout.kv_heads), layout.head_dim, torch.float32, torch.device("cpu")
        )
        self.lengths: list[torch.Tensor] = []
        # Registered buffers become the program's mutable state (planned once, updated in place).
        for i, layer in enumerate(self.cache.layers):
            assert isinstance(layer, StaticLayer) and isinstance(layer.cumulative_length, torch.Tensor)
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cache_length_{i}", layer.cumulative_length, persistent=False)
            self.lengths.append(layer.cumulative_length)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        # Writing the position (rather than accumulating) lets a caller restart at 0 for a new
        # prompt: stale entries past the position are masked out by the causal mask.
        for length in self.lengths:
            length.copy_(cache_position[0])
        return self.model(input_ids=input_ids, cache=self.cache, use_cache=True).logits
