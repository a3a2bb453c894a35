"""The modules that are actually exported: a decoder step with its KV cache.

Pruned models have per-layer KV head counts (a layer that lost a KV group keeps fewer heads),
which both wrappers take from the live modules, never from the global config:

- :class:`PastKeyValuesDecoder` (ONNX): the cache is explicit graph I/O. Inputs
  ``input_ids, attention_mask, position_ids, past_key_values.{i}.key/value``, outputs ``logits,
  present.{i}.key/value`` (Optimum's names, so ORT-GenAI-style loops drive it unchanged). A past
  length of 0 is valid, so one graph serves prefill and decode.
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

from core.arch import attention_heads, decoder_layers, head_dim


@dataclass(frozen=True)
class KvLayout:
    """Per-layer KV heads and the shared head size: what sizes every cache tensor."""

    kv_heads: tuple[int, ...]
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.kv_heads)

    def input_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def bytes_per_token(self, element_bytes: int = 4) -> int:
        return 2 * sum(self.kv_heads) * self.head_dim * element_bytes


def kv_layout(model: PreTrainedModel) -> KvLayout:
    """Read each layer's KV head count from its projection shapes (Phi-3: the fused qkv_proj)."""
    hd = head_dim(model.config)
    heads = [attention_heads(layer.self_attn, hd)[1] for layer in decoder_layers(model)]
    return KvLayout(tuple(heads), hd)


class PastKeyValuesDecoder(nn.Module):
    """One decoder call with the cache as flat tensors in and out (ONNX).

    Sliding-window layers keep every position, like full ones; the mask applies the window.
    transformers' sliding cache layer drops what falls out of the window with a branch on the
    cache's length, and export bakes in the branch of its example: Gemma 3 270M's graph failed in
    onnxruntime (Expand: invalid shape) at the first call past its 512-position window, which a
    validation run of ~140 positions never reached and the context fill (issue 20) did."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

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
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
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
