"""Prune a checkpoint directory without ever loading the whole model (``prunefit prune``).

The model is a skeleton on the ``meta`` device; :class:`pipeline.stream.LayerStream` materialises
one decoder block at a time from the safetensors files, the layer-wise ``comp`` method scores
(pass 1) and prunes + compensates (pass 2) it, and each finished block is written to its own
shard. Peak memory is one fp32 block, its Gram matrices and the calibration hidden states, plus
the embedding table while it is read or copied; a model larger than the memory the process may
use is pruned all the same (tests/pipeline/test_streaming.py proves it under a cgroup limit).

The output is a normal sharded Hugging Face directory (``model.safetensors.index.json``) that
:func:`pipeline.rewrite.load_pruned` loads, and stock ``from_pretrained`` too when widths are uniform.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import ModelLoadError
from core.fsio import atomic_dir
from core.methods import MethodConfig
from core.record import PruneRecord
from pipeline.methods import build_pruner, check_streams
from pipeline.prune import PrunePlan, prune_to_budget
from pipeline.rewrite import finalise_config
from pipeline.stream import LayerStream
from targets.profile import DeviceProfile

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "generation_config.json", "chat_template.jinja",
)  # fmt: skip


def prune_checkpoint(
    model_dir: Path, calib: torch.Tensor, profile: DeviceProfile, cfg: MethodConfig, out_dir: Path
) -> PrunePlan:
    """Prune ``model_dir`` (config.json + safetensors) block by block into ``out_dir`` (atomic).
    Only layer-wise methods stream (``comp``); others are a ConfigError before anything is read."""
    check_streams(build_pruner(cfg))  # before anything is read or written
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} is not a Hugging Face model directory (no config.json).")
    with atomic_dir(out_dir) as tmp:
        staging = tmp / "staging"
        stream = LayerStream.from_checkpoint(model_dir, staging)
        plan = prune_to_budget(stream.model, calib, profile, cfg, stream=stream)
        write_checkpoint(stream, tmp, plan.record)
        shutil.rmtree(staging)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
    return plan


def _block_tensors(stream: LayerStream, original: int) -> dict[str, torch.Tensor]:
    """Block ``original``'s tensors (relative names): the pruned shard, or the untouched source."""
    if original in stream.stored:
        with safe_open(str(stream.stored[original]), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    prefix = f"{stream.prefix}.{original}."
    out = {}
    for key, path in stream.weights.items():
        if key.startswith(prefix):
            with safe_open(str(path), framework="pt") as fh:
                out[key[len(prefix) :]] = fh.get_tensor(key).to(torch.float32)
    return out


def write_checkpoint(stream: LayerStream, out: Path, record: PruneRecord | None) -> None:
    """Shards (one per block + one for the rest), the index, and the config with the prune record."""
    model = stream.model
    kept = record.kept_layers if record is not None else list(range(len(stream)))
    n_files = len(kept) + 1
    weight_map: dict[str, str] = {}
    total = 0
    for new_idx, original in enumerate(kept):
        name = f"model-{new_idx + 1:05d}-of-{n_files:05d}.safetensors"
        block = _block_tensors(stream, original)
        tensors = {f"{stream.prefix}.{new_idx}.{k}": v.contiguous() for k, v in block.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    name = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    sizes = stream.copy_outside_blocks(out / name)
    weight_map.update(dict.fromkeys(sizes, name))
    total += sum(sizes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    finalise_config(model, record)
    model.config.save_pretrained(out)
