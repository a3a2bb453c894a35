"""precision: auto: schemes simulated in PyTorch as their exporters quantize, the pruning proxy, and
the choice of each runtime's precision with the pruning (pipeline/fit/)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from core.errors import BudgetError
from core.methods import method_config
from exporters.quantize import quantize_torch
from pipeline.choices import embedding_options, options
from pipeline.feasibility import check_feasible, floor_shape
from pipeline.fit import choose_precision, fitted_profile, most_compressed
from pipeline.fit.plan import GENERATED_DISAGREEMENT
from pipeline.fit.proxy import MAX_SHARE, STEP, PruningProxy, share_shape, smallest_share
from pipeline.fit.simulate import SIMULATIONS, quantized_linears, simulated, simulated_embedding
from targets.budget import estimate_all, model_shape, worst
from targets.profile import load_profile
from tests.conftest import PRUNE_WIDE, QUANT_WIDE, default_model_shape, tiny_model
from tests.pipeline.test_pipeline import write_profile


@pytest.fixture(scope="module")
def wide() -> nn.Module:
    return tiny_model("llama", **QUANT_WIDE)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("scheme", ["8da8w", "8da4w"])
def test_executorch_schemes_simulate_torchao_exactly(scheme: str, wide: nn.Module, ids: torch.Tensor) -> None:
    """The simulation computes what torchao's quantized model (the .pte's source) computes."""
    with torch.no_grad():
        real = quantize_torch(wide, scheme)(ids, use_cache=False).logits
        fp32 = wide(ids, use_cache=False).logits
        with simulated(wide, scheme) as n:
            sim = wide(ids, use_cache=False).logits
    assert n == 3 * 7 + 1  # every block's seven Linear modules and the (tied) lm_head
    assert (fp32 - real).abs().max() > 1e-3  # quantization does change the logits...
    torch.testing.assert_close(sim, real, atol=1e-5, rtol=0)  # ...exactly as simulated


def test_simulation_restores_the_model_and_its_tied_head(wide: nn.Module, ids: torch.Tensor) -> None:
    head, embed = wide.get_output_embeddings(), wide.get_input_embeddings()
    assert head.weight is embed.weight
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with torch.no_grad():
        ref = wide(ids, use_cache=False).logits
        for scheme in SIMULATIONS:
            with simulated(wide, scheme):
                assert head.weight is not embed.weight or scheme == "int8"  # only int8 keeps a tied head fp32
        after = wide(ids, use_cache=False).logits
    assert head.weight is embed.weight
    assert all(torch.equal(v, wide.state_dict()[k]) for k, v in before.items())
    assert torch.equal(ref, after)


def test_quantized_linears_follow_each_exporter() -> None:
    model = tiny_model("llama", **QUANT_WIDE)
    blocks = 3 * 7
    assert len(quantized_linears(model, "int8")) == blocks  # the tied head reads a Transpose: stays fp32
    assert len(quantized_linears(model, "int8w")) == blocks + 1  # untied and quantized
    assert len(quantized_linears(model, "8da8w")) == blocks + 1
    from pipeline.methods.units import prune_mlp

    prune_mlp(model.model.layers[0], torch.arange(1000), None)  # 1000 % 32 != 0: that down_proj stays fp32
    assert len(quantized_linears(model, "8da4w")) == blocks  # (+1 head, -1 down_proj)
    assert len(quantized_linears(model, "8da8w")) == blocks + 1


def test_int4_rounding_has_sixteen_levels_per_group() -> None:
    w = torch.randn(4, 64)
    q = SIMULATIONS["8da4w"].weight(w)
    for group in q.reshape(4, 2, 32).unbind(1):
        for row in group:
            assert row.unique().numel() <= 16
    assert (q - w).abs().max() <= w.abs().max() / 7.5 / 2 + 1e-6  # half a step of the coarsest group


def test_smallest_share_is_the_least_that_fits() -> None:
    shape = model_shape(tiny_model("llama", **PRUNE_WIDE))
    full = shape.layer_params

    def under(limit: float):
        return lambda s: s.layer_params <= limit

    assert smallest_share(shape, under(full)) == 0.0
    share = smallest_share(shape, under(0.8 * full))
    assert share is not None and 0 < share <= MAX_SHARE
    assert share_shape(shape, share).layer_params <= 0.8 * full < share_shape(shape, share - STEP).layer_params
    assert smallest_share(shape, under(0.01 * full)) is None  # attention alone is more than that


def test_pruning_proxy_masks_what_removal_would_remove(ids: torch.Tensor) -> None:
    """Masking a share of channels scores the model those channels' removal gives (lowest energy
    first), and the mask is undone afterwards."""
    import copy

    from core.arch import decoder_layers
    from core.perplexity import perplexity
    from pipeline.methods.scores import channel_scores, collect_stats
    from pipeline.methods.units import prune_mlp

    model = tiny_model("llama", **QUANT_WIDE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    proxy = PruningProxy(model, ids)
    masked = proxy.perplexity(0.25)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert proxy.perplexity(0.0) == pytest.approx(perplexity(model, ids))
    removed = copy.deepcopy(model)
    for layer, st in zip(decoder_layers(removed), collect_stats(removed, ids), strict=True):
        order = torch.argsort(channel_scores(layer, st))
        prune_mlp(layer, order[256:].sort().values, None)  # keep all but the lowest 25% of 1024
    assert perplexity(removed, ids) == pytest.approx(masked, rel=1e-4)
    assert masked != pytest.approx(proxy.perplexity(0.0), rel=1e-3)


# a random tiny model's logits are near flat, so a quantized copy's top-1 agreement with it is noise
# (40-95%): the tests of other mechanics take loose quality gates; the gates' own tests set them
LOOSE_GATES = {"parity_atol": 1e-4, "max_ppl_ratio": 50.0, "quantized_min_top1": 0.01, "quantized_max_ppl_ratio": 50.0}
STRICT_GATES = {"parity_atol": 1e-4, "max_ppl_ratio": 50.0}  # the quantized gates' defaults (85%, 1.25x)


def _auto_profile(tmp_path: Path, **overrides: object):
    overrides = {"gates": LOOSE_GATES, **overrides}
    return load_profile(write_profile(tmp_path, name="auto", precision="auto", **overrides))


def test_auto_quantizes_instead_of_pruning(tmp_path: Path, ids: torch.Tensor, monkeypatch) -> None:
    """fp32 does not fit (36 MiB less 10 headroom) on either runtime; every quantized candidate does.
    With pruning priced as it is on trained models (a random one's perplexity does not rise when
    channels go), the choice quantizes both runtimes and prunes nothing."""
    import pipeline.fit.plan as plan

    class Proxy(PruningProxy):
        def perplexity(self, share: float) -> float:
            return base * (1 + 2 * share)

    model = tiny_model("llama", **PRUNE_WIDE)
    from core.perplexity import perplexity

    base = perplexity(model, ids)
    monkeypatch.setattr(plan, "PruningProxy", Proxy)
    profile = _auto_profile(tmp_path, gates=STRICT_GATES)
    shape = model_shape(model)
    assert worst(estimate_all(shape, profile)).bound_mib > 26
    fit = choose_precision(model, ids, profile, profile.prune_config())
    # executorch blocks fp32/8da4w/8da8w x head fp32/8da4w/8da8w x embedding fp32/int8/int4, x
    # onnxruntime blocks fp32/int8/int8w/int4w x head fp32/int8w/int4w/int4w-b128
    assert len(fit.candidates) == 27 * 16
    chosen = [c for c in fit.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].prune_share == 0 and chosen[0].quantize == fit.quantize
    assert chosen[0].quantize_head == fit.quantize_head
    for rt in ("executorch", "onnxruntime"):  # fp32 fits on neither: each quantizes its blocks or its head
        assert rt in fit.quantize or fit.quantize_head.get(rt, "fp32") != "fp32"
    priced = [c for c in fit.candidates if c.est_ratio]
    whole = [c for c in priced if not c.bound_only]
    within = [c for c in priced if not c.gate_misses]
    assert chosen[0].worst_ratio == min(c.worst_ratio for c in whole if not c.gate_misses)
    # the choice's estimates pass the profile's quantized gates; one that would lose less misses them
    gates = profile.gates
    for rt, agree in chosen[0].est_top1.items():
        fp32 = (chosen[0].precision[rt], chosen[0].head[rt], chosen[0].embedding[rt]) == ("fp32",) * 3
        assert agree >= gates.quantized_min_top1 or fp32
    assert all(c.gate_misses for c in whole if c.worst_ratio < chosen[0].worst_ratio)
    # branch and bound: a candidate left at its components' bound could not have beaten the choice,
    # and fewer whole precisions were simulated than there are combinations
    assert all(c.worst_ratio >= chosen[0].worst_ratio for c in within if c.bound_only)
    assert len(whole) < len(priced) and fit.simulations < 27 + 12
    fp32 = next(c for c in fit.candidates if set(c.precision.values()) == {"fp32"})
    assert fp32.prune_share and fp32.prune_ppl == pytest.approx(base * (1 + 2 * fp32.prune_share))
    for c in priced:  # losses compound: each runtime's scheme times the shared pruning
        for rt, r in c.est_ratio.items():
            assert r == pytest.approx(max(1, c.quant_ppl[rt] / base) * max(1, (c.prune_ppl or base) / base))
    assert fit.quantize["executorch"] in fit.reason and "no pruning" in fit.reason
    fitted = fitted_profile(profile, fit.to_dict())
    assert worst(estimate_all(shape, fitted)).bound_mib <= 26


def test_pinned_and_fp32_profiles_are_honoured(tmp_path: Path) -> None:
    pinned = _auto_profile(tmp_path, quantize={"executorch": "8da4w"})
    assert options(pinned, "executorch") == ["8da4w"]
    assert options(pinned, "onnxruntime") == ["fp32", "int8", "int8w", "int4w"]
    assert embedding_options(pinned, "executorch") == ["fp32", "int8", "int4"]  # a component of its own
    assert embedding_options(pinned, "onnxruntime") == ["fp32"]
    assert pinned.channel_multiple == 32  # int4 groups: pruned widths stay whole groups
    fp32 = load_profile(write_profile(tmp_path))
    assert options(fp32, "onnxruntime") == ["fp32"] and fp32.channel_multiple == 8
    default = default_model_shape()  # SmolLM2-135M: a model whose weights outweigh any session cost
    assert most_compressed(pinned, default).quantize == {"executorch": "8da4w", "onnxruntime": "int4w"}
    assert most_compressed(pinned, default).quantize_embedding == {"executorch": "int4"}
    assert most_compressed(fp32, default) == fp32


def test_most_compressed_prices_every_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor auto may reach is the smallest *peak*, not the fewest bits: with 8da4w's session
    at the 13 MiB it was once calibrated to, its int4 weights save less than that over 8da8w's on a
    tiny model, so ExecuTorch's floor is 8da8w (the CI failure of stop 26 was this arithmetic done by
    bits: a budget that the smallest peak meets was refused); at today's constants it is 8da4w.
    Every other choice's bound is at least the floor's."""
    from dataclasses import replace

    from core.schemes import SCHEME_TABLE

    shape = model_shape(tiny_model("llama", **QUANT_WIDE))
    auto = _auto_profile(tmp_path)
    assert most_compressed(auto, shape).quantize == {"executorch": "8da4w", "onnxruntime": "int4w"}
    spec = SCHEME_TABLE["8da4w"]
    monkeypatch.setitem(SCHEME_TABLE, "8da4w", replace(spec, cost=replace(spec.cost, session_mib=13.31)))
    floor = most_compressed(auto, shape)
    assert floor.quantize == {"executorch": "8da8w", "onnxruntime": "int4w"}
    for rt in auto.runtimes:  # no precision auto may choose holds it in less
        best = next(e for e in estimate_all(shape, floor) if e.runtime == rt).bound_mib
        for lin in options(auto, rt):
            q = {**floor.quantize, rt: lin} if lin != "fp32" else {k: v for k, v in floor.quantize.items() if k != rt}
            trial = next(
                e for e in estimate_all(shape, auto.with_quantize(q, floor.quantize_embedding)) if e.runtime == rt
            )
            assert best <= trial.bound_mib + 1e-9, (rt, lin)


def test_feasibility_counts_what_auto_may_reach(tmp_path: Path, monkeypatch) -> None:
    """A budget that only quantization reaches, linear weights and table together: refused under fp32
    with precision: auto as the lever (either part alone falls short), accepted under auto. (The
    levers' arithmetic on the predictions alone: without the calibration's margin.)"""
    from dataclasses import replace

    from core.runtimes import RUNTIME_TABLE
    from core.schemes import SCHEME_TABLE

    for rt, spec in list(RUNTIME_TABLE.items()):
        monkeypatch.setitem(RUNTIME_TABLE, rt, replace(spec, cost=replace(spec.cost, prediction_margin=0.0)))
    for name, sch in list(SCHEME_TABLE.items()):
        if sch.cost is not None:
            monkeypatch.setitem(SCHEME_TABLE, name, replace(sch, cost=replace(sch.cost, prediction_margin=0.0)))
    # a 4096-row table: the tiny model's weights are half embedding, as a real small model's are
    model = tiny_model("llama", **PRUNE_WIDE, vocab_size=4096)
    cfg = method_config("width")  # keeps every block: its floor is above 20 MiB in fp32
    budget = dict(memory_budget_mib=7, pruning={"method": "width", "headroom_mib": 0})
    fp32 = load_profile(write_profile(tmp_path, **budget))
    with pytest.raises(BudgetError, match="precision: auto") as err:
        check_feasible(model, fp32, cfg)
    assert "quantize: {" not in str(err.value) and "quantize_embedding: {" not in str(err.value)
    auto = _auto_profile(tmp_path, **budget)
    check_feasible(model, most_compressed(auto, floor_shape(model, cfg)), cfg)
    tiny = _auto_profile(tmp_path, memory_budget_mib=3, pruning={"method": "width", "headroom_mib": 0})
    with pytest.raises(BudgetError, match=r"smallest precision:auto may choose, .*onnxruntime int4w"):
        check_feasible(model, most_compressed(tiny, floor_shape(model, cfg)), cfg)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_embedding_simulation_is_the_exported_table(scheme: str, ids: torch.Tensor) -> None:
    """The simulated lookup returns what the exported table's kernel returns, bit for bit; a tied
    lm_head keeps its fp32 weight (ExecuTorch stores the head apart), and all is restored on exit."""
    import copy

    from core.schemes import EMBEDDING_TABLE
    from exporters.quantized_embedding import QuantizedEmbedding, quantize_embedding

    model = tiny_model("gemma3_text", vocab_size=512)  # tied, with Gemma's sqrt(hidden) embedding scale
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embed.weight
    before = embed.weight.detach().clone()
    exported = copy.deepcopy(model)
    stored = quantize_embedding(exported, scheme)
    assert isinstance(exported.get_input_embeddings(), QuantizedEmbedding)
    rows, width = before.shape
    assert stored == pytest.approx(rows * EMBEDDING_TABLE[scheme].bytes_per_row(width))
    with torch.no_grad(), simulated_embedding(model, scheme) as n:
        assert n == rows and head.weight is not embed.weight and torch.equal(head.weight, before)
        sim = embed(ids)
        sim_logits = model(ids, use_cache=False).logits
    assert torch.equal(sim, exported.get_input_embeddings()(ids))
    with torch.no_grad():
        assert torch.allclose(sim_logits, exported(ids, use_cache=False).logits, atol=1e-5)
    assert head.weight is embed.weight and torch.equal(embed.weight, before)
    # rounding moves a value by at most half a step: max|group| / 15 (int4) or / 255 (int8)
    err = (sim - nn.functional.embedding(ids, before) * embed.embed_scale).abs().max()
    assert 0 < err <= (1 / 15 if scheme == "int4" else 1 / 255) * before.abs().max() * embed.embed_scale * 1.001


def test_large_vocabulary_quantizes_its_embedding(tmp_path: Path, ids: torch.Tensor) -> None:
    """A tiny Gemma 3 whose tied 8192-row table is most of its weights: on ExecuTorch the linear
    schemes alone cannot reach the budget and pruning MLP channels barely moves it, so the solver
    quantizes the embedding table, and the plan it picks fits."""
    model = tiny_model("gemma3_text", vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    shape = model_shape(model)
    assert shape.embed_params > 0.8 * shape.total_params
    probe = _auto_profile(tmp_path, runtimes=["executorch"], runtime_overhead_mib={"executorch": 0.0})

    def peak(table: str | None) -> float:  # the smallest linear scheme with this table
        return min(
            worst(estimate_all(shape, probe.with_quantize(q, {"executorch": table} if table else {}))).bound_mib
            for q in ({}, {"executorch": "8da8w"}, {"executorch": "8da4w"})
        )

    budget = round((peak(None) + peak("int8")) / 2 + 10)  # + the 10 MiB headroom
    profile = _auto_profile(
        tmp_path, runtimes=["executorch"], runtime_overhead_mib={"executorch": 0.0}, memory_budget_mib=budget
    )
    fit = choose_precision(model, ids, profile, profile.prune_config())
    assert len(fit.candidates) == 3 * 3 * 3  # blocks x head x table
    assert fit.quantize_embedding.get("executorch") in ("int8", "int4"), fit.reason
    assert "embedding" in fit.reason
    no_table = [c for c in fit.candidates if c.embedding["executorch"] == "fp32"]
    assert all(c.prune_share is None or c.prune_share > 0 for c in no_table)  # none fits unpruned
    fitted = fitted_profile(profile, fit.to_dict())
    assert fitted.quantize_embedding == fit.quantize_embedding
    assert worst(estimate_all(shape, fitted)).bound_mib <= budget - 10


def test_choose_precision_reuses_the_dense_measurements(tmp_path: Path, ids: torch.Tensor, monkeypatch) -> None:
    """A second target prices its candidates from what the first measured (pipeline/memo.py): no
    simulated forward runs again, and the numbers are the same; ``--force`` measures again."""
    import pipeline.fit.plan as plan
    from pipeline.memo import Memo

    monkeypatch.setenv("PRUNEFIT_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model("llama", **PRUNE_WIDE)
    profile = _auto_profile(tmp_path)
    first = choose_precision(model, ids, profile, profile.prune_config(), Memo("tiny"))
    simulated = []
    real = plan._simulated
    monkeypatch.setattr(plan, "_simulated", lambda *a: simulated.append(a) or real(*a))
    second = choose_precision(model, ids, profile, profile.prune_config(), Memo("tiny"))
    assert simulated == [] and second.base_ppl == first.base_ppl
    assert [c.quant_ppl for c in second.candidates] == [c.quant_ppl for c in first.candidates]
    assert [c.est_top1 for c in second.candidates] == [c.est_top1 for c in first.candidates]
    assert sum(bool(c.quant_ppl) for c in first.candidates) > 1
    choose_precision(model, ids, profile, profile.prune_config(), Memo("tiny", force=True))
    assert len(simulated) > 1


def test_a_runtime_that_cannot_fit_is_named_with_the_one_that_can(tmp_path: Path) -> None:
    """Gemma 3 270M on android-go: onnxruntime's int4 weights fit, ExecuTorch's packed int4 head does
    not. The error offers exporting for the runtime that fits (its floor given), and that profile
    (``with_runtimes``, what ``--runtimes`` applies) passes the check, its pins kept. (On the tiny
    model in fp32, where the runtimes' floors are furthest apart.)"""
    import math

    from core.errors import ProfileError

    model = tiny_model("llama", **PRUNE_WIDE)
    cfg = method_config("width")
    probe = load_profile(write_profile(tmp_path, pruning={"method": "width", "headroom_mib": 0}))
    floors = {e.runtime: e.bound_mib for e in estimate_all(floor_shape(model, cfg), probe)}
    fits, other = sorted(floors, key=floors.get)  # type: ignore[arg-type]
    assert floors[other] - floors[fits] > 2, floors  # room for a budget between them
    budget = math.ceil(floors[fits]) + 1
    profile = load_profile(
        write_profile(tmp_path, memory_budget_mib=budget, pruning={"method": "width", "headroom_mib": 0})
    )
    with pytest.raises(BudgetError, match=rf"runtimes: \[{fits}\] \(or --runtimes {fits}; its floor") as err:
        check_feasible(model, profile, cfg)
    assert f"on {other}" in str(err.value)
    alone = profile.with_runtimes([fits])
    assert alone.runtimes == [fits] and other not in alone.runtime_overhead_mib
    check_feasible(model, alone, cfg)
    pinned = profile.with_quantize({other: "8da8w" if other == "executorch" else "int8w"})  # type: ignore[dict-item]
    assert other not in pinned.with_runtimes([fits]).quantize  # a dropped runtime's pins go with it
    with pytest.raises(ProfileError, match="name one or more of those"):
        profile.with_runtimes(["tensorrt"])  # type: ignore[list-item]


def test_a_shorter_prefill_chunk_comes_before_pruning(tmp_path: Path, ids: torch.Tensor) -> None:
    """A large vocabulary's prefill logits (chunk x vocab x 4 bytes) are a lever that costs no quality:
    with ``prefill_tokens_min`` the solver halves the chunk until the dense model fits, and prunes
    only when even the shortest chunk does not. Without it the chunk is the profile's."""
    model = tiny_model("gemma3_text", vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    shape = model_shape(model)
    common = {"runtimes": ["onnxruntime"], "runtime_overhead_mib": {"onnxruntime": 0.0}, "prefill_tokens": 128}
    pin = {"quantize": {"onnxruntime": "int8w"}, "pruning": {"headroom_mib": 0}}
    probe = _auto_profile(tmp_path, **common, **pin)

    def peak(chunk: int) -> float:
        return worst(estimate_all(shape, probe.model_copy(update={"prefill_tokens": chunk}))).bound_mib

    assert peak(128) - peak(32) > 8  # 96 tokens of 32768-wide fp32 logits, and the attention's share
    budget = math.floor(peak(32)) + 1  # 32 fits, 64 does not
    assert peak(64) > budget
    profile = _auto_profile(tmp_path, **common, **pin, memory_budget_mib=budget, prefill_tokens_min=16)
    assert profile.prefill_chunks() == [128, 64, 32, 16]
    fit = choose_precision(model, ids, profile, profile.prune_config())
    (cand,) = fit.candidates
    assert cand.prune_share == 0 and cand.prefill_tokens == fit.prefill_tokens == 32, fit.reason
    assert "prefill chunk 32, no pruning" in fit.reason
    fitted = fitted_profile(profile, fit.to_dict())
    assert fitted.prefill_tokens == 32 and worst(estimate_all(shape, fitted)).bound_mib <= budget
    # the profile's own chunk when no shorter one is allowed: pruning this model's MLPs cannot make up
    # 96 tokens of logits, so the same budget is out of reach
    fixed = _auto_profile(tmp_path, **common, **pin, memory_budget_mib=budget)
    with pytest.raises(BudgetError, match="at 256 positions"):
        choose_precision(model, ids, fixed, fixed.prune_config())


def test_gptq_is_priced_on_held_out_hessians(tmp_path: Path, monkeypatch) -> None:
    """GPTQ is priced only where no candidate rounded to nearest fits unpruned (else int4 is priced to
    nearest, an upper bound, and costs no minutes). Then, with more calibration windows than the 8
    scored, its Hessians come from the others (its score is not in-sample); with generated text, from
    the run's whole set (another seed); with only the 8 and nothing else, from those."""
    import pipeline.fit.plan as plan
    from pipeline.methods.base import PPL_WINDOWS

    model = tiny_model("llama", **PRUNE_WIDE)
    shape = model_shape(model)
    common = {"runtimes": ["onnxruntime"], "runtime_overhead_mib": {"onnxruntime": 0.0}}
    probe = _auto_profile(tmp_path, **common, pruning={"headroom_mib": 0})

    def peak(scheme: str | None) -> float:
        return worst(estimate_all(shape, probe.with_quantize({"onnxruntime": scheme} if scheme else {}))).bound_mib  # type: ignore[dict-item]

    nearest = min(peak(s) for s in (None, "int8", "int8w"))
    assert peak("int4w") + 1 < nearest, (peak("int4w"), nearest)
    seen: dict[str, torch.Tensor | None] = {}
    real = plan.simulated

    def spy(m: nn.Module, scheme: str | None, windows: torch.Tensor | None = None, head: str | None = None):
        seen[scheme or f"head {head}"] = windows
        return real(m, scheme, windows, head)

    monkeypatch.setattr(plan, "simulated", spy)
    calib = torch.randint(0, model.config.vocab_size, (PPL_WINDOWS + 5, 16), generator=torch.Generator().manual_seed(4))
    roomy = _auto_profile(tmp_path, **common, pruning={"headroom_mib": 0}, memory_budget_mib=math.ceil(nearest) + 1)
    made: list[torch.Tensor] = []

    def held_out() -> torch.Tensor:  # the run's whole generated set: made only if GPTQ is priced
        made.append(calib[2:5].flip(0))
        return made[-1]

    choose_precision(model, calib, roomy, roomy.prune_config(), held_out=held_out)
    assert "int4w" in seen and seen["int4w"] is None  # fp32 or int8 fits as is: int4w priced to nearest
    assert not made
    tight = _auto_profile(tmp_path, **common, pruning={"headroom_mib": 0}, memory_budget_mib=math.ceil(peak("int4w")))
    fit = choose_precision(model, calib, tight, tight.prune_config())
    assert fit.quantize == {"onnxruntime": "int4w"}, fit.reason
    assert seen["int4w"] is not None and torch.equal(seen["int4w"], calib[PPL_WINDOWS:])
    choose_precision(model, calib[:PPL_WINDOWS], tight, tight.prune_config())
    assert torch.equal(seen["int4w"], calib[:PPL_WINDOWS])
    # generated text: the scored windows are the head of their own seed, the Hessians from the whole
    # set (made once, for every GPTQ-rounded component)
    choose_precision(model, calib[:PPL_WINDOWS], tight, tight.prune_config(), held_out=held_out)
    assert len(made) == 1 and torch.equal(seen["int4w"], made[0])


def test_the_choice_keeps_within_the_quality_gates(tmp_path: Path, ids: torch.Tensor) -> None:
    """Each simulation counts its top-1 agreement with the dense fp32 model: raising
    ``quantized_min_top1`` just above the loosely gated choice's estimate moves the choice to a
    precision estimated within it (the least loss among those), and every whole candidate that would
    lose less is marked as missing the gates."""
    model = tiny_model("llama", **PRUNE_WIDE)
    loose = _auto_profile(tmp_path)
    first = choose_precision(model, ids, loose, loose.prune_config())
    (was,) = [c for c in first.candidates if c.chosen]
    assert was.est_top1 and all(0.0 < v <= 1.0 for v in was.est_top1.values())
    quantized = [rt for rt in was.est_top1 if (was.precision[rt], was.head[rt], was.embedding[rt]) != ("fp32",) * 3]
    assert quantized  # fp32 does not fit this budget on either runtime
    gate = min(was.est_top1[rt] for rt in quantized) + 1e-6
    strict = _auto_profile(tmp_path, gates={**LOOSE_GATES, "quantized_min_top1": gate})
    try:
        fit = choose_precision(model, ids, strict, strict.prune_config())
    except BudgetError as err:  # nothing that fits is within the gate: said before anything is pruned
        assert "quantized_min_top1" in str(err) and "memory_budget_mib" in str(err)
        return
    (now,) = [c for c in fit.candidates if c.chosen]
    assert now.label() != was.label() and not now.gate_misses
    for rt, agree in now.est_top1.items():
        assert agree >= gate or (now.precision[rt], now.head[rt], now.embedding[rt]) == ("fp32",) * 3
    whole = [c for c in fit.candidates if c.est_ratio and not c.bound_only]
    assert all(c.gate_misses for c in whole if c.worst_ratio < now.worst_ratio)
    assert any(c.gate_misses for c in fit.candidates)


def test_agreement_on_generated_text_is_discounted_before_the_gate(tmp_path: Path, ids: torch.Tensor) -> None:
    """On the model's own generated text agreement runs high (Gemma 3 270M: 85.3% estimated, 79.4%
    measured on WikiText-2): with ``generated`` every estimate's disagreement is scaled by
    GENERATED_DISAGREEMENT, so a gate the file-calibrated choice passes no longer passes as estimated
    there: the choice moves to one within it, or the fit stops naming the discount and CALIB."""
    model = tiny_model("llama", **PRUNE_WIDE)
    loose = _auto_profile(tmp_path)
    plain = choose_precision(model, ids, loose, loose.prune_config())
    (was,) = [c for c in plain.candidates if c.chosen]
    quantized = [rt for rt in was.est_top1 if (was.precision[rt], was.head[rt], was.embedding[rt]) != ("fp32",) * 3]
    assert quantized and plain.disagreement_scale == 1.0
    gate = min(was.est_top1[rt] for rt in quantized)  # the plain choice passes it exactly
    strict = _auto_profile(tmp_path, gates={**LOOSE_GATES, "quantized_min_top1": gate})
    try:
        fit = choose_precision(model, ids, strict, strict.prune_config(), generated=True)
    except BudgetError as err:
        assert f"disagreement scaled x{GENERATED_DISAGREEMENT:.2f}" in str(err) and "CALIB=" in str(err)
        return
    assert fit.disagreement_scale == GENERATED_DISAGREEMENT
    (now,) = [c for c in fit.candidates if c.chosen]
    assert now.label() != was.label()
    same = next(c for c in fit.candidates if c.label() == was.label())  # the plain choice, discounted
    for rt in quantized:
        if same.est_top1 and not same.bound_only:
            assert same.est_top1[rt] == pytest.approx(1 - GENERATED_DISAGREEMENT * (1 - was.est_top1[rt]))


@pytest.mark.parametrize("runtimes", [["onnxruntime"], ["executorch", "onnxruntime"]])
def test_a_budget_whose_fitting_precisions_all_miss_the_gates_stops_with_the_smallest_that_passes(
    tmp_path: Path, ids: torch.Tensor, runtimes: list[str]
) -> None:
    """onnxruntime at a budget only int4 blocks fit, with a 99% agreement gate they miss on this model:
    the error names the gate, the runtime that misses it with its best estimate that fits (also when
    ExecuTorch beside it has precisions within the gate: then it names the run that exports ExecuTorch
    alone, which does choose within the gate), and the smallest budget at which a precision is
    estimated to pass; at that budget the fit chooses one within the gate."""
    import re

    model = tiny_model("llama", **PRUNE_WIDE)
    shape = model_shape(model)
    overhead = dict.fromkeys(runtimes, 0.0)
    common = {"runtimes": runtimes, "runtime_overhead_mib": overhead, "pruning": {"headroom_mib": 0}}
    probe = _auto_profile(tmp_path, **common)

    def peak(scheme: str | None) -> float:  # onnxruntime's
        every = estimate_all(shape, probe.with_quantize({"onnxruntime": scheme} if scheme else {}))  # type: ignore[dict-item]
        return next(e.bound_mib for e in every if e.runtime == "onnxruntime")

    gates = {**LOOSE_GATES, "quantized_min_top1": 0.99}
    budget = math.ceil(peak("int4w"))
    assert budget < min(peak(s) for s in (None, "int8", "int8w"))  # int4 blocks alone fit unpruned
    tight = _auto_profile(tmp_path, **common, memory_budget_mib=budget, gates=gates)
    with pytest.raises(BudgetError) as err:
        choose_precision(model, ids, tight, tight.prune_config())
    text = str(err.value)
    assert "quantized_min_top1 99%" in text  # the best that fits has int4 blocks, pruned a little or not
    assert re.search(r"onnxruntime: the best that fits \((unpruned|with ~\d+% of MLP channels pruned)\), int4w", text)
    smallest = int(re.search(r"memory_budget_mib (\d+)", text).group(1))  # type: ignore[union-attr]
    fp32 = worst(estimate_all(shape, probe)).bound_mib
    assert budget < smallest <= math.ceil(fp32)  # fp32 (gated on parity) passes at its own size
    assert f"memory_budget_mib {smallest}, {smallest - budget} MiB more" in text
    if "executorch" in runtimes:
        assert "RUNTIMES=executorch (or --runtimes executorch: executorch " in text
        alone = tight.model_copy(update={"runtimes": ["executorch"]})
        fit = choose_precision(model, ids, alone, alone.prune_config())
        (chosen,) = [c for c in fit.candidates if c.chosen]
        assert not chosen.gate_misses and chosen.est_top1["executorch"] >= 0.99
    else:  # the one runtime misses: leaving runtimes out is no lever
        assert "RUNTIMES=" not in text and "Raise memory_budget_mib or lower the profile's gates:." in text
    enough = _auto_profile(tmp_path, **common, memory_budget_mib=smallest, gates=gates)
    fit = choose_precision(model, ids, enough, enough.prune_config())
    (chosen,) = [c for c in fit.candidates if c.chosen]
    assert not chosen.gate_misses and chosen.prune_share == 0


def test_pruning_past_the_pruned_models_gate_is_no_way_to_fit(tmp_path: Path, ids: torch.Tensor, monkeypatch) -> None:
    """Below what int4 blocks need unpruned, every candidate prunes; with the proxy pricing that above
    ``max_ppl_ratio`` (the pruned model's own gate), the fit stops and names it, with the budget at
    which the least compressed precision within the gates fits unpruned."""
    import re

    import pipeline.fit.plan as plan

    class Proxy(PruningProxy):
        def perplexity(self, share: float) -> float:
            return super().perplexity(0.0) * (1 + 2 * share)

    monkeypatch.setattr(plan, "PruningProxy", Proxy)
    model = tiny_model("llama", **PRUNE_WIDE)
    shape = model_shape(model)
    gates = {**LOOSE_GATES, "max_ppl_ratio": 1.01}
    common = {"runtimes": ["onnxruntime"], "runtime_overhead_mib": {"onnxruntime": 0.0}, "gates": gates}
    probe = _auto_profile(tmp_path, **common, pruning={"headroom_mib": 0})
    int4w = worst(estimate_all(shape, probe.with_quantize({"onnxruntime": "int4w"}))).bound_mib
    tight = _auto_profile(tmp_path, **common, pruning={"headroom_mib": 0}, memory_budget_mib=math.floor(int4w) - 1)
    with pytest.raises(BudgetError) as err:
        choose_precision(model, ids, tight, tight.prune_config())
    text = str(err.value)
    assert "gate max_ppl_ratio 1.01x" in text and "MLP channels would go" in text
    smallest = int(re.search(r"memory_budget_mib (\d+)", text).group(1))  # type: ignore[union-attr]
    assert smallest >= math.floor(int4w)  # unpruned: the smallest scheme's own size at least
