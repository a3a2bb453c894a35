"""``report.md``: the table a person reads, rendered from a run's report (``report.json``'s content).

The device-run rows are shared with ``targets/html.py``, which renders the same report as HTML.
"""

from __future__ import annotations

from typing import Any

from core.schemes import precision_text
from targets.budget import MemoryEstimate
from targets.fill import FillSummary
from targets.results import Report


def _f(x: Any, nd: int = 1) -> str:
    return f"{x:.{nd}f}" if isinstance(x, (int, float)) else str(x)


def _activations(e: dict[str, Any]) -> str:
    """A runtime's activations, with the logits it holds again (onnxruntime's memory pattern) named."""
    again = MemoryEstimate.from_dict(e).repeated_logits_mib
    return _f(e["activations_mib"]) + (f" (+{_f(again)} logits again)" if again else "")


def render_markdown(typed: Report) -> str:
    report = typed.model_dump()
    p, plan, val = report["profile"], report["prune"], report["validation"]
    lines = [
        f"# prunefit report: {p['name']}",
        "",
        f"**{p['device']}** — {p['cpu']['arch']} ({', '.join(p['cpu']['features']) or 'no extra features'}), "
        f"{p['ram_mib']} MiB RAM, budget **{p['memory_budget_mib']} MiB**, context {p['context_length']}, "
        f"prefill {p['prefill_tokens']}, batch {p['batch_size']}, {p['threads']} threads, {p['precision']}.",
        "",
        f"Model: `{report['model']}`. Overall: **{'PASS' if val['passed'] else 'FAIL'}**.",
        *_fit(report.get("fit")),
        "",
        "## Pruning",
        "",
        *_pruning_summary(plan, bool(report.get("fit"))),
    ]
    steps = list(enumerate(plan["steps"], 1))
    shown = steps if len(steps) <= 24 else steps[:12] + steps[-12:]  # width pruning takes hundreds of small steps
    for n, (i, s) in enumerate(shown):
        if n == 12 and len(steps) > 24:
            lines.append(f"| ... | {len(steps) - 24} more steps in prune_plan.json | | | |")
        lines.append(
            f"| {i} | {s['removed']} | {s['score']:.4g} | {s['estimate_mib']:.1f} | {_f(s.get('calib_ppl', '-'), 2)} |"
        )
    lines += [
        "",
        "## Memory model (predicted, MiB)",
        "",
        "Weights and overhead, plus the larger of loading (transients, and a preallocated KV cache) and the "
        "run at full context (KV cache as the runtime holds it + one prefill chunk's activations + packed "
        "weight copies kept): the phase column says which.",
        "",
        "| runtime | when | weights | overhead | load transients | KV cache (copies) | activations "
        "| packed weights kept | phase | total | budget | fits |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for when in ("before", "after"):
        for e in plan[when]["per_runtime"]:
            lines.append(
                f"| {e['runtime']} | {when} | {_f(e['weights_mib'])} | {_f(e['overhead_mib'])} | "
                f"{_f(e.get('load_transient_mib', 0.0))} | "
                f"{_f(e['kv_cache_mib'])} ({_f(e.get('kv_copies', 1.0), 2)}) | "
                f"{_activations(e)} | {_f(e.get('packed_mib', 0.0))} | {e.get('phase', '-')} | "
                f"{_f(e['total_mib'])} | "
                f"{_f(e['budget_mib'], 0)} | {'yes' if e['fits'] else 'no'} |"
            )
    lines += [
        "",
        "## Exported artifacts, measured",
        "",
        "Each artifact prefilled the prompt, then greedy-decoded with its own KV cache (parity, timing), "
        "then filled its cache to the profile's context (the prompt tiled, in prefill chunks, then decode "
        "steps), in a child process held to the model's share of the budget. The peak is the worst over "
        "all of it." + (f" Threads: {val['threads_note']}." if val.get("threads_note") else ""),
        "",
        "| runtime | file | size (MiB) | load (s) | prefill (ms) | decode (tok/s) | peak at full context (MiB) "
        "| how | predicted (MiB) | error | incl. library (MiB) | max abs logit diff | tokens equal |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in val["runtimes"]:
        m, g, fill = r["measured"], r.get("generation", {}), r.get("fill") or {}
        lines.append(
            f"| {r['runtime']} | {r['artifact']} | {_f(r['size_mib'])} | {_f(m['load_s'], 2)} | "
            f"{_f(m.get('prefill_s', m.get('forward_s', float('nan'))) * 1000)} | "
            f"{_f(m.get('decode_tokens_per_s', '-'))}{'*' if r.get('shared_host_with') else ''} | "
            f"{_f(fill.get('peak_at_context_mib', m['model_peak_mib']))} | "
            f"{FillSummary.model_validate(fill).how() if fill else 'not filled'} | "
            f"{_f(r['predicted_model_peak_mib'])} | {r['prediction_error']:+.1%} | "
            f"{_f(r['projected_peak_mib'])} | {r['max_abs_logit_diff']:.2e} | {_tokens(g)} |"
        )
    for k in val.get("killed", []):  # a run the kernel killed at its limit: a row saying so, not silence
        fill = k.get("fill") or {}
        at = f" at {fill['killed_at']} positions" if fill.get("killed_at") is not None else " before the fill"
        lines.append(
            f"| {k['runtime']} | {k['artifact']} | {_f(k['size_mib'])} | killed{at} | | | more than its "
            f"{_f(k['model_share_mib'])} share (cgroup limit {_f(k['cgroup_limit_mib'])}) | killed | "
            f"{_f(k['predicted_model_peak_mib'])} | | | | not checked |"
        )
    shared = [r for r in val["runtimes"] if r.get("shared_host_with")]
    if shared:
        lines += [""] + [
            f"\\* {r['runtime']} was measured while {r['shared_host_with']} ran on this host: its load, prefill "
            "and decode times are lower than an idle host's (its memory is its own process's, unaffected)."
            for r in shared
        ]
    lines += _at_limit(val["runtimes"])
    lines += _as_exported(report["stages"])
    lines += _device_runs(report.get("device_runs", []))
    ppl = val.get("perplexity", {})
    if ppl:
        lines += [
            "",
            "## Perplexity",
            "",
            f"Evaluated on `{report.get('eval_source', 'generated text')}`.",
            "",
            "| model | perplexity |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v:.2f} |" for k, v in ppl.items()]
    lines += ["", "## Gates", "", "| gate | result | detail |", "|---|---|---|"]
    lines += [f"| {g['name']} | {'pass' if g['passed'] else '**FAIL**'} | {g['detail']} |" for g in val["gates"]]
    lines += ["", "## Stage timings (s)", "", "| stage | wall (s) | cached |", "|---|---:|---|"]
    for k, v in report["stages"].items():
        lines.append(f"| {k} | {v['wall_s']:.1f} | {'yes' if v['cached'] else 'no'} |")
        parts = (v.get("details") or {}).get("parts") or {}
        lines += [f"| &nbsp;&nbsp;{part} | {s:.1f} | |" for part, s in parts.items()]
    lines.append("")
    return "\n".join(lines)


def _pruning_summary(plan: dict[str, Any], fitted: bool) -> list[str]:
    """What the prune stage removed, and the head of its step table; one line when nothing was."""
    if not plan["steps"]:  # the model fit (with the chosen precision)
        precision = " with the chosen precision" if fitted else ""
        return [f"Nothing pruned: the model fits the budget as it is{precision} (`{plan['method']}` not needed)."]
    return [
        f"Method `{plan['method']}`, {len(plan['steps'])} steps: removed {len(plan['removed_layers'])} of "
        f"{len(plan['removed_layers']) + len(plan['kept_layers'])} decoder blocks "
        f"{plan['removed_layers'] or ''}; parameters {plan['params_before']:,} -> {plan['params_after']:,} "
        f"({1 - plan['params_after'] / plan['params_before']:.1%} removed) in {plan['wall_s']:.1f} s"
        f"{_peak(plan)}.",
        "",
        "| step | removed | score | predicted peak (MiB) | calibration perplexity |",
        "|---:|---|---:|---:|---:|",
    ]


FRONTIER_HEADERS = [
    "candidate", "predicted dense peak, worst runtime (MiB)", "pruning needed", "calibration perplexity by runtime",
    "estimated ratio (worst runtime)", "top-1 agreement with fp32 by runtime", "chosen",
]  # fmt: skip


def _as_exported(stages: dict[str, Any]) -> list[str]:
    """Each artifact's precision as its exporter wrote it, naming any layer a scheme left in fp32."""
    lines = []
    for name, stage in stages.items():
        d = stage.get("details") or {}
        if not name.startswith("export-") or ("quantization" not in d and not d.get("format_fallback")):
            continue
        text = f"- {name.removeprefix('export-')}: linear weights {d.get('quantization', 'none')}"
        if d.get("head_quantization", d.get("quantization")) != d.get("quantization"):
            text += f", lm_head {d['head_quantization']}"
        text += f", embedding table {d.get('embedding_quantization', 'none')}"
        left = d.get("left_fp32") or []
        if left:
            shown = ", ".join(f"`{n}`" for n in left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
            text += f"; **{len(left)} Linear module(s) left in fp32** (input width not whole groups): {shown}"
        if d.get("format_fallback"):
            text += f"; **{d['format_fallback']}** (onnx_fallback)"
        lines.append(text)
    return ["", "Precision as exported (none: fp32):", "", *lines] if lines else []


def candidate_precision(c: dict[str, Any], sep: str = ", ") -> str:
    """A saved candidate's precision per runtime: the linear scheme, and the embedding's if quantized
    (reports written before embeddings were a component have no ``embedding``)."""
    emb, head = c.get("embedding") or {}, c.get("head") or {}
    return sep.join(f"{rt} {precision_text(s, emb.get(rt), head.get(rt))}" for rt, s in c["precision"].items())


def _at_limit(runtimes: list[dict[str, Any]]) -> list[str]:
    """A run that reached its cgroup limit without being killed (issue 21.6: its cgroup peak read
    exactly the limit): the kernel reclaimed to hold it there, so say so, with the resident peak
    the gate compares."""
    out = []
    for r in runtimes:
        m = r["measured"]
        hits = m.get("cgroup_limit_hits")
        if m.get("cgroup_at_limit") or hits:
            times = f", reached {hits} times" if hits else ""
            out.append(
                f"- {r['runtime']}: held at its cgroup limit ({_f(m['cgroup_limit_mib'])} MiB{times}): the kernel "
                "reclaimed page cache (the model file's pages) to keep the run under it, "
                f"so the cgroup's peak reads the limit. Not killed; its resident peak was {_f(m['model_peak_mib'])} "
                "MiB, and that is what the memory gate compares. Expect slower loads at this budget on a device."
            )
    return ["", *out] if out else []


def frontier_rows(fit: dict[str, Any], every: bool = False) -> list[list[str]]:
    """One row per candidate ``precision: auto`` priced (shared by md and html), best first: those it
    simulated whole and those on the frontier (no other is both smaller and loses less), or
    ``every`` one. A ratio that is only the components' bound (branch and bound never needed the
    whole) reads ">=" (its agreement "<="); a runtime whose estimate misses the profile's quantized
    gates is marked."""

    def key(c: dict[str, Any]) -> tuple[bool, float]:
        return (not c["reachable"], c["worst_ratio"] if c["worst_ratio"] is not None else float("inf"))

    frontier = {id(c) for c in frontier_of(fit)}
    rows = []
    for c in sorted(fit["candidates"], key=key):
        if not (every or not c.get("bound_only") or id(c) in frontier or c["chosen"]):
            continue
        prec = candidate_precision(c)
        ppl = ", ".join(f"{_f(v, 2)}" for v in c["quant_ppl"].values()) or "-"
        if c["prune_ppl"] is not None and c["prune_share"]:
            ppl += f"; pruning proxy {_f(c['prune_ppl'], 2)}"
        bound = ">= " if c.get("bound_only") else ""
        ratio = "-" if c["worst_ratio"] is None else f"{bound}{c['worst_ratio']:.3f}x"
        chosen = "**yes**" if c["chosen"] else ""
        misses = set(c.get("gate_misses") or ())
        top1 = ", ".join(
            f"{'<= ' if c.get('bound_only') else ''}{v:.1%}{' (misses the gates)' if rt in misses else ''}"
            for rt, v in (c.get("est_top1") or {}).items()
        )
        pruning = c["pruning"] + (" (misses max_ppl_ratio)" if "pruning" in misses else "")
        rows.append([prec, _f(max(c["dense_mib"].values())), pruning, ppl, ratio, top1 or "-", chosen])
    return rows


def frontier_of(fit: dict[str, Any]) -> list[dict[str, Any]]:
    """The priced candidates no other beats on both predicted MiB (worst runtime) and estimated loss,
    smallest first."""
    priced = [c for c in fit["candidates"] if c["worst_ratio"] is not None]
    frontier, best = [], float("inf")
    for c in sorted(priced, key=lambda c: (max(c["dense_mib"].values()), c["worst_ratio"])):
        if c["worst_ratio"] < best:
            frontier.append(c)
            best = c["worst_ratio"]
    return frontier


def _discount(fit: dict[str, Any]) -> str:
    scale = fit.get("disagreement_scale", 1.0)
    if scale == 1.0:
        return ""
    return (
        f" Agreement estimates are on the model's generated text, where they run high: each is shown with its "
        f"disagreement scaled x{scale:.2f} (the worst measured), as the gates took it."
    )


def _fit(fit: dict[str, Any] | None) -> list[str]:
    """The precision section: what ``precision: auto`` chose, why, and the candidates it simulated
    whole or that lie on the frontier (report.json holds every one)."""
    if not fit:
        return []
    rows = frontier_rows(fit)
    left = len(fit["candidates"]) - len(rows)
    more = (
        f" {left} more candidates, bounded by their components (beaten or missing the gates), are in report.json."
        if left
        else ""
    )
    lines = [
        "",
        "## Precision (precision: auto)",
        "",
        f"Chosen: {fit['reason']}. Calibration perplexity of the dense fp32 model: {fit['base_ppl']:.2f} "
        f"({fit['windows']} calibration windows; schemes simulated in PyTorch, pruning by an uncompensated "
        f"MLP-channel proxy that over-states the method's loss; {fit['wall_s']:.0f} s).{more}{_discount(fit)}",
        "",
        "| " + " | ".join(FRONTIER_HEADERS) + " |",
        "|---|---:|---|---|---:|---|---|",
    ]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def device_run_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """One row per run merged by the device scripts or the emulated mode (shared by md and html)."""
    rows = []
    for r in runs:
        m = r["measured"]
        same = r.get("tokens_equal_to_local_run")
        gates = r.get("gates", [])
        rows.append([
            r["label"], r["runtime"], str(m.get("threads", "-")), _f(m.get("load_s", "-"), 2),
            _f(m.get("prefill_s", float("nan")) * 1000), _f(m.get("decode_tokens_per_s", "-")),
            _f(m.get("model_peak_mib", "-")), "-" if same is None else ("yes" if same else "**no**"),
            _f(r.get("max_abs_logit_diff_vs_local_run", "-"), 6),
            ", ".join(f"{g['name']} {'pass' if g['passed'] else '**FAIL**'}" for g in gates) or "-",
        ])  # fmt: skip
    return rows


DEVICE_HEADERS = [
    "device", "runtime", "threads", "load (s)", "prefill (ms)", "decode (tok/s)", "run peak RSS (MiB)",
    "tokens equal to local run", "max abs logit diff vs local", "gates",
]  # fmt: skip


def _device_runs(runs: list[dict[str, Any]]) -> list[str]:
    """Runs on real devices (scripts/validate_{ssh,android}.sh) or emulated (targets.emulate)."""
    if not runs:
        return []
    lines = [
        "",
        "## On devices",
        "",
        "| " + " | ".join(DEVICE_HEADERS) + " |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in device_run_rows(runs)]
    if any(r.get("emulated") for r in runs):
        lines += ["", "Rows marked *(emulated)* ran under qemu-user on the target ISA: their timings and memory "
                  "are the emulator's, not a device's; their tokens and logits are the target build's."]  # fmt: skip
    return lines


def _tokens(gen: dict[str, Any]) -> str:
    if not gen:  # reports written before generation was checked
        return "-"
    n = len(gen["reference_tokens"])
    return f"{n}/{n}" if gen["tokens_equal"] else f"first {gen['first_token_mismatch']}/{n}"


def _peak(plan: dict[str, Any]) -> str:
    if "peak_rss_mib" not in plan:  # reports written before the field existed
        return ""
    over = plan["peak_rss_over_start_mib"]
    return f", process peak RSS {plan['peak_rss_mib']:.0f} MiB (+{over:.0f} over the loaded model)"
