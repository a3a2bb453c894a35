"""``precision: auto``: choose each runtime's weight precision and the pruning together, for the
least calibration loss that fits the budget.

Quantization and pruning both free memory, at very different prices: on SmolLM2-135M int8 weights
cost ~1-2% perplexity for a 2-3x smaller model, where pruning the fp32 model into the same android
budget cost 31%. So the fitting stage prices every candidate before it prunes anything:

1. **Candidates**: each runtime's options are, per component, fp32 and the schemes its exporter
   implements (``core.schemes``): the blocks' linear weights, the lm_head (``head_schemes_for``) and
   the embedding table; a component pinned by the profile's ``quantize:`` / ``quantize_head:`` /
   ``quantize_embedding:`` has only that one (a pinned linear scheme pins the head with it unless
   ``quantize_head:`` says otherwise). One candidate per combination (the pruned model is shared by
   every runtime, its precision is not).
2. **Memory**: the memory model predicts each candidate on the dense shape. One that fits needs no
   pruning; one that does not needs the smallest uniform MLP-channel share that makes it fit
   (``proxy.smallest_share``), and must be reachable by the pruning method at all (its floor).
3. **Loss, measured** on the calibration windows: each component's scheme alone (the blocks, the
   head, the table) simulated in PyTorch (``simulate.py``), and the pruning a candidate needs by the
   uncompensated proxy (``proxy.py``). A runtime's estimated perplexity ratio is its precision's
   times the pruning's (losses compound).
4. **Choice, branch and bound**: a precision scores no better than each of its components alone
   (a ratio below 1 counts as 1: the sample's noise, so fp32 stays where it fits and a scheme
   measured as "better" does not displace it), so the components' worst is a lower bound on every
   candidate. Candidates are visited by that bound, and each one visited is simulated whole (its
   components together); once the next bound is above the best candidate measured, none left can
   beat it, and the rest keep their bound (the report marks them). The best: the least worst-runtime
   loss, ties to the smaller total loss, then to the least compression. Pruning then runs only for
   what the chosen precision cannot reach. (SmolLM2-135M's two runtimes have ~300 combinations and
   ~11 component simulations; a handful of whole ones settles the choice.)
5. **The profile's quality gates, estimated**: each simulation also counts its top-1 agreement with
   the dense fp32 model on the scored positions, the measure validation gates a quantized artifact on
   (``gates.quantized_min_top1``, with ``quantized_max_ppl_ratio`` on the perplexity). A runtime's
   precision whose estimate misses a gate is not chosen: its components alone bound it (agreement
   no higher than its least agreeing component's), so most are ruled out unsimulated. The least loss
   within the gates wins; when every precision that fits misses them, the run stops before pruning or
   exporting anything (:func:`_gate_error`): the gates' misses, and the smallest budget at which a
   precision is estimated to pass. Validation still measures the artifact (the estimate is on the
   calibration windows; Gemma 3 270M's onnxruntime int4w + int4w-b128 head: 73.8% estimated on
   WikiText-2, 72.4% measured in onnxruntime over the prompt and evaluation text). On the model's own
   generated text the estimates run high, so there each estimate's disagreement is scaled by the
   measured worst case first (``GENERATED_DISAGREEMENT``). A runtime whose precision the profile pins
   whole is warned about, not stopped: the user chose it.

Every candidate, its predicted MiB and its estimated loss (or bound) go to the report: the frontier.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from core.errors import BudgetError
from core.methods import MethodConfig
from core.perplexity import scored
from core.schemes import precision_text, rounds_by_gptq
from exporters.rounding import GPTQ_WINDOWS
from pipeline.choices import FP32, most_compressed, runtime_options
from pipeline.feasibility import floor_estimate
from pipeline.fit.proxy import PruningProxy, smallest_share
from pipeline.fit.simulate import simulated, simulated_embedding
from pipeline.memo import Memo, windows_digest
from pipeline.methods.base import PPL_WINDOWS
from targets.budget import ModelShape, estimate_all, model_shape, worst
from targets.profile import DeviceProfile

log = logging.getLogger(__name__)

PRUNING = "pruning"  # Candidate.gate_misses' entry for the pruning's own gate (beside runtimes')

# The model's own text is easier for it than a person's (Gemma 3 270M: calibration perplexity 7.4 on its
# generated windows, 61.7 on WikiText-2), and a quantized model's top-1 flips less where the fp32 one is
# sure, so agreement estimated on generated windows runs high. Measured on Gemma 3 270M at android-go,
# the fit on the default generated text and the artifact on WikiText-2 test: ExecuTorch 8da8w + 8da4w
# head + int8 table estimated 85.3%, measured 79.4% (disagreement 14.7% -> 20.6%: x1.40); onnxruntime
# int4w + int4w-b128 head 78.2% vs 72.4% (x1.27). With generated calibration the fit scales each
# estimate's disagreement by the larger before the gate, as the memory model adds its worst miss
# (a calibration file is the user's own text, taken as estimated).
GENERATED_DISAGREEMENT = 1.40


@dataclass
class Candidate:
    """One precision combination and what it would cost."""

    precision: dict[str, str]  # runtime -> fp32 or a scheme (linear weights and lm_head)
    embedding: dict[str, str]  # runtime -> fp32 or an embedding scheme
    dense_mib: dict[str, float]  # predicted peak of the dense model, per runtime
    reachable: bool  # the pruning method's floor fits with this precision
    prune_share: float | None  # MLP-channel share the proxy needs (0: fits as is; None: beyond the proxy)
    quant_ppl: dict[str, float]  # calibration perplexity of each runtime's precision (both components), dense
    prune_ppl: float | None  # the proxy's calibration perplexity at prune_share
    est_ratio: dict[str, float] = field(default_factory=dict)  # per runtime, vs dense fp32
    chosen: bool = False
    prefill_tokens: int | None = None  # the prefill chunk it exports with (None: the profile's)
    head: dict[str, str] = field(default_factory=dict)  # runtime -> the lm_head's fp32 or scheme
    # est_ratio is the components' bound, never simulated whole (branch and bound left it: it cannot win)
    bound_only: bool = False
    # per runtime, estimated top-1 agreement with the dense fp32 model (the components' bound where
    # bound_only), and what misses the profile's gates by estimate: runtimes (their quantized gates),
    # and "pruning" (its proxy's loss above max_ppl_ratio)
    est_top1: dict[str, float] = field(default_factory=dict)
    gate_misses: list[str] = field(default_factory=list)
    bound_mib: float = math.inf  # predicted dense peak with the model's margin, worst runtime

    @property
    def worst_ratio(self) -> float:
        return max(self.est_ratio.values()) if self.est_ratio else math.inf

    @property
    def quantize(self) -> dict[str, str]:
        return {rt: s for rt, s in self.precision.items() if s != FP32}

    @property
    def quantize_embedding(self) -> dict[str, str]:
        return {rt: s for rt, s in self.embedding.items() if s != FP32}

    @property
    def quantize_head(self) -> dict[str, str]:
        """The lm_head schemes that differ from their runtime's blocks (``quantize_head:``'s spelling)."""
        return {rt: h for rt, h in self.head.items() if h != self.precision.get(rt)}

    def runtime_precision(self, runtime: str) -> str:
        """``runtime``'s precision in words: its linear scheme, its lm_head's where it differs, and
        its embedding's where quantized."""
        return precision_text(self.precision[runtime], self.embedding.get(runtime), self.quantize_head.get(runtime))

    @property
    def pruning(self) -> str:
        """The pruning this candidate needs, in words (the report's column and :meth:`label`)."""
        if not self.reachable:
            return "out of the method's reach"
        if self.prune_share is None:
            return "more than the proxy reaches"
        return "none" if self.prune_share == 0 else f"~{self.prune_share:.0%} of MLP channels"

    def label(self) -> str:
        prec = ", ".join(f"{rt} {self.runtime_precision(rt)}" for rt in self.precision)
        chunk = f", prefill chunk {self.prefill_tokens}" if self.prefill_tokens is not None else ""
        return f"{prec}{chunk}, {'no pruning' if self.prune_share == 0 else 'pruning ' + self.pruning}"


@dataclass
class FitPlan:
    """What ``precision: auto`` chose, among which candidates, and why."""

    base_ppl: float  # calibration perplexity of the dense fp32 model (the ratios' denominator)
    windows: int
    candidates: list[Candidate]
    quantize: dict[str, str]  # the chosen schemes (runtimes absent: fp32)
    reason: str
    wall_s: float = 0.0
    quantize_embedding: dict[str, str] = field(default_factory=dict)  # the chosen embedding schemes
    prefill_tokens: int | None = None  # the chosen prefill chunk where shorter than the profile's
    quantize_head: dict[str, str] = field(default_factory=dict)  # the chosen lm_head schemes, where apart
    simulations: int = 0  # whole precisions simulated (components alone included)
    disagreement_scale: float = 1.0  # how the agreement estimates were discounted (GENERATED_DISAGREEMENT)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for c, d in zip(self.candidates, out["candidates"], strict=True):
            d["worst_ratio"] = c.worst_ratio if math.isfinite(c.worst_ratio) else None
            d["label"], d["pruning"] = c.label(), c.pruning
        return out


def _rank(c: Candidate) -> tuple[float, float, int, float]:
    """Least worst-runtime loss, then least total loss, then the least compression (fits, no further):
    the fewest components quantized, then the most MiB. (Components first: on a tiny model an XNNPACK
    quantized program's session cost makes it larger than fp32, so MiB alone would pick it.)"""
    quantized = sum(p != FP32 for p in (*c.precision.values(), *c.head.values(), *c.embedding.values()))
    total = sum(c.est_ratio.values()) if c.est_ratio else math.inf
    return (c.worst_ratio, total, quantized, -sum(c.dense_mib.values()))


@torch.no_grad()
def choose_precision(
    model: Any,
    calib: torch.Tensor,
    profile: DeviceProfile,
    cfg: MethodConfig,
    memo: Memo | None = None,
    held_out: Callable[[], torch.Tensor] | None = None,
    generated: bool = False,
) -> FitPlan:
    """Price every candidate of ``profile`` on ``model`` (dense, fp32) and choose one (module
    docstring). The model is left as it was. ``memo``: where the dense model's simulated perplexities
    are remembered across targets (they do not depend on the profile). A GPTQ-rounded scheme, where it
    is priced as such (no candidate rounded to nearest fits unpruned), takes its Hessians from windows
    held out from its score (up to ``GPTQ_WINDOWS``): ``held_out()`` where given (the run's whole
    generated set, made only then: text of its own seed, not the scored windows), else the windows of
    ``calib`` after the scored ones; with neither, the scored ones, which flatters it (Gemma 3 270M
    int4w: 1.09x in-sample, 1.16x held out). ``generated``: ``calib`` is the model's own text, whose
    agreement estimates are discounted (``GENERATED_DISAGREEMENT``)."""
    t0 = time.perf_counter()
    windows = calib[:PPL_WINDOWS]

    @functools.cache
    def hessian_windows() -> torch.Tensor:
        held = held_out()[:GPTQ_WINDOWS] if held_out is not None else calib[PPL_WINDOWS : PPL_WINDOWS + GPTQ_WINDOWS]
        if not held.shape[0]:
            log.warning("GPTQ priced on the %d windows it is scored on (no others): a flattered loss", len(windows))
        return held if held.shape[0] else windows

    shape = model_shape(model)
    target = profile.memory_budget_mib - profile.pruning.headroom_mib

    def remembered(what: str, measure: Callable[[], float]) -> float:
        return memo.value(what, windows, measure, batch_size=cfg.batch_size) if memo else measure()

    fp32_top1: list[torch.Tensor] = []  # the fp32 pass's top-1 tokens, where this call made that pass

    def dense() -> float:
        ppl, top1 = scored(model, windows, batch_size=cfg.batch_size, desc="calibration perplexity (fp32)")
        fp32_top1.append(top1)
        return ppl

    base = remembered("calibration perplexity (fp32)", dense)
    Key = tuple[str, str, str, str]  # (runtime, linear, head, embedding)
    quant_ppl: dict[Key, float] = {}
    quant_top1: dict[Key, float] = {}
    proxy = PruningProxy(model, windows, cfg.batch_size)
    per_runtime = [[(rt, *opt) for opt in runtime_options(profile, rt)] for rt in profile.runtimes]

    combos = list(itertools.product(*per_runtime))
    priced = []
    for combo in combos:  # the memory side first: it decides whether GPTQ needs pricing at all
        precision: dict[str, str] = {rt: s for rt, s, _, _ in combo}
        heads: dict[str, str] = {rt: h for rt, _, h, _ in combo}
        embedding: dict[str, str] = {rt: e for rt, _, _, e in combo}
        prof = profile.with_quantize(
            {rt: s for rt, s in precision.items() if s != FP32},  # type: ignore[misc]
            {rt: e for rt, e in embedding.items() if e != FP32},  # type: ignore[misc]
            {rt: h for rt, h in heads.items() if h != precision[rt]},  # type: ignore[misc]
        )
        cand = _price(model, shape, prof, cfg, target, precision, embedding, profile.prefill_chunks())
        cand.head = heads
        priced.append((combo, cand))
    # GPTQ is priced (minutes on a 135M model) only where it can matter: when no candidate rounded to
    # nearest fits without pruning. Otherwise int4 is priced rounded to nearest, an upper bound on its
    # loss (GPTQ only lowers it), and the export still rounds by GPTQ.
    gptq = not any(
        c.prune_share == 0 and not any(rounds_by_gptq(s) for s in (*c.precision.values(), *c.head.values()))
        for _, c in priced
    )

    @functools.cache
    def reference_top1() -> torch.Tensor:
        """The dense fp32 model's top-1 tokens on the scored windows (agreement's reference): from the
        fp32 perplexity's pass, or one pass of their own where that perplexity was remembered."""
        return fp32_top1[0] if fp32_top1 else scored(model, windows, cfg.batch_size, desc="calibration top-1 (fp32)")[1]

    def measure(key: Key) -> None:
        """Calibration perplexity and top-1 agreement of one runtime's (linear, head, embedding)
        precision, simulated (both from one pass, each remembered on its own)."""
        if key in quant_ppl:
            return
        rt, lin, head, emb = key
        if lin == head == emb == FP32:
            quant_ppl[key], quant_top1[key] = base, 1.0
            return
        what = f"simulated {rt} {lin} + {head} head + {emb} embedding"
        hessians = hessian_windows() if gptq and (rounds_by_gptq(lin) or rounds_by_gptq(head)) else None
        if hessians is not None:  # the rounding depends on the Hessians' windows too
            what += f" (GPTQ on {windows_digest(hessians)[:16]})"
        both = functools.cache(functools.partial(_simulated, model, windows, cfg, key, base, hessians, reference_top1))
        quant_ppl[key] = remembered(what, lambda: both()[0])
        quant_top1[key] = remembered(f"{what}: top-1 agreement", lambda: both()[1])

    def measured(key: Key) -> float:
        measure(key)
        return quant_ppl[key]

    scale = GENERATED_DISAGREEMENT if generated else 1.0

    def agreement(key: Key) -> float:
        """The estimate the gate is held to: the simulation's, its disagreement scaled on generated text."""
        measure(key)
        return max(0.0, 1.0 - scale * (1.0 - quant_top1[key]))

    def components(rt: str, lin: str, head: str, emb: str) -> list[Key]:
        return [(rt, lin, FP32, FP32), (rt, FP32, head, FP32), (rt, FP32, FP32, emb)]

    gates = profile.gates

    def within(key: Key, ppl: float, top1: float) -> bool:
        """Whether one runtime's precision, estimated at ``ppl`` and ``top1``, passes the quantized
        gates (an all-fp32 one is gated on parity instead: always within)."""
        if key[1:] == (FP32, FP32, FP32):
            return True
        return gates.agreement_passes(top1) and gates.quantized_ratio_passes(_loss(ppl, base))

    def agreement_bound(key: Key) -> float:
        """A precision agrees no better than each of its components alone."""
        return min(agreement(k) for k in components(*key))

    def bound_within(key: Key) -> bool:
        """The gates on the components' bound: a precision agrees no better, and scores no better,
        than each of its components alone."""
        return within(key, max(measured(k) for k in components(*key)), agreement_bound(key))

    @functools.cache
    def whole_within(key: Key) -> bool:
        return bound_within(key) and within(key, measured(key), agreement(key))

    prune_ppl: dict[float, float] = {}
    ranked_by_bound = []
    for combo, cand in priced:
        if cand.reachable and cand.prune_share is not None:
            share = cand.prune_share
            if share not in prune_ppl:
                prune_ppl[share] = proxy.perplexity(share) if share else base
            cand.prune_ppl = prune_ppl[share]
            prune = _loss(cand.prune_ppl, base)
            # a precision scores at least what each of its components scores alone: the bound
            cand.quant_ppl = {key[0]: max(measured(k) for k in components(*key)) for key in combo}
            cand.est_top1 = {key[0]: agreement_bound(key) for key in combo}
            cand.est_ratio = {rt: _loss(q, base) * prune for rt, q in cand.quant_ppl.items()}
            cand.bound_only = True
            cand.gate_misses = [
                key[0] for key in combo if not within(key, cand.quant_ppl[key[0]], cand.est_top1[key[0]])
            ]
            # the pruned model's own gate (pruned vs dense perplexity), on the proxy's estimate
            if gates.max_ppl_ratio is not None and prune > gates.max_ppl_ratio:
                cand.gate_misses.append(PRUNING)
            ranked_by_bound.append((combo, cand))
    ranked_by_bound.sort(key=lambda pair: _rank(pair[1]))
    best: Candidate | None = None
    for combo, cand in ranked_by_bound:  # branch and bound (module docstring)
        if best is not None and cand.worst_ratio > best.worst_ratio:
            break
        if cand.gate_misses:  # its components alone already miss a gate: it cannot pass whole
            continue
        known: list[str] = [key[0] for key in combo if key in quant_ppl and not whole_within(key)]
        if known:  # a runtime's precision already simulated whole and missing a gate: the others need not be
            cand.gate_misses = known
            continue
        cand.quant_ppl = {key[0]: max(measured(key), cand.quant_ppl[key[0]]) for key in combo}
        cand.est_top1 = {key[0]: min(agreement(key), cand.est_top1[key[0]]) for key in combo}
        prune = _loss(cand.prune_ppl, base)  # type: ignore[arg-type]
        cand.est_ratio = {rt: _loss(q, base) * prune for rt, q in cand.quant_ppl.items()}
        cand.bound_only = False
        cand.gate_misses = [key[0] for key in combo if not whole_within(key)]
        if not cand.gate_misses and (best is None or _rank(cand) < _rank(best)):
            best = cand
    candidates = [cand for _, cand in priced]
    ranked = sorted((c for c in candidates if c.reachable), key=lambda c: (c.bound_only, *_rank(c)))
    if best is None and ranked_by_bound:  # every precision that fits misses a gate
        pinned = {rt for rt in profile.runtimes if len(runtime_options(profile, rt)) == 1}
        missed = {rt for _, c in ranked_by_bound for rt in c.gate_misses}
        if missed - pinned:
            raise _gate_error(
                profile, base, ranked_by_bound, priced, whole_within, measured, agreement, agreement_bound, scale
            )
        best = ranked_by_bound[0][1]  # the user pinned these precisions: warned, not stopped
        log.warning(
            "precision: %s is estimated to miss the profile's quality gates on %s (pinned by the profile: "
            "kept; validation measures it)", best.label(), ", ".join(sorted(missed)),
        )  # fmt: skip
    if best is None:
        if not ranked:  # pragma: no cover - the run checks the most compressed floor before loading
            from pipeline.feasibility import check_feasible, floor_shape

            check_feasible(model, most_compressed(profile, floor_shape(model, cfg, shape)), cfg, shape)
        best = ranked[0]
    best.chosen = True
    reason = _reason(best, [c for c in ranked if c is not best and not c.gate_misses])
    log.info("precision: %s", reason)
    wall = round(time.perf_counter() - t0, 2)
    return FitPlan(
        base, int(windows.shape[0]), candidates, best.quantize, reason, wall, best.quantize_embedding,
        best.prefill_tokens, best.quantize_head, sum(1 for k in quant_ppl if k[1:] != (FP32, FP32, FP32)), scale,
    )  # fmt: skip


def _gate_error(
    profile: DeviceProfile,
    base: float,
    fitting: list[tuple[tuple[Any, ...], Candidate]],
    priced: list[tuple[tuple[Any, ...], Candidate]],
    whole_within: Callable[[Any], bool],
    measured: Callable[[Any], float],
    agreement: Callable[[Any], float],
    agreement_bound: Callable[[Any], float],
    scale: float = 1.0,
) -> BudgetError:
    """The error for a budget every fitting precision of which misses the quality gates: per runtime
    that misses, its best estimate within the budget; and the smallest budget at which a precision
    (the cheapest by predicted MiB whose estimate passes) would, searched up the candidates' dense
    predictions."""
    g = profile.gates
    lines = []
    alone = []  # runtimes with a precision that fits and passes the gates: a run of theirs alone would
    acceptable = [(combo, c) for combo, c in fitting if PRUNING not in c.gate_misses]
    for rt in profile.runtimes:  # a runtime none of whose precisions that fit passes (simulated whole)
        keys = {key for combo, _ in acceptable for key in combo if key[0] == rt}
        passes = next((k for k in sorted(keys) if whole_within(k)), None)
        if passes is not None:
            alone.append(f"{rt} {precision_text(passes[1], passes[3], passes[2]) or 'fp32'} at {agreement(passes):.1%}")
        if not keys or passes is not None:
            continue
        # the best by its components' bound (known), simulated whole alone: not every precision that fits
        key = max(sorted(keys), key=agreement_bound)
        share = min(c.prune_share or 0.0 for combo, c in acceptable if key in combo)
        how = f"with ~{share:.0%} of MLP channels pruned" if share else "unpruned"
        lines.append(
            f"{rt}: the best that fits ({how}), {precision_text(key[1], key[3], key[2])}, is estimated at "
            f"{agreement(key):.1%} top-1 agreement with fp32 (gate quantized_min_top1 {g.quantized_min_top1:.0%}) "
            f"and {_loss(measured(key), base):.3f}x calibration perplexity (gate quantized_max_ppl_ratio "
            f"{g.quantized_max_ppl_ratio:.2f}x)"
        )
    over = [c for combo, c in fitting if PRUNING in c.gate_misses and all(whole_within(k) for k in combo)]
    if over:  # precisions within the quantized gates that fit only pruned past the pruned model's gate
        least = min(over, key=lambda c: c.prune_share or 0.0)
        within = ", ".join(f"{rt} {least.runtime_precision(rt)}" for rt in least.precision)
        lines.append(
            f"with a precision within the quantized gates ({within}), "
            f"{least.pruning} would go, estimated at {_loss(least.prune_ppl or base, base):.2f}x calibration "
            f"perplexity by the pruning proxy (gate max_ppl_ratio {g.max_ppl_ratio:.2f}x)"
        )
    passing = (
        (combo, c) for combo, c in sorted(priced, key=lambda pair: pair[1].bound_mib) if all(map(whole_within, combo))
    )
    combo, needed = next(passing, ((), None))
    headroom = profile.pruning.headroom_mib
    if needed is not None:
        estimates = ", ".join(f"{k[0]} {needed.runtime_precision(k[0])} ({agreement(k):.1%} estimated)" for k in combo)
        chunk = f", prefill chunk {needed.prefill_tokens}" if needed.prefill_tokens is not None else ""
        need = math.ceil(needed.bound_mib + headroom)
        smallest = (
            f"The smallest budget at which a precision is estimated to pass them unpruned: memory_budget_mib "
            f"{need}, {need - profile.memory_budget_mib:g} MiB more ({estimates}{chunk})."
        )
    else:
        smallest = "No precision of these runtimes is estimated to pass them at any budget."
    if alone and lines:  # some runtimes pass on their own: name the run that exports them
        names = ",".join(a.split()[0] for a in alone)
        levers = (
            f"Raise memory_budget_mib, lower the profile's gates:, or export only the runtimes estimated to pass "
            f"within the budget: RUNTIMES={names} (or --runtimes {names}: {', '.join(alone)} estimated)."
        )
    else:  # no runtime passes on its own: leaving one out (RUNTIMES=) would not help, so it is not offered
        levers = "Raise memory_budget_mib or lower the profile's gates:."
    where = f"{profile.name}'s calibration windows"
    if scale != 1.0:  # generated text: the estimates were discounted; text like the app's is a lever
        where = f"the model's generated calibration text, each disagreement scaled x{scale:.2f}"
        levers += " Calibrating on text like the app's (CALIB=file) estimates without that discount."
    return BudgetError(
        f"No precision that fits {profile.name}'s {profile.memory_budget_mib:g} MiB is estimated to pass its "
        f"quality gates (precision: auto, estimated on {where}): " + "; ".join(lines) + f". {smallest} {levers}"
    )


def _simulated(
    model: Any,
    windows: torch.Tensor,
    cfg: MethodConfig,
    key: tuple[str, str, str, str],
    base: float,
    hessian_windows: torch.Tensor | None,
    reference_top1: Callable[[], torch.Tensor],
) -> tuple[float, float]:
    """Calibration perplexity of ``model`` computing as one runtime's precision would, and its top-1
    agreement with ``reference_top1()`` (the fp32 model's): ``key`` is (runtime, linear scheme, lm_head
    scheme, embedding scheme), not all fp32 (that is ``base``, which the caller takes without
    simulating)."""
    runtime, linear, head, table = key
    reference = reference_top1()  # before the weights are swapped
    with contextlib.ExitStack() as stack:
        n = 0
        if linear != FP32 or head != FP32:
            n = stack.enter_context(simulated(model, None if linear == FP32 else linear, hessian_windows, head))
        if table != FP32:
            stack.enter_context(simulated_embedding(model, table, runtime))
        what = precision_text(None if linear == FP32 else linear, table, head if head != linear else None) or "fp32"
        ppl, top1 = scored(model, windows, batch_size=cfg.batch_size, desc=f"simulated {what}")
    agree = float((top1 == reference).float().mean())
    log.info(
        "%s simulated (%d Linear modules): calibration perplexity %.3f (fp32 %.3f), top-1 agreement %.1f%%",
        what, n, ppl, base, 100 * agree,
    )  # fmt: skip
    return ppl, agree


def _loss(ppl: float, base: float) -> float:
    """``ppl`` over ``base``, never below 1: rounding or removing weights cannot make the fp32 model
    better, so a lower measured perplexity is the calibration sample's noise (random models show it)."""
    return max(1.0, ppl / base)


def _price(
    model: Any,
    shape: ModelShape,
    prof: DeviceProfile,
    cfg: MethodConfig,
    target: float,
    precision: dict[str, str],
    embedding: dict[str, str],
    chunks: list[int],
) -> Candidate:
    """The memory side of one candidate: its dense prediction and the pruning it needs, at the
    longest prefill chunk of ``chunks`` that holds the dense model, else at the shortest (a shorter
    chunk costs no quality, pruning does)."""
    chunk = next((c for c in chunks if _fits(shape, prof, c, target)), chunks[-1])
    at = prof.model_copy(update={"prefill_tokens": chunk})
    every = estimate_all(shape, at)
    dense = {e.runtime: round(e.total_mib, 1) for e in every}

    def fits(s: ModelShape) -> bool:
        return worst(estimate_all(s, at)).bound_mib <= target

    reachable = fits(shape) or floor_estimate(model, shape, at, cfg).bound_mib <= target
    share = smallest_share(shape, fits) if reachable else None
    shorter = chunk if chunk != prof.prefill_tokens else None
    cand = Candidate(precision, embedding, dense, reachable, share, {}, None, prefill_tokens=shorter)
    cand.bound_mib = worst(every).bound_mib
    return cand


def _fits(shape: ModelShape, prof: DeviceProfile, chunk: int, target: float) -> bool:
    """Whether ``shape`` fits ``target`` on every runtime of ``prof`` prefilling ``chunk`` tokens at a time."""
    return worst(estimate_all(shape, prof.model_copy(update={"prefill_tokens": chunk}))).bound_mib <= target


def _reason(best: Candidate, rest: list[Candidate]) -> str:
    ratios = ", ".join(f"{rt} {r:.3f}x" for rt, r in best.est_ratio.items())
    why = f"{best.label()}: estimated calibration perplexity {ratios} of dense fp32, the least of {1 + len(rest)} "
    why += "candidates that fit"
    if best.prune_share is None:
        why += " (none fits by quantization and moderate pruning; the pruning method goes further)"
    if rest:
        runner_up = rest[0]
        bound = ">= " if runner_up.bound_only else ""
        worst_r = f"{bound}{runner_up.worst_ratio:.3f}x" if math.isfinite(runner_up.worst_ratio) else "unpriced"
        why += f"; next: {runner_up.label()} ({worst_r})"
    return why


def fitted_profile(profile: DeviceProfile, fit: dict[str, Any] | None) -> DeviceProfile:
    """``profile`` as the run used it: with the schemes ``precision: auto`` chose (``fit`` is
    :meth:`FitPlan.to_dict`, as saved in ``prune_plan.json``; None: nothing was chosen)."""
    if fit is None:
        return profile
    fitted = profile.with_quantize(
        {**fit["quantize"], **profile.quantize},
        {**fit.get("quantize_embedding", {}), **profile.quantize_embedding},
        {**fit.get("quantize_head", {}), **profile.quantize_head},
    )
    chunk = fit.get("prefill_tokens")
    return fitted.model_copy(update={"prefill_tokens": chunk}) if chunk else fitted
