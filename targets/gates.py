"""Gates: thresholds that turn measurements into pass/fail, as pure functions of a measurement and
the profile (no runtime, no model: ``prunefit emulate`` and ``targets.device`` use them without
loading torch). ``targets/validate.py`` measures, then calls these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.runtimes import Runtime
from targets.profile import DeviceProfile


@dataclass
class Gate:
    """One check. ``threshold`` is None for a gate that could not be checked (its run was killed):
    there is no number it was held to."""

    name: str
    passed: bool
    value: float
    threshold: float | None
    detail: str


def fp32_gates(profile: DeviceProfile, runtime: str, cmp: dict[str, Any], new_tokens: int) -> list[Gate]:
    """An fp32 artifact computes what PyTorch computes: logits within atol, the same greedy text."""
    atol = profile.gates.parity_atol
    diff, agree = cmp["max_abs_logit_diff"], cmp["argmax_agreement"]
    first = cmp["first_token_mismatch"]
    return [
        Gate(
            f"parity[{runtime}]",
            diff <= atol and agree == 1.0,
            diff,
            atol,
            f"max |logit diff| {diff:.2e} over the prompt and {new_tokens} decode steps (limit {atol:.0e}), "
            f"prompt argmax agreement {agree:.1%} (need 100%)",
        ),
        Gate(
            f"generation[{runtime}]",
            cmp["tokens_equal"],
            float(new_tokens if first is None else first),
            float(new_tokens),
            f"{new_tokens} greedy tokens with the artifact's KV cache "
            + ("equal PyTorch generate token by token" if first is None else f"differ from PyTorch at token {first}"),
        ),
    ]


def quantized_gates(
    profile: DeviceProfile, runtime: str, scheme: str, cmp: dict[str, Any], perplexity: dict[str, float]
) -> list[Gate]:
    """A quantized artifact is held to its quality: top-1 agreement with the fp32 model over the
    prompt and the evaluation text (when one ran), and its own perplexity over the pruned fp32
    model's."""
    g = profile.gates
    agree, positions = cmp.get("top1_agreement", cmp["argmax_agreement"]), cmp.get("top1_positions", 0)
    where = (
        f"over {positions} positions (prompt {cmp['argmax_agreement']:.1%}, evaluation text "
        f"{cmp['eval_top1_agreement']:.1%})"
        if cmp.get("eval_top1_agreement") is not None
        else "over the prompt"
    )
    first = cmp["first_token_mismatch"]
    same = "all greedy tokens equal" if first is None else f"greedy tokens equal up to token {first}"
    gates = [
        Gate(
            f"agreement[{runtime}]",
            g.agreement_passes(agree),
            agree,
            g.quantized_min_top1,
            f"{scheme}: top-1 agreement with the fp32 pruned model {where} {agree:.1%} "
            f"(need {g.quantized_min_top1:.0%}); {same}; max |logit diff| {cmp['max_abs_logit_diff']:.2f}",
        )
    ]
    exported, pruned = perplexity.get(f"exported[{runtime}]"), perplexity.get("pruned")
    if exported is not None and pruned:
        ratio = exported / pruned
        gates.append(
            Gate(
                f"quality[{runtime}]",
                g.quantized_ratio_passes(ratio),
                ratio,
                g.quantized_max_ppl_ratio,
                f"{scheme}: perplexity {exported:.2f} vs fp32 pruned {pruned:.2f} = {ratio:.3f}x "
                f"(limit {g.quantized_max_ppl_ratio:.2f}x)",
            )
        )
    return gates


def session_gate(profile: DeviceProfile, cmp: dict[str, Any] | None, why_not: str | None = None) -> Gate:
    """A GenAI folder's graph run the second way (issue 18): in a plain onnxruntime session, against
    what the Generator produced from the same graph. The same kernels on the same inputs: the logits
    within the parity tolerance, the same greedy tokens. ``why_not``: the graph cannot run that way
    (a sliding-window cache only the Generator manages), which the gate says instead of passing."""
    name = "session[onnxruntime]"
    if cmp is None:
        return Gate(name, True, 0.0, None, f"not run: {why_not}")
    atol = profile.gates.parity_atol
    diff = cmp["max_abs_logit_diff"]
    return Gate(
        name,
        diff <= atol and cmp["tokens_equal"],
        diff,
        atol,
        f"the GenAI graph in an onnxruntime session vs onnxruntime-genai's Generator: max |logit diff| "
        f"{diff:.2e} (limit {atol:.0e}), greedy tokens {'equal' if cmp['tokens_equal'] else 'differ'}",
    )


def memory_gate(runtime: str, peak_at_context_mib: float, library_mib: float, budget_mib: float, how: str) -> Gate:
    """The run's peak at the profile's full context (``how``: measured by filling it, or
    extrapolated from a partial fill), plus the device's runtime library, against the budget."""
    total = peak_at_context_mib + library_mib
    return Gate(
        f"memory[{runtime}]",
        total <= budget_mib,
        total,
        budget_mib,
        f"peak at full context {peak_at_context_mib:.1f} MiB ({how}) + runtime library {library_mib:.1f} = "
        f"{total:.1f} MiB vs budget {budget_mib:.0f} MiB "
        f"({'under' if total <= budget_mib else 'over'} by {abs(budget_mib - total):.1f} MiB)",
    )


def killed_gates(profile: DeviceProfile, runtime: Runtime, detail: str, needed_mib: float) -> list[Gate]:
    """A run the kernel killed at its limit: the memory gate fails with what it needed (at least the
    limit it hit), and the output gates are reported as not checked, with no threshold."""
    gates = [Gate(f"memory[{runtime}]", False, needed_mib, float(profile.memory_budget_mib), detail)]
    for name in ("agreement",) if profile.quantized(runtime) else ("parity", "generation"):
        gates.append(Gate(f"{name}[{runtime}]", False, float("nan"), None, "not checked: killed at the budget"))
    return gates


def perplexity_gate(profile: DeviceProfile, perplexity: dict[str, float]) -> Gate | None:
    """Pruned over dense perplexity, where the profile sets a limit and both were measured."""
    max_ratio = profile.gates.max_ppl_ratio
    if max_ratio is None or "dense" not in perplexity or "pruned" not in perplexity:
        return None
    ratio = perplexity["pruned"] / perplexity["dense"]
    return Gate(
        "quality[perplexity]",
        ratio <= max_ratio,
        ratio,
        max_ratio,
        f"pruned/dense perplexity {perplexity['pruned']:.2f}/{perplexity['dense']:.2f} = {ratio:.2f}x "
        f"(limit {max_ratio:.2f}x)",
    )


def emulated_gates(profile: DeviceProfile, runtime: str, quantized: bool, cmp: dict[str, Any]) -> list[Gate]:
    """An emulated (or device) run against the local run: same tokens and logits (fp32), or top-1 (quantized)."""
    name = f"emulated[{runtime}]"
    if quantized:
        agree, need = cmp["argmax_agreement_vs_local_run"], profile.gates.quantized_min_top1
        return [
            Gate(
                name,
                profile.gates.agreement_passes(agree),
                agree,
                need,
                f"aarch64 vs local top-1 agreement over the prompt {agree:.1%} (need {need:.0%}; integer kernels "
                "differ by ISA)",
            )
        ]
    diff, atol = cmp["max_abs_logit_diff_vs_local_run"], profile.gates.parity_atol
    same = cmp["tokens_equal_to_local_run"]
    return [
        Gate(
            name,
            bool(same) and diff <= atol,
            diff,
            atol,
            f"aarch64 vs local: tokens {'equal' if same else 'DIFFER'}, max |logit diff| {diff:.2e} (limit {atol:.0e})",
        )
    ]
