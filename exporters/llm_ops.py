"""The ExecuTorch decoder on ExecuTorch's LLM kernels: ``llama::update_cache`` + ``llama::custom_sdpa``.

The generic static-cache program (:class:`exporters.kv_cache.StaticCacheDecoder`) runs transformers'
SDPA over the whole ``[batch, heads, context, head_dim]`` cache with a ``[seq, context]`` causal
mask at every step: the mask, the GQA head expansion and the cache write lower to ops XNNPACK does
not take, which run in ExecuTorch's portable (reference) kernels over the full context. ExecuTorch's
own Llama export uses two custom kernels instead, and so does this program:

- ``llama::update_cache(value [B, S, H, D], cache [B, context, H, D], start_pos)`` writes the step's
  keys/values into the cache in place (the cache in the runner's ``[B, S, H, D]`` layout);
- ``llama::custom_sdpa(q, k_cache, v_cache, start_pos, mask=None, causal=True, scale)`` attends only
  to positions ``< start_pos + S``, grouped-query heads included, in one optimized CPU kernel.

``start_pos`` is ``input_pos[0]``, so the runner's ``forward(tokens, input_pos)`` signature is
unchanged. Every layer keeps its own KV head count (pruned layers differ). Runners must link the
custom-ops library (ExecuTorch's LLM runner does; in Python, importing
``executorch.extension.llm.custom_ops`` registers the kernels, which ``targets/runner.py`` does).

A sliding-window layer whose window is shorter than the context (Gemma 3: 15 of 18 layers, window
512) keeps a ring of ``window - 1 + chunk`` slots instead of the whole context, as ExecuTorch's own
``RingKVCache`` does: ``llama::update_cache_with_indices`` writes each call's positions at
``position % slots``; which position each slot then holds follows from the call's last position, and
``custom_sdpa`` takes the mask that follows from that (a slot is seen when it holds a position
``<= q`` and ``> q - window``). ``window - 1 + chunk`` slots are the fewest that keep, for the first
token of a chunk, the ``window - 1`` positions before it while the chunk is written.

Not for models whose attention these kernels do not compute: a window without per-layer types
(Mistral with a window shorter than the context) and logit soft-capping (Gemma 2); those keep the
generic program (:func:`unsupported_reason`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.masking_utils import AttentionMaskInterface

from exporters.kv_cache import KvLayout, kv_layout

ATTENTION = "prunefit_llm_ops"


def load_ops() -> None:
    """Register the llama:: ops (AOT and ExecuTorch kernels) in this process."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers on import)

    # their meta functions call torch._check_is_size, deprecated in this torch: one warning per
    # layer per trace, none of them actionable here
    warnings.filterwarnings("ignore", message="_check_is_size will be removed", category=FutureWarning)


def unsupported_reason(model: PreTrainedModel, max_cache_len: int) -> str | None:
    """Why the custom kernels would compute something else than the model, or None."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    if window is not None and window < max_cache_len and "sliding_attention" not in types:
        return f"sliding-window attention on every layer (window {window}) without per-layer types"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    return None


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query [B, H, S, D], caches [B, context or ring slots, H_kv, D]."""
    q = query.transpose(1, 2)
    if kwargs.get("sliding_window") and kwargs.get("ring_mask") is not None:  # a ring: its own mask
        out = torch.ops.llama.custom_sdpa(q, key, value, 0, kwargs["ring_mask"], 0.0, False, scaling)
    else:
        out = torch.ops.llama.custom_sdpa(q, key, value, kwargs["start_pos"], None, 0.0, True, scaling)
    return out, None  # [B, S, H, D], as the interface returns


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # custom_sdpa applies causality from start_pos itself


class _Layer(StaticLayer):
    """One layer's cache in the LLM runner's [B, context, H, D] layout, written by update_cache."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(keys.shape[1])
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        start = kwargs["kwargs"]["start_pos"]
        torch.ops.llama.update_cache(key_states.transpose(1, 2).contiguous(), self.keys, start)
        torch.ops.llama.update_cache(value_states.transpose(1, 2).contiguous(), self.values, start)
        return self.keys, self.values


class _RingLayer(_Layer):
    """A sliding-window layer's ring of slots, written where the decoder's ``ring_slots`` say."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        kw = kwargs["kwargs"]
        start, slots = kw["start_pos"], kw["ring_slots"]
        torch.ops.llama.update_cache_with_indices(key_states.transpose(1, 2).contiguous(), self.keys, start, slots)
        torch.ops.llama.update_cache_with_indices(value_states.transpose(1, 2).contiguous(), self.values, start, slots)
        return self.keys, self.values


def ring_slots(layout: KvLayout, context: int, chunk: int) -> int | None:
    """Slots of a rolling layer's ring: ``window - 1`` before a chunk's first token + the chunk."""
    return min(context, layout.window - 1 + chunk) if layout.window else None


@contextmanager
def llm_ops_attention(model: PreTrainedModel) -> Iterator[None]:
    """Route the model's attention through custom_sdpa while exporting (restored afterwards)."""
    load_ops()
    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)
    configs: list[Any] = [m.config for m in model.modules() if hasattr(m, "config")]
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = ATTENTION
    try:
        yield
    finally:
        for c, b in zip(configs, before, strict=True):
            c._attn_implementation = b


class LlmOpsCacheDecoder(nn.Module):
    """``forward(tokens [B, S], input_pos [S]) -> logits``, cache buffers updated in place."""

    def __init__(self, model: PreTrainedModel, max_cache_len: int, max_seq_len: int, batch_size: int = 1) -> None:
        super().__init__()
        load_ops()
        self.model = model
        self.max_cache_len = max_cache_len
        self.layout = layout = kv_layout(model, max_cache_len)
        self.slots = ring_slots(layout, max_cache_len, max_seq_len)
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        for i, (heads, window) in enumerate(zip(layout.kv_heads, layout.windows, strict=True)):
            length = self.slots if window and self.slots else max_cache_len
            k = torch.zeros(batch_size, length, heads, layout.head_dim)
            v = torch.zeros(batch_size, length, heads, layout.head_dim)
            self.register_buffer(f"key_cache_{i}", k, persistent=False)
            self.register_buffer(f"value_cache_{i}", v, persistent=False)
            self.cache.layers[i] = (_RingLayer if window else _Layer)(k, v)

    def _ring(self, start: Any, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This call's ring slots ``[1, seq]`` and mask ``[seq, slots]`` (0 seen, -inf not).

        Positions are written in order from 0 (a prompt in chunks, then decode steps: how the LLM
        runner calls), so after this call slot ``j`` holds the latest position ``<= last`` that is
        ``j`` modulo the slots, and none if that is negative. Computed, not kept in a buffer: a
        mutable buffer's initial state is not serialized, and a new prompt restarting at 0 forgets
        the old one by the same rule."""
        assert self.slots and self.layout.window
        pos = start + torch.arange(seq, dtype=torch.long)
        last = start + seq - 1
        held = last - torch.remainder(last - torch.arange(self.slots, dtype=torch.long), self.slots)
        delta = pos[:, None] - held[None, :]
        seen = (held >= 0)[None, :] & (delta >= 0) & (delta < self.layout.window)
        mask = torch.where(seen, torch.zeros((), dtype=torch.float32), torch.full((), float("-inf")))
        return (pos % self.slots)[None, :], mask

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        start = cache_position[0].item()
        torch._check(start >= 0)
        torch._check(start + input_ids.shape[1] <= self.max_cache_len)
        ring: dict[str, Any] = {}
        if self.slots:
            ring["ring_slots"], ring["ring_mask"] = self._ring(start, input_ids.shape[1])
        return self.model(
            input_ids=input_ids,
            position_ids=cache_position.unsqueeze(0),
            cache=self.cache,
            use_cache=True,
            start_pos=start,
            **ring,
        ).logits
