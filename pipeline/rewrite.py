"""Shape rewriting: write the prune record into the config, save, reload, check.

Depth pruning keeps every remaining block's shapes, and uniform width pruning changes them all
alike, so the result is a *stock* config (``num_hidden_layers`` lowered, ``layer_types`` sliced,
widths in the stock keys) that plain ``from_pretrained`` loads with no prunefit code. Per-layer
widths are rebuilt from the record (``config.prunefit``) by :func:`load_pruned`. The record is
written here and nowhere else.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from core.arch import decoder_layers, head_dim
from core.errors import ExportError
from core.fsio import atomic_dir
from core.record import PruneRecord
from pipeline.methods.units import layer_widths, prune_kv_groups, prune_mlp

log = logging.getLogger(__name__)


def finalise_config(model: PreTrainedModel, record: PruneRecord | None) -> None:
    """Write ``record`` into the config, once: uniform widths become the stock config keys (any
    transformers loads the model), per-layer widths stay under ``prunefit.layers``."""
    if record is None:
        return
    uniform = record.uniform_widths
    if uniform is not None and hasattr(model.config, "head_dim"):
        model.config.head_dim = head_dim(model.config)  # pin it: it is derived from the head count otherwise
        for key, value in uniform.model_dump().items():
            setattr(model.config, key, value)
        record = record.model_copy(update={"uniform": True})
    model.config.prunefit = record.to_config()


def _check_stock_widths(model: PreTrainedModel) -> None:
    """A model saved without a prune record must have the widths its config states: otherwise the
    saved config.json describes another model, and loading it fails (or worse, loads wrong)."""
    cfg = model.config
    stock = {
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None),
    }
    for i, widths in enumerate(layer_widths(model)):
        off = {k: v for k, v in widths.items() if stock[k] is not None and v != stock[k]}
        if off:
            raise ExportError(
                f"Block {i} has widths {off} that its config does not state ({ {k: stock[k] for k in off} }): "
                "pass the prune record (PrunePlan.record) to save_model so the config records them."
            )


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, record: PruneRecord | None = None
) -> Path:
    """Save as safetensors + config.json + tokenizer, atomically (temp dir, then rename).

    Uniform widths are written as a plain stock config (any transformers loads it); per-layer
    widths keep the original global sizes in the config plus ``prunefit.layers``, which
    :func:`load_pruned` applies.
    """
    if record is None:
        _check_stock_widths(model)
    finalise_config(model, record)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def load_pruned(model_dir: Path) -> PreTrainedModel:
    """Load a prunefit model directory: stock ``from_pretrained`` when the config is stock, else
    build stock modules, narrow each block to its recorded widths, then load the safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    record = PruneRecord.from_config(config)
    if record is None or not record.layers or record.uniform:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        return model.eval().requires_grad_(False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hd = head_dim(config)
    for layer, w, now in zip(decoder_layers(model), record.layers, layer_widths(model), strict=True):
        if w.intermediate_size != now["intermediate_size"]:
            prune_mlp(layer, torch.arange(w.intermediate_size), None)
        if w.num_key_value_heads != now["num_key_value_heads"]:
            prune_kv_groups(layer, torch.arange(w.num_key_value_heads), hd, None)
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
