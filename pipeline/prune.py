"""Budget-targeted structured pruning.

The loop is method-agnostic: ask the memory model whether the model fits the profile; if not, let
the pruning method remove its least important unit (computed from calibration data) and ask again.
It therefore removes the fewest units that make the model fit, and no more. Before touching the
model it checks that the most pruning allowed (``max_removed_layer_ratio``) can fit at all, so an
impossible budget fails fast with how far off it is.

Methods implement :class:`Pruner`; ``depth`` (block removal by Block Influence) is the first.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from core.arch import decoder_layers
from core.errors import BudgetError, ConfigError
from core.perplexity import perplexity
from pipeline.rewrite import remove_layers
from targets.budget import ModelShape, estimate_all, model_shape, worst
from targets.profile import DeviceProfile
from core.measure import current_rss_bytes, peak_rss_bytes, reset_peak

log = logging.getLogger(__name__)

Method = Literal["depth", "width", "comp", "multipruner", "depth+width"]
PPL_WINDOWS = 8  # calibration windows used to report perplexity after each step (cheap progress signal)


@dataclass(frozen=True)
class PruneConfig:
    """Knobs of the prune stage (the profile gives the budget and the default limit)."""

    method: Method = "comp"  # the best measured (benchmarks/results/pruning.md; profiles' default too)
    max_removed_layer_ratio: float = 0.5
    iterative: bool = True  # re-score after each removal (the remaining blocks' roles shift)
    batch_size: int = 8
    width_multiple: int = 8  # width pruning removes channels in groups of this size (kernel-friendly widths)
    compensate: bool = True  # width: least-squares re-fit of the output projections after slicing
    # width/comp: ridge of the re-fit, relative to the mean diagonal of the Gram matrix. width keeps
    # 1e-3. comp's applies up to 4096 calibration tokens and shrinks as sqrt(4096 / tokens) above, as the
    # sampling noise of the Gram matrices does (SmolLM2-135M, 20%, WikiText-2 test PPL: at 4096
    # tokens 46.7 with 1e-3, 45.2 with 0.05; at 32768 tokens 39.2 with 0.05, 38.9 with 0.02)
    ridge: float = 1e-3
    comp_ridge: float = 0.05
    score: Literal["energy", "wanda", "magnitude"] = "energy"  # width: unit importance (others are baselines)
    min_keep_ratio: float = 0.5  # width/multipruner: each block keeps at least this share of its MLP channels
    # comp: the same floor for comp, whose compensated costs can tell a block that tolerates deep
    # MLP cuts (SmolLM2-135M, 20%, 256 x 128 calibration tokens: 38.1 at 0.3, 38.9 at 0.5)
    comp_min_keep_ratio: float = 0.3
    # comp: whole blocks compete with channels and heads in one plan. Off by default: on
    # SmolLM2-135M at 20% it measured worse (test PPL 48.2 vs 46.7, benchmarks/results/pruning.md).
    comp_blocks: bool = False
    # comp: what the re-fit reproduces: the dense sub-layer's output, or that plus the residual
    # stream's drift from the dense model (Llama-layout blocks; 46.7 vs 51.4 at 20%).
    comp_target: Literal["sublayer", "residual"] = "residual"
    # comp: how the removal is spread: globally cheapest-first by compensated cost per parameter,
    # or the same number of MLP channels from every block (units still chosen by condition-aware
    # cost inside each block)
    comp_allocation: Literal["global", "uniform"] = "global"
    # multipruner: shares of the removed parameters taken as blocks : MLP channels : KV groups
    # (MultiPruner's example distribution), and the MLP channels one candidate removes
    multipruner_shares: tuple[float, float, float] = (0.44, 0.52, 0.04)
    multipruner_group: int = 64
    # multipruner: candidates per step given the perplexity forward, picked by how little they change
    # their own block's output (MultiPruner scores every candidate; on 2 CPU cores that is ~40 min
    # for SmolLM2-135M at 20%)
    multipruner_shortlist: int = 6
    # Instead of the profile's budget, remove this share of decoder-block parameters (benchmarks,
    # "prune 20%" requests). None: target the budget.
    target_decoder_ratio: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.max_removed_layer_ratio < 1.0:
            raise ConfigError(f"max_removed_layer_ratio must be in (0, 1), got {self.max_removed_layer_ratio}.")
        if self.method not in PRUNERS:
            raise ConfigError(f"Unknown pruning method '{self.method}'. Available: {', '.join(PRUNERS)}.")
        if len(self.multipruner_shares) != 3 or min(self.multipruner_shares) < 0 or sum(self.multipruner_shares) <= 0:
            raise ConfigError(f"multipruner_shares must be three non-negative numbers, got {self.multipruner_shares}.")
        if not (0.0 < self.min_keep_ratio <= 1.0 and 0.0 < self.comp_min_keep_ratio <= 1.0):
            raise ConfigError("min_keep_ratio and comp_min_keep_ratio must be in (0, 1].")
        if min(self.multipruner_group, self.multipruner_shortlist, self.width_multiple) < 1:
            raise ConfigError("multipruner_group, multipruner_shortlist and width_multiple must be positive.")


@dataclass
class PruneStep:
    removed: str  # human-readable unit, e.g. "block 17"
    score: float
    estimate_mib: float
    calib_ppl: float  # perplexity on (a slice of) the calibration windows after this step


@dataclass
class PrunePlan:
    """What the prune stage did, for the report and for reproducing it."""

    method: str
    budget_mib: float
    before: dict[str, Any]
    after: dict[str, Any]
    removed_layers: list[int] = field(default_factory=list)
    kept_layers: list[int] = field(default_factory=list)
    steps: list[PruneStep] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    wall_s: float = 0.0
    # process resident-set high-water mark during pruning, and how far it rose above the RSS at
    # the start of pruning (the model was already loaded then)
    peak_rss_mib: float = 0.0
    peak_rss_over_start_mib: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Pruner(Protocol):
    """A pruning method, driven by :func:`prune_to_budget` one unit at a time.

    ``step`` removes (or plans to remove) the least important unit; ``shape`` is the model's shape
    after everything stepped so far; ``finalize`` applies what was planned (and compensates).
    """

    name: str

    def prepare(self, model: PreTrainedModel, calib: torch.Tensor, cfg: PruneConfig) -> None: ...

    def most_pruned_shape(self, model: PreTrainedModel, shape: ModelShape, cfg: PruneConfig) -> ModelShape:
        """The smallest model the method may produce under ``cfg``'s limits (for the feasibility check)."""
        ...

    def can_step(self, model: PreTrainedModel, cfg: PruneConfig) -> bool: ...

    def step(self, model: PreTrainedModel, calib: torch.Tensor, cfg: PruneConfig) -> tuple[str, float]: ...

    def shape(self, model: PreTrainedModel) -> ModelShape: ...

    def finalize(self, model: PreTrainedModel) -> None: ...


@torch.no_grad()
def block_influence(model: PreTrainedModel, calib: torch.Tensor, batch_size: int) -> list[float]:
    """ShortGPT's Block Influence per decoder block: mean over tokens of 1 - cos(h_in, h_out).

    A block whose output points where its input already pointed changes the residual stream
    least, so removing it disturbs the rest of the network least. Hooks capture each block's input
    and output; only running sums are kept, never the hidden states.
    """
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    handles = []

    def hook(idx: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[idx] += float((1.0 - cos).sum())

        return fn

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        for start in tqdm(range(0, calib.shape[0], batch_size), desc="block influence", leave=False, disable=None):
            ids = calib[start : start + batch_size]
            base(input_ids=ids, use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()


class DepthPruner:
    """Remove whole decoder blocks, least Block Influence first (ShortGPT; iterative by default)."""

    name = "depth"

    def __init__(self) -> None:
        self.original_layers = 0

    def prepare(self, model: PreTrainedModel, calib: torch.Tensor, cfg: PruneConfig) -> None:
        self.original_layers = len(decoder_layers(model))

    def shape(self, model: PreTrainedModel) -> ModelShape:
        return model_shape(model)

    def finalize(self, model: PreTrainedModel) -> None:
        return None

    def most_pruned_shape(self, model: PreTrainedModel, shape: ModelShape, cfg: PruneConfig) -> ModelShape:
        n = max_removable_layers(len(shape.layers), cfg)
        biggest = sorted(range(len(shape.layers)), key=lambda i: -shape.layers[i].params)[:n]
        return shape.without_layers(set(biggest))

    def can_step(self, model: PreTrainedModel, cfg: PruneConfig) -> bool:
        removed = self.original_layers - len(decoder_layers(model))
        return removed < max_removable_layers(self.original_layers, cfg)

    def step(self, model: PreTrainedModel, calib: torch.Tensor, cfg: PruneConfig) -> tuple[str, float]:
        scores = block_influence(model, calib, cfg.batch_size)
        idx = min(range(len(scores)), key=scores.__getitem__)
        original = (getattr(model.config, "prunefit", None) or {}).get("kept_layers", list(range(len(scores))))[idx]
        remove_layers(model, [idx])
        return f"block {original}", scores[idx]


class DepthThenWidth:
    """Whole blocks while more than one is still needed, then MLP channels / KV groups (``width``)
    for the remainder: a budget is met at channel granularity instead of overshooting by up to a
    block (on SmolLM2 a block is ~18 MiB: a budget missed by 1 MiB cost a whole block with depth).

    ``fits`` is set by :func:`prune_to_budget`: whether a shape meets the target.
    """

    name = "depth+width"

    def __init__(self) -> None:
        self.depth = DepthPruner()
        self.width: Any = None
        self.fits: Any = None

    def prepare(self, model: PreTrainedModel, calib: torch.Tensor, cfg: PruneConfig) -> None:
        self.depth.prepare(model, calib, cfg)

    def most_pruned_shape(self, model: PreTrainedModel, shape: ModelShape, cfg: PruneConfig) -> ModelShape:
        return self.depth.most_pruned_shape(model, shape, cfg)  # conservative: width only trims the rest

    def can_step(self, model: PreTrainedModel, cfg: PruneConfig) -> bool:
        # until width takes over, a step is always possible: width finishes what blocks cannot
        return self.width is None or bool(self.width.can_step(model, cfg))

    def step(self, model: PreTrainedModel, calib: torch.Tensor, cfg: PruneConfig) -> tuple[str, float]:
        if self.width is None:
            scores = block_influence(model, calib, cfg.batch_size)
            idx = min(range(len(scores)), key=scores.__getitem__)
            completes = self.fits is not None and self.fits(model_shape(model).without_layers({idx}))
            if self.depth.can_step(model, cfg) and not completes:
                return self._remove_block(model, scores, idx)
            if self.depth.can_step(model, cfg) and self._block_beats_width(model, calib, cfg, idx):
                return self._remove_block(model, scores, idx)
            log.info("the next block would overshoot the budget: trimming the rest with width pruning")
            self.width = _width_pruner()
            self.width.prepare(model, calib, cfg)
        what, score = self.width.step(model, calib, cfg)
        return str(what), float(score)

    def shape(self, model: PreTrainedModel) -> ModelShape:
        return self.width.shape(model) if self.width is not None else model_shape(model)

    @staticmethod
    def _remove_block(model: PreTrainedModel, scores: list[float], idx: int) -> tuple[str, float]:
        original = (getattr(model.config, "prunefit", None) or {}).get("kept_layers", list(range(len(scores))))
        remove_layers(model, [idx])
        return f"block {original[idx]}", scores[idx]

    def _block_beats_width(self, model: PreTrainedModel, calib: torch.Tensor, cfg: PruneConfig, idx: int) -> bool:
        """The last step: one more block (overshooting) or channels for exactly the remainder?
        Both are tried on copies; the lower calibration perplexity wins. The choice is only as
        good as the calibration text: on SmolLM2 with self-generated calibration it preferred the
        channels for a 17 MiB remainder (18.3 vs 21.8) where WikiText-2 test preferred the block
        (77.6 vs 75.3); for a 1.3 MiB remainder the channels won on both (test 68.5 vs 75.3)."""
        import copy

        sub = calib[:PPL_WINDOWS]
        block = copy.deepcopy(model)
        remove_layers(block, [idx])
        ppl_block = perplexity(block, sub, batch_size=cfg.batch_size, desc="candidate: one more block")
        del block
        trimmed = copy.deepcopy(model)
        width = _width_pruner()
        width.prepare(trimmed, calib, cfg)
        while self.fits is not None and not self.fits(width.shape(trimmed)) and width.can_step(trimmed, cfg):
            width.step(trimmed, calib, cfg)
        width.finalize(trimmed)
        ppl_width = perplexity(trimmed, sub, batch_size=cfg.batch_size, desc="candidate: channels")
        del trimmed
        log.info("last step: one more block -> calibration PPL %.2f, channels -> %.2f", ppl_block, ppl_width)
        return ppl_block <= ppl_width

    def finalize(self, model: PreTrainedModel) -> None:
        if self.width is not None:
            self.width.finalize(model)


def _width_pruner() -> Pruner:
    from pipeline.width import WidthPruner

    return WidthPruner()


def _comp_pruner() -> Pruner:
    from pipeline.comp import CompPruner

    return CompPruner()


def _multipruner() -> Pruner:
    from pipeline.multipruner import MultiPruner

    return MultiPruner()


PRUNERS: dict[str, Any] = {
    "depth": DepthPruner,
    "width": _width_pruner,
    "comp": _comp_pruner,
    "multipruner": _multipruner,
    "depth+width": DepthThenWidth,
}


def max_removable_layers(num_layers: int, cfg: PruneConfig) -> int:
    return min(num_layers - 1, math.floor(cfg.max_removed_layer_ratio * num_layers))


def _estimates(shape: ModelShape, profile: DeviceProfile) -> dict[str, Any]:
    ests = estimate_all(shape, profile)
    return {
        "params": shape.total_params,
        "worst_mib": round(worst(ests).total_mib, 2),
        "per_runtime": [e.to_dict() for e in ests],
    }


def prune_to_budget(model: PreTrainedModel, calib: torch.Tensor, profile: DeviceProfile, cfg: PruneConfig) -> PrunePlan:
    """Prune ``model`` in place until the memory model says it fits ``profile``; return the plan."""
    t0 = time.perf_counter()
    start_rss = current_rss_bytes()
    reset_peak()
    pruner: Pruner = PRUNERS[cfg.method]()
    shape = model_shape(model)
    original_layers = len(shape.layers)
    before = _estimates(shape, profile)
    target_mib = profile.memory_budget_mib - profile.pruning.headroom_mib
    dense_layer_params = shape.layer_params
    ratio = cfg.target_decoder_ratio

    def needs_more(s: ModelShape) -> bool:
        if ratio is not None:
            return (dense_layer_params - s.layer_params) / dense_layer_params < ratio
        return worst(estimate_all(s, profile)).total_mib > target_mib

    most = pruner.most_pruned_shape(model, shape, cfg)
    if ratio is not None and needs_more(most):
        raise BudgetError(
            f"Cannot remove {ratio:.0%} of decoder parameters with {cfg.method} under its limits "
            f"(at most {(dense_layer_params - most.layer_params) / dense_layer_params:.0%})."
        )
    floor = worst(estimate_all(most, profile))
    if ratio is None and floor.total_mib > target_mib:
        raise BudgetError(
            f"Budget infeasible for profile '{profile.name}': even the most pruning allowed "
            f"({cfg.method}, max_removed_layer_ratio={cfg.max_removed_layer_ratio}) needs "
            f"{floor.total_mib:.1f} MiB on {floor.runtime} (weights {floor.weights_mib:.1f} + KV "
            f"{floor.kv_cache_mib:.1f} + activations {floor.activations_mib:.1f} + overhead {floor.overhead_mib:.1f}), "
            f"{floor.total_mib - target_mib:.1f} MiB over the {floor.budget_mib:.0f} MiB budget"
            f"{f' less {profile.pruning.headroom_mib:g} MiB headroom' if profile.pruning.headroom_mib else ''}. "
            "Raise memory_budget_mib, lower context_length/prefill_tokens, allow more pruning "
            "(pruning.max_removed_layer_ratio / --max-prune-ratio), or pick a smaller model."
        )
    plan = PrunePlan(method=cfg.method, budget_mib=float(profile.memory_budget_mib), before=before, after=before)
    if hasattr(pruner, "fits"):
        pruner.fits = lambda s: not needs_more(s)
    if needs_more(shape):
        pruner.prepare(model, calib, cfg)
    current_shape = shape
    with tqdm(desc=f"prune ({cfg.method})", unit="step", disable=None) as bar:
        while needs_more(current_shape):
            if not pruner.can_step(model, cfg):  # pragma: no cover - guarded by the floor check
                raise BudgetError(f"Pruning limit reached before the target ({cfg.method}).")
            what, score = pruner.step(model, calib, cfg)
            current_shape = pruner.shape(model)
            current = worst(estimate_all(current_shape, profile))
            ppl = (
                perplexity(model, calib[:PPL_WINDOWS], batch_size=cfg.batch_size, desc="calibration perplexity")
                if pruner.name == "depth" or (pruner.name == "depth+width" and getattr(pruner, "width", None) is None)
                # width steps are only planned until finalize
                else float("nan")
            )
            plan.steps.append(PruneStep(what, score, round(current.total_mib, 2), round(ppl, 3)))
            log.log(
                logging.INFO if ppl == ppl else logging.DEBUG,
                "removed %s (score %.4f): now %.1f MiB (target %.1f), calibration perplexity %.2f",
                what, score, current.total_mib, target_mib, ppl,
            )  # fmt: skip
            bar.update(1)
            bar.set_postfix(mib=f"{current.total_mib:.0f}/{target_mib:.0f}", ppl=f"{ppl:.2f}")
    if plan.steps:
        pruner.finalize(model)
    final = model_shape(model)
    meta = getattr(model.config, "prunefit", None) or {}
    plan.after = _estimates(final, profile)
    plan.removed_layers = list(meta.get("removed_layers", []))
    plan.kept_layers = list(meta.get("kept_layers", range(original_layers)))
    plan.params_before, plan.params_after = shape.total_params, final.total_params
    plan.wall_s = round(time.perf_counter() - t0, 2)
    peak = peak_rss_bytes()
    plan.peak_rss_mib = round(peak / 2**20, 1)
    plan.peak_rss_over_start_mib = round((peak - start_rss) / 2**20, 1)
    if meta:
        model.config.prunefit = {**meta, "method": cfg.method, "profile": profile.name}
    return plan
