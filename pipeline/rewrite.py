"""Shape rewriting: apply a prune plan to a live model, record it in the config, save, reload.

Depth pruning keeps every remaining block's shapes, so the result is a *stock* config
(``num_hidden_layers`` lowered, ``layer_types`` sliced) that plain ``from_pretrained`` loads with no
prunefit code. What was removed is recorded under ``config.prunefit`` for provenance.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from core.arch import arch_for, decoder_layers, head_dim
from core.errors import ExportError
from core.fsio import atomic_dir

log = logging.getLogger(__name__)


def remove_layers(model: PreTrainedModel, remove: Iterable[int]) -> list[int]:
    """Drop decoder blocks in place; returns the *original* indices of the blocks that remain.

    ``remove`` indexes the model's current layers. Attention ``layer_idx`` is renumbered so KV-cache
    slots stay contiguous, and per-layer config lists (``layer_types``) are sliced to match.
    """
    spec = arch_for(model.config.model_type)
    layers = decoder_layers(model)
    drop = set(remove)
    if not drop:
        return list(range(len(layers)))
    if any(i < 0 or i >= len(layers) for i in drop):
        raise ValueError(f"layer indices {sorted(drop)} out of range for {len(layers)} layers")
    if len(drop) >= len(layers):
        raise ValueError("cannot remove every decoder layer")
    meta: dict[str, Any] = dict(getattr(model.config, "prunefit", None) or {})
    original = list(meta.get("kept_layers", range(len(layers))))
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
    kept_original = [original[i] for i in keep]
    meta["kept_layers"] = kept_original
    meta["removed_layers"] = sorted(set(meta.get("removed_layers", [])) | {original[i] for i in drop})
    meta.setdefault("original_num_hidden_layers", len(original))
    cfg.prunefit = meta
    return kept_original


def _uniform_widths(model: PreTrainedModel) -> dict[str, int] | None:
    widths = (getattr(model.config, "prunefit", None) or {}).get("layers")
    if not widths:
        return None
    first = widths[0]
    return first if all(w == first for w in widths) else None


def finalise_config(model: PreTrainedModel) -> None:
    """Uniform widths become the stock config keys; per-layer widths stay under ``prunefit.layers``."""
    uniform = _uniform_widths(model)
    if uniform is not None and hasattr(model.config, "head_dim"):
        model.config.head_dim = head_dim(model.config)  # pin it: it is derived from the head count otherwise
        for key, value in uniform.items():
            setattr(model.config, key, value)
        meta = dict(model.config.prunefit)
        meta["uniform"] = True
        model.config.prunefit = meta


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """Save as safetensors + config.json + tokenizer, atomically (temp dir, then rename).

    Uniform widths are written as a plain stock config (any transformers loads it); per-layer
    widths keep the original global sizes in the config plus ``prunefit.layers``, which
    :func:`load_pruned` applies.
    """
    finalise_config(model)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def load_pruned(model_dir: Path) -> PreTrainedModel:
    """Load a prunefit model directory: stock ``from_pretrained`` when the config is stock, else
    build stock modules, narrow each block to its recorded widths, then load the safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from pipeline.width import layer_widths, prune_kv_groups, prune_mlp

    config = AutoConfig.from_pretrained(model_dir)
    meta = getattr(config, "prunefit", None) or {}
    widths = meta.get("layers")
    if not widths or meta.get("uniform"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        return model.eval().requires_grad_(False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hd = head_dim(config)
    for layer, w, now in zip(decoder_layers(model), widths, layer_widths(model), strict=True):
        if w["intermediate_size"] != now["intermediate_size"]:
            prune_mlp(layer, torch.arange(w["intermediate_size"]), None)
        if w["num_key_value_heads"] != now["num_key_value_heads"]:
            prune_kv_groups(layer, torch.arange(w["num_key_value_heads"]), hd, None)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ExportError(
            f"{model_dir} does not match its recorded per-layer widths (missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}). Re-run `prunefit export --force`."
        )
    if tied:
        model.tie_weights()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def check_round_trip(model: PreTrainedModel, saved_dir: Path, input_ids: torch.Tensor) -> float:
    """Reload ``saved_dir`` with stock transformers and return the max |logit diff| (must be 0)."""
    reloaded = load_pruned(saved_dir)
    a = model(input_ids, use_cache=False).logits
    b = reloaded(input_ids, use_cache=False).logits
    diff = float((a - b).abs().max())
    if diff != 0.0:
        raise ExportError(
            f"Saved model at {saved_dir} does not reload to identical logits (max |diff| {diff:.3g}). "
            "This is a prunefit bug: please report it with the model's config.json."
        )
    return diff
