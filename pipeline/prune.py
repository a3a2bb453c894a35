"""Budget-targeted structured pruning: the loop every method runs in.

The loop is method-agnostic: ask the memory model whether the model fits the profile; if not, let
the pruning method remove its least important unit (computed from calibration data) and ask again.
It therefore removes the fewest units that make the model fit, and no more. Before touching the
model it checks that the most pruning the method allows can fit at all, so an impossible budget
fails fast with how far off it is. Methods live in ``pipeline/methods/`` (one module each) and are
chosen by their typed config (``core/methods.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from core.errors import BudgetError
from core.measure import current_rss_bytes, peak_rss_bytes, reset_peak
from core.methods import MethodConfig
from core.perplexity import perplexity
from core.record import LayerWidths, PruneRecord
from pipeline.feasibility import check_feasible
from pipeline.methods import build_pruner, check_streams
from pipeline.methods.base import PPL_WINDOWS, PruneContext
from pipeline.methods.units import layer_widths
from targets.budget import ModelShape, estimate_all, model_shape, worst
from targets.profile import DeviceProfile

if TYPE_CHECKING:
    from pipeline.stream import LayerStream

log = logging.getLogger(__name__)


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
    record: PruneRecord | None = None  # None: nothing was removed (the model fit as it was)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["record"] = self.record.model_dump() if self.record is not None else None
        return out


def _estimates(shape: ModelShape, profile: DeviceProfile) -> dict[str, Any]:
    ests = estimate_all(shape, profile)
    return {
        "params": shape.total_params,
        "worst_mib": round(worst(ests).bound_mib, 2),
        "per_runtime": [e.to_dict() for e in ests],
    }


def _needs_more(s: ModelShape, dense: ModelShape, profile: DeviceProfile, cfg: MethodConfig) -> bool:
    """Whether ``s`` (pruned from ``dense``) must lose more: short of the method's target ratio of
    decoder parameters when it has one, else over the budget less headroom."""
    if cfg.target_decoder_ratio is not None:
        return (dense.layer_params - s.layer_params) / dense.layer_params < cfg.target_decoder_ratio
    return worst(estimate_all(s, profile)).bound_mib > profile.memory_budget_mib - profile.pruning.headroom_mib


def will_prune(model: PreTrainedModel, profile: DeviceProfile, cfg: MethodConfig) -> bool:
    """Whether :func:`prune_to_budget` would remove anything from ``model`` (its first test)."""
    shape = model_shape(model)
    return _needs_more(shape, shape, profile, cfg)


def prune_to_budget(
    model: PreTrainedModel,
    calib: torch.Tensor | Callable[[], torch.Tensor],
    profile: DeviceProfile,
    cfg: MethodConfig,
    stream: LayerStream | None = None,
) -> PrunePlan:
    """Prune ``model`` in place until the memory model says it fits ``profile``; return the plan
    (with the record of what was removed). ``stream``: the model is streamed block by block from a
    checkpoint (layer-wise methods only). ``calib`` may be a function that makes the windows: it is
    called only if something has to go (generated text is minutes of CPU, ``data.Calibration``)."""
    t0 = time.perf_counter()
    start_rss = current_rss_bytes()
    reset_peak()
    pruner = build_pruner(cfg)
    if stream is not None:
        check_streams(pruner)
    shape = model_shape(model)
    original_layers = len(shape.layers)
    before = _estimates(shape, profile)
    target_mib = profile.memory_budget_mib - profile.pruning.headroom_mib

    def needs_more(s: ModelShape) -> bool:
        return _needs_more(s, shape, profile, cfg)

    most = pruner.most_pruned_shape(model, shape)
    if cfg.target_decoder_ratio is not None and needs_more(most):
        raise BudgetError(
            f"Cannot remove {cfg.target_decoder_ratio:.0%} of decoder parameters with {cfg.method} under its limits "
            f"(at most {(shape.layer_params - most.layer_params) / shape.layer_params:.0%})."
        )
    check_feasible(model, profile, cfg, shape)
    plan = PrunePlan(method=cfg.method, budget_mib=float(profile.memory_budget_mib), before=before, after=before)
    ctx = PruneContext(fits=lambda s: not needs_more(s), kept_layers=list(range(original_layers)), stream=stream)
    windows = torch.empty(0, dtype=torch.long)
    if needs_more(shape):
        windows = calib() if callable(calib) else calib
        pruner.prepare(model, windows, ctx)
    current_shape = shape
    with tqdm(desc=f"prune ({cfg.method})", unit="step", disable=None) as bar:
        while needs_more(current_shape):
            if not pruner.can_step(model):  # pragma: no cover - guarded by the floor check
                raise BudgetError(f"Pruning limit reached before the target ({cfg.method}).")
            what, score = pruner.step(model, windows)
            current_shape = pruner.shape(model)
            current = worst(estimate_all(current_shape, profile))
            ppl = (
                perplexity(model, windows[:PPL_WINDOWS], batch_size=cfg.batch_size, desc="calibration perplexity")
                if pruner.applied  # planned steps change the model only in finalize
                else float("nan")
            )
            plan.steps.append(PruneStep(what, score, round(current.bound_mib, 2), round(ppl, 3)))
            log.log(
                logging.INFO if ppl == ppl else logging.DEBUG,
                "removed %s (score %.4f): now %.1f MiB (target %.1f), calibration perplexity %.2f",
                what, score, current.bound_mib, target_mib, ppl,
            )  # fmt: skip
            bar.update(1)
            bar.set_postfix(mib=f"{current.bound_mib:.0f}/{target_mib:.0f}", ppl=f"{ppl:.2f}")
    if plan.steps:
        pruner.finalize(model)
        plan.record = PruneRecord(
            method=cfg.method,
            profile=profile.name,
            original_num_hidden_layers=original_layers,
            kept_layers=ctx.kept_layers,
            removed_layers=ctx.removed_layers,
            layers=[LayerWidths(**w) for w in layer_widths(model)],
        )
    final = model_shape(model)
    plan.after = _estimates(final, profile)
    plan.removed_layers = list(ctx.removed_layers)
    plan.kept_layers = list(ctx.kept_layers)
    plan.params_before, plan.params_after = shape.total_params, final.total_params
    plan.wall_s = round(time.perf_counter() - t0, 2)
    peak = peak_rss_bytes()
    plan.peak_rss_mib = round(peak / 2**20, 1)
    plan.peak_rss_over_start_mib = round((peak - start_rss) / 2**20, 1)
    return plan
