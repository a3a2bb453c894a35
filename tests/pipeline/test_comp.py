"""COMP-style layer-wise pruning: condition-aware scores, compensation, budget targeting, every architecture."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from core.methods import method_config
from pipeline.methods.base import PruneContext
from pipeline.methods.comp import CompPruner
from pipeline.methods.comp_math import greedy_obs
from pipeline.methods.units import layer_widths, ls_fit, narrowest_shape
from pipeline.prune import prune_to_budget
from pipeline.rewrite import check_round_trip, save_model
from targets.budget import estimate_all, model_shape, worst
from tests.conftest import GQA_WIDE, TINY_CONFIGS, tiny_model
from tests.pipeline.test_prune import profile

WIDE = GQA_WIDE
ZERO = {"onnxruntime": 0.0, "executorch": 0.0}


def calib(n: int = 8, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(3))


def test_greedy_obs_matches_brute_force_on_small_problem() -> None:
    """The greedy first pick is the input whose compensated removal costs least, and the cost is exact."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    x[:, 5] = x[:, 0] + 0.01 * torch.randn(200, generator=g, dtype=torch.float64)  # 5 is nearly a copy of 0
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w[:, 5] *= 3.0  # large weights: plain energy would keep it, the condition-aware score must not
    gram = x.T @ x
    steps, costs = greedy_obs(w, gram, [torch.tensor([j]) for j in range(6)], 1, 1, ridge=0.0)

    def refit_err(drop: int) -> float:
        keep = torch.tensor([j for j in range(6) if j != drop])
        fitted = ls_fit(w @ gram, gram, keep, ridge=0.0)
        return float((x[:, keep] @ fitted.T - x @ w.T).pow(2).sum())

    errs = [refit_err(j) for j in range(6)]
    assert steps[0][0] in (0, 5) and steps[0][0] == min(range(6), key=errs.__getitem__)
    assert costs[0] == pytest.approx(errs[steps[0][0]], rel=1e-6)
    energy = (w.pow(2).sum(0) * gram.diagonal()).tolist()
    assert max(range(6), key=energy.__getitem__) == 5  # energy alone ranks the redundant input as most important


def test_greedy_obs_groups_leave_whole() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 8, generator=g, dtype=torch.float64)
    w = torch.randn(3, 8, generator=g, dtype=torch.float64)
    blocks = [torch.arange(i * 2, i * 2 + 2) for i in range(4)]
    steps, costs = greedy_obs(w, x.T @ x, blocks, 3, 1)
    assert sorted(itertools.chain(*steps)) != [] and len({b for s in steps for b in s}) == 3
    assert all(c >= 0 for c in costs)


def _removal_cost(w: torch.Tensor, ginv: torch.Tensor, dims: list[int]) -> float:
    """Compensated error of removing input ``dims`` from scratch: tr(W_S [G^-1]_SS^-1 W_S^T)."""
    d = torch.tensor(dims, dtype=torch.long)
    return float(((w[:, d] @ torch.linalg.inv(ginv[d][:, d])) * w[:, d]).sum())


@pytest.mark.parametrize(("grouped", "per_step"), [(False, 1), (False, 3), (True, 1)])
def test_greedy_obs_downdates_match_from_scratch_greedy(grouped: bool, per_step: int) -> None:
    """Many steps of the down-dated, compacted greedy equal a greedy that recomputes every cost from
    the original W and G^-1 (removal cost of the removed set plus the candidate, minus its own)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    w = torch.randn(5, 24, generator=g, dtype=torch.float64)
    gram = x.T @ x
    blocks = [torch.arange(i * 3, i * 3 + 3) for i in range(8)] if grouped else [torch.tensor([j]) for j in range(24)]
    n_steps = 5
    steps, costs = greedy_obs(w, gram, blocks, n_steps, per_step, ridge=1e-3)
    ginv = torch.linalg.inv(gram + 1e-3 * float(gram.diagonal().mean()) * torch.eye(24, dtype=torch.float64))
    removed: list[int] = []
    for step, cost in zip(steps, costs, strict=True):
        base = _removal_cost(w, ginv, removed) if removed else 0.0
        alive = [b for b in range(len(blocks)) if not set(blocks[b].tolist()) & set(removed)]
        marginal = {b: _removal_cost(w, ginv, removed + blocks[b].tolist()) - base for b in alive}
        if per_step == 1:
            assert step == [min(alive, key=marginal.__getitem__)]
        else:  # a group of single channels is picked by their individual marginal costs
            assert sorted(step) == sorted(sorted(alive, key=marginal.__getitem__)[:per_step])
        removed += [d for b in step for d in blocks[b].tolist()]
        assert cost == pytest.approx(_removal_cost(w, ginv, removed) - base, rel=1e-6, abs=1e-9)
    assert len(steps) == n_steps


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_comp_prunes_to_budget_on_every_architecture(arch: str, tmp_path: Path, tokenizer) -> None:
    m = tiny_model(arch, **WIDE)
    dense = model_shape(m)
    weights = worst(estimate_all(dense, profile(1000))).weights_mib
    total = worst(estimate_all(dense, profile(1000, runtime_overhead_mib=ZERO))).bound_mib
    cfg = method_config(method="comp", width_multiple=8)
    narrow = narrowest_shape(m, dense, 8, cfg.min_keep_ratio, drop_blocks=cfg.max_removed_layer_ratio)
    floor = worst(estimate_all(narrow, profile(1000, runtime_overhead_mib=ZERO)))
    # a quarter of the weights under dense, but always reachable (the fixed session overheads of
    # a model this small can leave less than that to prune)
    target = profile(math.ceil(max(total - 0.25 * weights, floor.bound_mib + 0.5)), runtime_overhead_mib=ZERO)
    assert target.memory_budget_mib < total
    plan = prune_to_budget(m, calib(), target, cfg)
    after = model_shape(m)
    assert worst(estimate_all(after, target)).fits
    assert plan.params_after == sum(p.numel() for p in m.parameters()) < plan.params_before
    assert plan.params_after == after.total_params
    # no overshoot beyond one unit: the last step was needed
    # (steps record their estimate to 0.01 MiB)
    needed = len(plan.steps) < 2 or plan.steps[-2].estimate_mib > target.memory_budget_mib - 0.005
    assert len(plan.steps) >= 1 and needed
    for w in layer_widths(m):
        assert w["intermediate_size"] % 8 == 0 and w["intermediate_size"] >= 256 // 2
        rep = WIDE["num_attention_heads"] // WIDE["num_key_value_heads"]
        assert w["num_attention_heads"] == rep * w["num_key_value_heads"] >= rep  # GQA groups intact
    out = m(calib(2, 16), use_cache=False).logits
    assert torch.isfinite(out).all()
    tokenizer_dir = save_model(m, tokenizer, tmp_path / "pruned", plan.record)
    assert check_round_trip(m, tokenizer_dir, calib(1, 16)) == 0.0


def test_compensation_lowers_reconstruction_error() -> None:
    m = tiny_model("llama", **WIDE)
    cfg = method_config(method="comp", width_multiple=8, target_decoder_ratio=0.25, blocks=False)
    pruner = CompPruner(cfg)  # type: ignore[arg-type]
    pruner.prepare(m, calib(16), PruneContext(fits=lambda s: False, kept_layers=list(range(4))))
    while (sum(lp.mlp for lp in pruner.plan) < 512) and pruner.can_step(m):
        pruner.step(m, calib())
    pruner.finalize(m)
    assert pruner.reconstruction
    for entry in pruner.reconstruction:
        assert entry["compensated"] < entry["sliced"], entry


def test_comp_keeps_more_quality_than_uncompensated() -> None:
    """Same plan with and without the least-squares re-fit: the re-fit model is closer to the dense one."""
    ids = calib(16)
    dense = tiny_model("llama", **WIDE)
    ref = dense(ids, use_cache=False).logits
    errs = {}
    for compensate in (True, False):
        m = tiny_model("llama", **WIDE)
        cfg = method_config(method="comp", width_multiple=8, target_decoder_ratio=0.3, compensate=compensate)
        prune_to_budget(m, ids, profile(1000), cfg)
        errs[compensate] = float((m(ids, use_cache=False).logits - ref).pow(2).mean())
    assert errs[True] < errs[False]


def test_comp_ratio_target_and_blocks_compete() -> None:
    m = tiny_model("llama", **dict(WIDE, num_hidden_layers=8))
    dec = sum(p.numel() for layer in m.model.layers for p in layer.parameters())
    plan = prune_to_budget(
        m, calib(), profile(1000), method_config(method="comp", target_decoder_ratio=0.4, blocks=True)
    )
    dec_after = sum(p.numel() for layer in m.model.layers for p in layer.parameters())
    assert 0.4 <= 1 - dec_after / dec < 0.4 + 0.15  # within one step (a block is 1/8 of the decoder)
    assert m.config.num_hidden_layers == len(m.model.layers) == 8 - len(plan.removed_layers)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_multipruner_balanced_greedy_on_every_architecture(arch: str, tmp_path: Path, tokenizer) -> None:
    m = tiny_model(arch, **dict(WIDE, num_hidden_layers=6))
    dec = sum(p.numel() for layer in m.model.layers for p in layer.parameters())
    cfg = method_config(method="multipruner", target_decoder_ratio=0.3, group=32)
    plan = prune_to_budget(m, calib(), profile(1000), cfg)
    dec_after = sum(p.numel() for layer in m.model.layers for p in layer.parameters())
    assert 0.3 <= 1 - dec_after / dec < 0.3 + 1 / 6  # stops within one step (a block is 1/6)
    assert plan.params_after == sum(p.numel() for p in m.parameters())
    kinds = {("MLP" in s.removed) + 2 * ("KV" in s.removed) for s in plan.steps}
    assert 0 in kinds and 1 in kinds  # blocks and MLP channels both taken (the 44:52 mix)
    # every step reports the calibration perplexity of the candidate it chose
    assert all(s.score > 1.0 for s in plan.steps)
    for w in layer_widths(m):
        assert w["num_attention_heads"] == 2 * w["num_key_value_heads"] >= 2
    assert torch.isfinite(m(calib(2, 16), use_cache=False).logits).all()
    assert check_round_trip(m, save_model(m, tokenizer, tmp_path / "mp", plan.record), calib(1, 16)) == 0.0


def test_comp_uniform_allocation_spreads_evenly() -> None:
    m = tiny_model("llama", **WIDE)
    cfg = method_config(method="comp", width_multiple=8, target_decoder_ratio=0.2, allocation="uniform")
    prune_to_budget(m, calib(), profile(1000), cfg)
    widths = [w["intermediate_size"] for w in layer_widths(m)]
    assert max(widths) - min(widths) <= 8  # at most one group apart (the last, partial round)
    assert all(w["num_key_value_heads"] == 4 for w in layer_widths(m))


def test_multipruner_shortlist_scores_only_the_locally_cheapest() -> None:
    """The shortlist gives the perplexity forward to the candidates that change their own block
    least; scoring every candidate can only find an equal or lower calibration perplexity."""
    from pipeline.methods.multipruner import MultiPruner

    chosen = {}
    for shortlist in (1, 100):
        torch.manual_seed(0)
        m = tiny_model("llama", **dict(WIDE, num_hidden_layers=6))
        cfg = method_config(method="multipruner", group=32, shortlist=shortlist)
        pruner = MultiPruner(cfg)  # type: ignore[arg-type]
        pruner.prepare(m, calib(), PruneContext(fits=lambda s: False, kept_layers=list(range(6))))
        pruner.removed_params["block"] = 10**9  # serve MLP channels first: 6 candidates, one per block
        if shortlist == 1:
            change = [pruner._local_change(m, i, "mlp", pruner._next_mlp(m, i)) for i in range(6)]
            expect = min(range(6), key=change.__getitem__)
        chosen[shortlist] = pruner.step(m, calib())
    assert chosen[1][0].startswith(f"block {expect}:")
    assert chosen[100][1] <= chosen[1][1]
