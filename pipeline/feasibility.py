"""Can the budget be met at all? Checked from shapes alone, before any weight is read.

The most pruning a method allows gives the smallest model it can produce (its floor). If the
memory model says even that does not fit the profile, the run stops with a BudgetError that says by
how much, names the levers that *would* reach the budget (each with the MiB it saves), and the
smallest budget at which the floor fits. A lever that cannot reach it is not offered: for a method
that keeps every block (``comp``), allowing more block removal moves nothing.
"""

from __future__ import annotations

import math
from typing import Any

from core.errors import BudgetError
from core.methods import MethodConfig
from core.schemes import embedding_schemes_for, schemes_for
from pipeline.choices import most_compressed
from pipeline.methods import build_pruner
from targets.budget import MemoryEstimate, ModelShape, estimate, estimate_all, model_shape, worst
from targets.profile import DeviceProfile

MOST_BLOCK_REMOVAL = 0.9  # the lever "remove more blocks", evaluated at this max_removed_layer_ratio


def floor_shape(model: Any, cfg: MethodConfig, shape: ModelShape | None = None) -> ModelShape:
    """The smallest model ``cfg``'s method may produce from ``model`` (of ``shape``), as shapes."""
    return build_pruner(cfg).most_pruned_shape(model, shape or model_shape(model))


def floor_estimate(model: Any, shape: ModelShape, profile: DeviceProfile, cfg: MethodConfig) -> MemoryEstimate:
    """The worst runtime's prediction for the smallest model ``cfg``'s method may produce."""
    return worst(estimate_all(floor_shape(model, cfg, shape), profile))


def check_feasible(model: Any, profile: DeviceProfile, cfg: MethodConfig, shape: ModelShape | None = None) -> None:
    """BudgetError when even the most pruning ``cfg`` allows cannot fit ``profile``. ``model`` may be
    a meta-device skeleton (:func:`pipeline.model.skeleton`): only shapes are read."""
    if cfg.target_decoder_ratio is not None:
        return  # a ratio target ignores the budget
    shape = shape or model_shape(model)
    target = profile.memory_budget_mib - profile.pruning.headroom_mib
    small = floor_shape(model, cfg, shape)
    every = estimate_all(small, profile)
    floor = worst(every)
    if floor.bound_mib <= target:
        return
    over = floor.bound_mib - target
    levers = [
        f"{text} ({saved:.1f} MiB less)"
        for text, saved in _levers(model, shape, small, profile, cfg, floor)
        if saved >= over
    ]
    smallest = math.ceil(floor.bound_mib + profile.pruning.headroom_mib)
    headroom = f" less {profile.pruning.headroom_mib:g} MiB headroom" if profile.pruning.headroom_mib else ""
    reach = (
        "Levers that reach it: " + "; ".join(levers) + "."
        if levers
        else "No single change of the profile reaches it (context, prefill, quantization, block removal); "
        "pick a smaller model."
    )
    run = f"KV {floor.kv_cache_mib:.1f} + activations {floor.activations_mib:.1f}"
    if floor.repeated_logits_mib:  # onnxruntime's memory pattern: a repeated call shape holds them again
        run += f" + logits again {floor.repeated_logits_mib:.1f}"
    run += f" at {floor.positions} positions"
    phases = f"max(load {floor.load_mib:.1f}, {run})" if floor.load_transient_mib else run
    terms = f"weights {floor.weights_mib:.1f} + overhead {floor.overhead_mib:.1f} + {phases}"
    if floor.margin_mib:  # the memory model's calibrated worst under-prediction (prediction_margin)
        terms += f" + margin {floor.margin_mib:.1f}"
    if len(every) > 1:  # each runtime's own floor: which one is the obstacle, and by how much
        terms += "; floors: " + ", ".join(f"{e.runtime} {e.bound_mib:.1f} MiB" for e in every)
    raise BudgetError(
        f"Budget infeasible for profile '{profile.name}': even the most pruning {cfg.method} allows "
        f"(max_removed_layer_ratio={cfg.max_removed_layer_ratio}){_weights(profile)} needs "
        f"{floor.bound_mib:.1f} MiB on {floor.runtime} ({terms}), {over:.1f} MiB over the "
        f"{floor.budget_mib:.0f} MiB budget{headroom}. {reach} The smallest budget at which this floor fits: "
        f"memory_budget_mib: {smallest}. Nothing was pruned or exported."
    )


def _weights(profile: DeviceProfile) -> str:
    """How the floor's weights are stored, where any runtime's are quantized."""
    if not profile.quantize and not profile.quantize_embedding and not profile.quantize_head:
        return ""
    schemes = [f"{rt} {s}" for rt, s in profile.quantize.items()]
    schemes += [f"{rt} head {s}" for rt, s in profile.quantize_head.items() if s != profile.quantize.get(rt)]
    schemes += [f"{rt} embedding {s}" for rt, s in profile.quantize_embedding.items()]
    auto = "the smallest precision:auto may choose, " if profile.precision == "auto" else ""
    return f" with weights quantized ({auto}{', '.join(schemes)})"


def _levers(
    model: Any, shape: ModelShape, small: ModelShape, profile: DeviceProfile, cfg: MethodConfig, floor: MemoryEstimate
) -> list[tuple[str, float]]:
    """(change, MiB it saves on the worst runtime's floor) for each lever the profile has; ``small``
    is ``cfg``'s floor shape (priced under every change of the profile but the method's)."""
    target = profile.memory_budget_mib - profile.pruning.headroom_mib

    def bound(prof: DeviceProfile) -> float:
        return worst(estimate_all(small, prof)).bound_mib

    def floor_with(**update: Any) -> float:
        return bound(profile.model_copy(update=update))

    out: list[tuple[str, float]] = []
    # the largest context at which the floor fits (KV cache and attention scores shrink with it)
    lo, hi = profile.prefill_tokens + profile.decode_tokens, profile.context_length
    if floor_with(context_length=lo) <= target:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if floor_with(context_length=mid) <= target else (lo, mid)
        out.append((f"context_length: {lo}", floor.bound_mib - floor_with(context_length=lo)))

    # quantized weights on every runtime that runs fp32 today, each at the scheme that makes its floor
    # smallest (not the fewest bits: a quantized program's session can cost more than its weights save)
    def smallest_peak(rt: Any, options: tuple[str, ...], field: str) -> str | None:
        def priced(option: str) -> float:
            trial = profile.model_copy(update={field: {**getattr(profile, field), rt: option}})
            return estimate(small, trial, rt).bound_mib

        return min(options, key=priced) if options else None

    fp32 = [rt for rt in profile.runtimes if rt not in profile.quantize]
    smallest = {rt: smallest_peak(rt, schemes_for(rt), "quantize") for rt in fp32}
    if fp32:
        change = ", ".join(f"{rt}: {s}" for rt, s in smallest.items())
        out.append((f"quantize: {{{change}}}", floor.bound_mib - floor_with(quantize={**profile.quantize, **smallest})))
    # a quantized embedding table where the runtime has one and the profile keeps it fp32
    fp32_tables = [rt for rt in profile.runtimes if rt not in profile.quantize_embedding]
    tables = {rt: smallest_peak(rt, embedding_schemes_for(rt), "quantize_embedding") for rt in fp32_tables}
    tables = {rt: s for rt, s in tables.items() if s is not None}
    if tables:
        change = ", ".join(f"{rt}: {s}" for rt, s in tables.items())
        saved = floor.bound_mib - floor_with(quantize_embedding={**profile.quantize_embedding, **tables})
        out.append((f"quantize_embedding: {{{change}}}", saved))
    # ExecuTorch's program mapped instead of resident: its gathered embedding table stays on disk
    if "executorch" in profile.runtimes and profile.executorch_load_mode != "mmap":
        saved = floor.bound_mib - floor_with(executorch_load_mode="mmap")
        if saved > 0:
            out.append(("executorch_load_mode: mmap", saved))
    # every component at once, as precision: auto would reach (either alone may fall short where
    # together they reach: a tiny model's quantized ExecuTorch program needs its table quantized too)
    if (fp32 or tables) and profile.precision != "auto":
        auto = most_compressed(profile.model_copy(update={"precision": "auto"}), small)
        out.append(("precision: auto", floor.bound_mib - bound(auto)))
    # fewer runtimes: where one runtime's floor is the obstacle and another's fits, exporting for that
    # one alone is the change (Gemma 3 270M: ExecuTorch's packed int4 lm_head alone needs ~270 MiB while
    # loading, onnxruntime's floor is ~100 MiB lower)
    if len(profile.runtimes) > 1:
        for rt in profile.runtimes:
            alone = bound(profile.with_runtimes([rt]))
            if alone <= target:
                out.append(
                    (f"runtimes: [{rt}] (or --runtimes {rt}; its floor {alone:.1f} MiB)", floor.bound_mib - alone)
                )
    # more whole blocks removed, where the method removes blocks at all
    if cfg.removes_blocks:
        more = cfg.model_copy(update={"max_removed_layer_ratio": MOST_BLOCK_REMOVAL})
        fewer = floor_estimate(model, shape, profile, more).bound_mib
        out.append((f"pruning.max_removed_layer_ratio: {MOST_BLOCK_REMOVAL}", floor.bound_mib - fewer))
    return out
