"""Shape rewriting: removed blocks are recorded; save/load round-trips with identical logits,
in stock transformers, for every supported architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.record import LayerWidths, PruneRecord
from pipeline.methods.units import layer_widths, remove_layers
from pipeline.rewrite import check_round_trip, save_model
from tests.conftest import TINY_CONFIGS, tiny_model


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_remove_save_reload(arch: str, tmp_path: Path, tokenizer) -> None:
    m = tiny_model(arch)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    kept = remove_layers(m, [1])
    kept = remove_layers(m, [0], kept)  # indices are of the *current* model: original block 0
    assert kept == [2, 3]
    assert m.config.num_hidden_layers == 2
    record = PruneRecord(original_num_hidden_layers=4, kept_layers=kept, removed_layers=[0, 1],
                         layers=[LayerWidths(**w) for w in layer_widths(m)])  # fmt: skip
    assert [layer.self_attn.layer_idx for layer in m.model.layers] == [0, 1]
    if getattr(m.config, "layer_types", None) is not None:
        assert len(m.config.layer_types) == 2
    out = save_model(m, tokenizer, tmp_path / "pruned", record)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".pruned.*"))  # no temp dirs left behind
    assert check_round_trip(m, out, ids) == 0.0
    # stock from_pretrained, no prunefit code: the same logits, and generate() works with the cache
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert stock.config.prunefit["kept_layers"] == [2, 3]
    gen = stock.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)


def test_remove_rejects_bad_indices() -> None:
    m = tiny_model("llama")
    with pytest.raises(ValueError):
        remove_layers(m, [7])
    with pytest.raises(ValueError):
        remove_layers(m, [0, 1, 2, 3])
