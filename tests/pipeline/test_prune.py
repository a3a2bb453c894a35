"""Depth pruning to a budget on tiny random models."""

from __future__ import annotations

import pytest
import torch

from core.errors import BudgetError, ConfigError
from core.methods import method_config
from pipeline.methods.scores import block_influence
from pipeline.prune import prune_to_budget
from targets.budget import estimate_all, model_shape, worst
from targets.profile import DeviceProfile
from tests.conftest import PRUNE_WIDE, tiny_model

WIDE = PRUNE_WIDE


def profile(budget_mib: int, **kw: object) -> DeviceProfile:
    data = dict(
        name="test",
        device="test device",
        cpu={"arch": "x86_64", "cores": 2},
        ram_mib=4096,
        memory_budget_mib=budget_mib,
        context_length=256,
        prefill_tokens=32,
        runtimes=["onnxruntime", "executorch"],
        threads=2,
        runtime_overhead_mib={"onnxruntime": 0.0, "executorch": 0.0},
    )
    data.update(kw)
    return DeviceProfile.model_validate(data)


def calib(n: int = 4, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(1))


def test_block_influence_is_a_distance() -> None:
    m = tiny_model("llama", **WIDE)
    scores = block_influence(m, calib(), batch_size=2)
    assert len(scores) == 8
    assert all(0.0 <= s <= 2.0 for s in scores)
    assert len(set(round(s, 6) for s in scores)) > 1


def test_prunes_fewest_blocks_that_fit() -> None:
    m = tiny_model("llama", **WIDE)
    dense = model_shape(m)
    p = profile(30)
    assert not worst(estimate_all(dense, p)).fits
    plan = prune_to_budget(m, calib(), p, method_config(method="depth", max_removed_layer_ratio=0.75))
    after = model_shape(m)
    assert worst(estimate_all(after, p)).fits
    k = len(plan.removed_layers)
    assert k == 8 - len(after.layers) == len(plan.steps) and k >= 1
    # one block fewer removed would not fit: no overshoot
    assert not worst(estimate_all(dense.without_layers(set(plan.removed_layers[1:])), p)).fits
    assert plan.params_after == sum(x.numel() for x in m.parameters())
    assert m.config.num_hidden_layers == len(after.layers)
    assert plan.record is not None and plan.record.removed_layers == plan.removed_layers
    assert plan.record.kept_layers == [i for i in range(8) if i not in plan.removed_layers]
    out = m(calib(1), use_cache=False).logits
    assert out.shape == (1, 32, 512) and torch.isfinite(out).all()


def test_no_pruning_when_it_already_fits() -> None:
    m = tiny_model("llama", **WIDE)
    plan = prune_to_budget(m, calib(), profile(512), method_config("comp"))
    assert plan.removed_layers == [] and plan.steps == []
    assert len(model_shape(m).layers) == 8


def test_impossible_budget_fails_before_pruning_and_says_how_far() -> None:
    m = tiny_model("llama", **WIDE)
    with pytest.raises(BudgetError) as err:
        prune_to_budget(m, calib(), profile(2), method_config("comp", max_removed_layer_ratio=0.5))
    msg = str(err.value)
    assert "MiB over" in msg and "max_removed_layer_ratio=0.5" in msg
    assert len(model_shape(m).layers) == 8  # untouched


def test_bad_prune_config() -> None:
    with pytest.raises(ConfigError, match="max_removed_layer_ratio"):
        method_config("comp", max_removed_layer_ratio=1.0)
    with pytest.raises(ConfigError, match=r"unknown key 'shortlist'.*takes: .*ridge"):
        method_config("comp", shortlist=3)  # a multipruner knob
    with pytest.raises(ConfigError, match="Available: depth"):
        method_config(method="nope")  # type: ignore[arg-type]


def test_headroom_prunes_until_prediction_is_that_far_under_budget() -> None:
    plain = prune_to_budget(
        tiny_model("llama", **WIDE), calib(), profile(30), method_config(method="depth", max_removed_layer_ratio=0.75)
    )
    spare = prune_to_budget(
        tiny_model("llama", **WIDE),
        calib(),
        profile(30, pruning={"headroom_mib": 5.0}),
        method_config(method="depth", max_removed_layer_ratio=0.75),
    )
    assert spare.after["worst_mib"] <= 25 < plain.after["worst_mib"] + 5
    assert len(spare.removed_layers) > len(plain.removed_layers)


def test_depth_then_width_meets_the_budget_without_a_block_of_overshoot() -> None:
    """depth+width removes the blocks that are surely needed, then trims the remainder by channels:
    it lands between the budget and depth's result (which overshoots by part of a block)."""
    dense = tiny_model("llama", **WIDE)
    per_block = (
        worst(estimate_all(model_shape(dense), profile(30))).bound_mib
        - worst(estimate_all(model_shape(dense).without_layers({0}), profile(30))).bound_mib
    )
    start = worst(estimate_all(model_shape(dense), profile(30))).bound_mib
    budget = int(start - 1.5 * per_block)  # needs one block and a half
    p = profile(budget)
    m_depth, m_mixed = tiny_model("llama", **WIDE), tiny_model("llama", **WIDE)
    prune_to_budget(m_depth, calib(), p, method_config(method="depth", max_removed_layer_ratio=0.75))
    plan = prune_to_budget(m_mixed, calib(), p, method_config(method="depth+width", max_removed_layer_ratio=0.75))
    depth_mib = worst(estimate_all(model_shape(m_depth), p)).bound_mib
    mixed_mib = worst(estimate_all(model_shape(m_mixed), p)).bound_mib
    assert len(model_shape(m_depth).layers) == 6  # two blocks: 1.5 rounded up
    assert len(model_shape(m_mixed).layers) == 7  # one block, then channels
    assert depth_mib < mixed_mib <= budget
    assert budget - mixed_mib < per_block / 2  # channel granularity, not block granularity
    assert any("MLP channels" in s.removed or "KV group" in s.removed for s in plan.steps)
    assert plan.record is not None
    widths = plan.record.layers
    assert len(widths) == 7 and min(w.intermediate_size for w in widths) < 768
    ids = calib(1, 16)
    assert torch.isfinite(m_mixed(ids).logits).all()
