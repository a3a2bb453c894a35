"""Every registered pruning method, on the tiny model, through the registry: it prunes to a ratio,
returns a record that matches the model, and the model saved with that record reloads to the same
logits. The method knobs are typed: a profile or a caller setting an unknown one is told the keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import ConfigError, ProfileError
from core.methods import METHOD_TABLE, CompConfig, method_config, method_keys
from pipeline.methods.units import layer_widths
from pipeline.prune import prune_to_budget
from pipeline.rewrite import check_round_trip, load_pruned, save_model
from targets.profile import load_profile
from tests.conftest import GQA_WIDE, tiny_model
from tests.pipeline.test_prune import profile
from tests.targets.test_profiles import _base, _write

# One tiny case per registered method (tests/test_coverage.py holds this to the table): the knobs
# that keep it quick on the tiny model.
METHOD_CASES: dict[str, dict[str, object]] = {
    "depth": {},
    "width": {},
    "comp": {"blocks": True},
    "multipruner": {"group": 32},
    "depth+width": {},
}


def calib(n: int = 8, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_method_prunes_records_and_round_trips(method: str, tmp_path: Path, tokenizer) -> None:
    shape = dict(GQA_WIDE, num_hidden_layers=6)
    m = tiny_model("llama", **shape)
    dense = sum(p.numel() for layer in m.model.layers for p in layer.parameters())
    cfg = method_config(method, target_decoder_ratio=0.3, max_removed_layer_ratio=0.5, **METHOD_CASES[method])
    plan = prune_to_budget(m, calib(), profile(1000), cfg)
    after = sum(p.numel() for layer in m.model.layers for p in layer.parameters())
    assert 0.3 <= 1 - after / dense < 0.3 + 1 / 6 + 0.01  # within one step (a block is 1/6 here)
    record = plan.record
    assert record is not None and record.method == method and record.original_num_hidden_layers == 6
    assert sorted(record.kept_layers + record.removed_layers) == list(range(6))
    assert len(record.kept_layers) == m.config.num_hidden_layers == len(m.model.layers)
    assert [w.model_dump() for w in record.layers] == layer_widths(m)
    assert plan.removed_layers == record.removed_layers
    saved = save_model(m, tokenizer, tmp_path / "pruned", record)
    assert check_round_trip(m, saved, calib(1, 16)) == 0.0
    assert load_pruned(saved).config.prunefit["kept_layers"] == record.kept_layers


def test_saving_a_narrowed_model_without_its_record_is_refused(tmp_path: Path, tokenizer) -> None:
    m = tiny_model("llama", **GQA_WIDE)
    prune_to_budget(m, calib(), profile(1000), method_config("width", target_decoder_ratio=0.2))
    with pytest.raises(Exception, match="pass the prune record"):
        save_model(m, tokenizer, tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()


def test_method_config_is_typed_and_lists_its_keys() -> None:
    cfg = method_config("comp", ridge=0.02, blocks=True)
    assert isinstance(cfg, CompConfig) and cfg.ridge == 0.02 and cfg.blocks
    with pytest.raises(ConfigError) as err:
        method_config("width", blocks=True)  # a comp knob
    assert "unknown key 'blocks' for method 'width'" in str(err.value)
    assert all(k in str(err.value) for k in method_keys("width"))
    with pytest.raises(ConfigError, match="ridge"):
        method_config("comp", ridge=-1.0)
    with pytest.raises(ConfigError, match="shares"):
        method_config("multipruner", shares=[0, 0, 0])
    with pytest.raises(ConfigError, match="Available: depth"):
        method_config("magic")
    with pytest.raises(Exception, match="frozen"):
        cfg.ridge = 0.1  # type: ignore[misc]
    assert set(METHOD_TABLE) == {"depth", "width", "comp", "multipruner", "depth+width"}


def test_profile_pruning_section_sets_any_knob_of_its_method(tmp_path: Path) -> None:
    p = load_profile(
        _write(tmp_path, {**_base(), "name": "dev", "pruning": {"method": "comp", "ridge": 0.02, "target": "sublayer"}})
    )
    cfg = p.prune_config()
    assert isinstance(cfg, CompConfig)
    assert (cfg.ridge, cfg.target, cfg.width_multiple) == (0.02, "sublayer", p.width_multiple)
    # another method asked on the command line: the profile's comp knobs do not leak into it
    assert p.prune_config("depth").method == "depth"
    with pytest.raises(ProfileError) as err:
        load_profile(
            _write(tmp_path, {**_base(), "name": "dev", "pruning": {"method": "width", "ridge": 0.1, "shortlist": 3}})
        )
    msg = str(err.value)
    assert "unknown key 'shortlist' for method 'width'" in msg and "min_keep_ratio" in msg
    with pytest.raises(ProfileError, match="width_multiple is a top-level"):
        load_profile(_write(tmp_path, {**_base(), "name": "dev", "pruning": {"width_multiple": 16}}))
    with pytest.raises(ProfileError, match="Available: depth"):
        load_profile(_write(tmp_path, {**_base(), "name": "dev", "pruning": {"method": "magic"}}))
