"""``report.html``: a self-contained page (plots embedded as base64 PNG, also saved under plots/).

Plots (matplotlib, Agg backend: no display needed):
- widths by layer after pruning (MLP channels and KV heads per original block; removed blocks marked),
- the budget broken into its predicted terms per runtime (stacked bar) with the measured peak and
  the budget line,
- predicted vs measured peak per runtime.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from core.fsio import atomic_write_bytes, atomic_write_text
from targets.budget import MemoryEstimate
from targets.markdown import (
    DEVICE_HEADERS,
    FRONTIER_HEADERS,
    candidate_precision,
    device_run_rows,
    frontier_of,
    frontier_rows,
)
from targets.results import Report


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _layer_widths(out_dir: Path, plan: dict[str, Any]) -> tuple[list[int], list[int], list[int]] | None:
    """Per original block: intermediate size and KV heads after pruning (0 = removed)."""
    try:
        cfg = json.loads((out_dir / "pruned_model" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    meta = cfg.get("prunefit") or {}
    kept = plan.get("kept_layers") or list(range(cfg["num_hidden_layers"]))
    total = len(kept) + len(plan.get("removed_layers", []))
    per_layer = meta.get("layers") or [
        {"intermediate_size": cfg["intermediate_size"], "num_key_value_heads": cfg.get("num_key_value_heads", 0)}
    ] * len(kept)
    inter, kv = [0] * total, [0] * total
    for orig, w in zip(kept, per_layer, strict=False):
        inter[orig], kv[orig] = int(w["intermediate_size"]), int(w["num_key_value_heads"])
    return list(range(total)), inter, kv


def plots(out_dir: Path, report: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[str, bytes] = {}
    plan, val = report["prune"], report["validation"]
    widths = _layer_widths(out_dir, plan)
    if widths:
        idx, inter, kv = widths
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.bar(idx, inter, color=["#4c78a8" if w else "#e45756" for w in inter])
        for i, w in zip(idx, inter, strict=True):
            if not w:
                ax.text(i, 0, "x", ha="center", va="bottom", color="#e45756")
        ax.set_xlabel("original decoder block (x = removed)")
        ax.set_ylabel("MLP channels kept")
        ax2 = ax.twinx()
        ax2.plot(idx, kv, "o-", color="#f58518", label="KV heads")
        ax2.set_ylabel("KV heads kept")
        ax2.set_ylim(bottom=0)
        ax.set_title(f"Widths after pruning ({plan['method']})")
        images["widths"] = _png(fig)
        plt.close(fig)
    per_rt = {e["runtime"]: e for e in plan["after"]["per_runtime"]}
    measured = {r["runtime"]: r for r in val.get("runtimes", [])}
    if per_rt:
        names = list(per_rt)
        terms = [("weights_mib", "weights"), ("overhead_mib", "overhead"), ("kv_cache_mib", "KV cache"),
                 ("activations_mib", "activations"), ("repeated_logits_mib", "logits held again"),
                 ("packed_mib", "packed weights kept"),
                 ("load_extra", "load beyond the run")]  # fmt: skip
        for e in per_rt.values():  # the peak is the larger phase: loading's excess over the run's terms
            e.setdefault("packed_mib", 0.0)
            phases = MemoryEstimate.from_dict(e)
            e["repeated_logits_mib"] = phases.repeated_logits_mib
            e["load_extra"] = max(0.0, phases.load_mib - phases.run_mib)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bottom = [0.0] * len(names)
        for key, label in terms:
            vals = [float(per_rt[n][key]) for n in names]
            ax.bar(names, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        budget = float(report["profile"]["memory_budget_mib"])
        ax.axhline(budget, color="black", linestyle="--", label=f"budget {budget:.0f} MiB")
        meas = [measured[n]["projected_peak_mib"] if n in measured else None for n in names]
        ax.scatter([n for n, m in zip(names, meas, strict=True) if m is not None], [m for m in meas if m is not None],
                   color="black", marker="D", zorder=3, label="measured at full context")  # fmt: skip
        ax.set_ylabel("MiB")
        ax.set_title("Predicted memory by term vs budget")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        images["budget"] = _png(fig)
        plt.close(fig)
    if measured:
        names = list(measured)
        fig, ax = plt.subplots(figsize=(6, 3))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [measured[n]["predicted_model_peak_mib"] for n in names], 0.4, label="predicted")
        at_context = [_peak_at_context(measured[n]) for n in names]
        ax.bar([x + 0.2 for x in xs], at_context, 0.4, label="measured")
        for x, n, m in zip(xs, names, at_context, strict=True):
            ax.text(x, m, f"{measured[n]['prediction_error']:+.1%}", ha="left")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("peak at full context (MiB)")
        ax.set_title("Memory model: predicted vs measured run peak")
        ax.legend(fontsize=7)
        images["prediction"] = _png(fig)
        plt.close(fig)
    fills = {n: r["fill"] for n, r in measured.items() if r.get("fill")}
    fills |= {k["runtime"]: k["fill"] for k in val.get("killed", []) if k.get("fill")}
    if fills:
        loads = {n: r["measured"]["load_peak_mib"] - r["measured"].get("load_host_code_growth_mib", 0.0)
                 for n, r in measured.items() if "load_peak_mib" in r["measured"]}  # fmt: skip
        images["fill"] = _fill_plot(plt, fills, loads, report["profile"])
    fit = report.get("fit")
    if fit:
        images["frontier"] = _frontier_plot(plt, fit, float(report["profile"]["memory_budget_mib"]))
    return images


def _fill_plot(plt: Any, fills: dict[str, dict[str, Any]], loads: dict[str, float], profile: dict[str, Any]) -> bytes:
    """Each runtime's resident peak per call of the context fill against the positions filled, its
    load peak (at 0 positions), the memory model's prediction, the extrapolation where the fill
    stopped short, and the model's share of the budget (the budget less the device's runtime library)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    budget = float(profile["memory_budget_mib"])
    for i, (rt, fill) in enumerate(fills.items()):
        color = f"C{i}"
        pts = fill["trace"]
        killed = f" (killed at {fill['killed_at']})" if fill.get("killed_at") else ""
        ax.plot([p["positions"] for p in pts], [p["peak_mib"] for p in pts], ".", color=color, ms=3,
                label=f"{rt}: measured{killed}")  # fmt: skip
        if rt in loads:
            ax.plot([0], [loads[rt]], "x", color=color, label=f"{rt}: load peak")
        if fill.get("predicted"):
            xs, ys = zip(*fill["predicted"], strict=True)
            ax.plot(xs, ys, "--", color=color, linewidth=0.8, label=f"{rt}: predicted")
        if fill["positions_filled"] < fill["context"] and fill["points_fitted"] >= 2:
            ends = [fill["positions_filled"], fill["context"]]
            ax.plot(ends, [fill["intercept_mib"] + fill["slope_mib_per_1k"] * x / 1000 for x in ends], ":",
                    color=color, label=f"{rt}: extrapolated")  # fmt: skip
        share = budget - float(fill.get("library_mib", 0.0))
        ax.axhline(share, color=color, linestyle="-", linewidth=0.6, alpha=0.6)
    ax.axhline(budget, color="black", linestyle="--", label=f"budget {budget:.0f} MiB (thin lines: less the library)")
    ax.axvline(float(profile["context_length"]), color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("KV cache positions filled")
    ax.set_ylabel("model's resident peak (MiB)")
    ax.set_title("Memory as the context fills")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    png = _png(fig)
    plt.close(fig)
    return png


def _frontier_plot(plt: Any, fit: dict[str, Any], budget: float) -> bytes:
    """Each priced candidate: its dense prediction (worst runtime) against its estimated loss."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    priced = [c for c in fit["candidates"] if c["worst_ratio"] is not None]
    # the frontier: no other candidate is both smaller and loses less; only these (and the choice) are named
    frontier = frontier_of(fit)
    for c in priced:  # hollow: the components' bound only (branch and bound never simulated it whole)
        x, y = max(c["dense_mib"].values()), c["worst_ratio"]
        color = "#e45756" if c["chosen"] else "#4c78a8"
        face = "none" if c.get("bound_only") else color
        ax.scatter([x], [y], edgecolors=color, facecolors=face, zorder=3, s=40 if c["chosen"] else 20)
    ax.step([max(c["dense_mib"].values()) for c in frontier], [c["worst_ratio"] for c in frontier], where="post",
            color="#4c78a8", linewidth=0.8, label="frontier")  # fmt: skip
    for i, c in enumerate(frontier + [c for c in priced if c["chosen"] and c not in frontier]):
        label = candidate_precision(c, "; ").replace("executorch ", "ET ").replace("onnxruntime ", "ORT ")
        ax.annotate(label, (max(c["dense_mib"].values()), c["worst_ratio"]), fontsize=5,
                    xytext=(3, 3 + 7 * (i % 2)), textcoords="offset points")  # fmt: skip
    ax.axvline(budget, color="black", linestyle="--", label=f"budget {budget:.0f} MiB")
    ax.set_xlabel("predicted peak of the dense model, worst runtime (MiB)")
    ax.set_ylabel("estimated perplexity / dense fp32")
    ax.set_title("precision: auto, the candidates (red: chosen; right of the budget: pruned to fit)")
    ax.legend(fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _peak_at_context(r: dict[str, Any]) -> float:
    """A measured runtime's peak at full context (a report without a fill: its run peak)."""
    return float((r.get("fill") or {}).get("peak_at_context_mib", r["measured"]["model_peak_mib"]))


def _runtime_row(r: dict[str, Any]) -> list[Any]:
    m = r["measured"]
    return [
        r["runtime"],
        f"{r['size_mib']:.1f}",
        f"{m['load_s']:.2f}",
        f"{m.get('prefill_s', float('nan')) * 1000:.0f}",
        f"{m.get('decode_tokens_per_s', float('nan')):.1f}" + ("*" if r.get("shared_host_with") else ""),
        f"{_peak_at_context(r):.1f}",
        f"{r['predicted_model_peak_mib']:.1f}",
        f"{r['prediction_error']:+.1%}",
        f"{r['max_abs_logit_diff']:.2e}",
        r.get("generation", {}).get("tokens_equal", "-"),
    ]


def render_html(out_dir: Path, typed: Report) -> str:
    """The page; also writes each plot to ``out_dir/plots/<name>.png``."""
    report = typed.model_dump()
    images = plots(out_dir, report)
    for name, data in images.items():
        atomic_write_bytes(out_dir / "plots" / f"{name}.png", data)
    p, val, plan = report["profile"], report["validation"], report["prune"]
    verdict = "PASS" if val["passed"] else "FAIL"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>prunefit report: {html.escape(p['name'])}</title>",
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}.pass{color:#2a7}.fail{color:#c33}</style>",
        "</head><body>",
        f"<h1>prunefit report: {html.escape(p['name'])} — <span class='{verdict.lower()}'>{verdict}</span></h1>",
        f"<p>{html.escape(p['device'])}: budget {p['memory_budget_mib']} MiB, context {p['context_length']}, "
        f"{p['threads']} threads. Model <code>{html.escape(str(report['model']))}</code>; method "
        f"<code>{html.escape(plan['method'])}</code>, parameters {plan['params_before']:,} → "
        f"{plan['params_after']:,}.</p>",
        "<h2>Gates</h2>",
        _table(
            ["gate", "result", "detail"],
            [[g["name"], "pass" if g["passed"] else "FAIL", g["detail"]] for g in val["gates"]],
        ),
    ]
    if report.get("fit"):
        parts.append("<h2>Precision (precision: auto)</h2>")
        parts.append(f"<p>Chosen: {html.escape(report['fit']['reason'])}.</p>")
        rows = [[c.replace("**", "") for c in row] for row in frontier_rows(report["fit"])]
        parts.append(_table(FRONTIER_HEADERS, rows))
    titles = {
        "widths": "What was pruned", "budget": "Budget", "prediction": "Predicted vs measured",
        "frontier": "Precision candidates", "fill": "Memory as the context fills",
    }  # fmt: skip
    for name, data in images.items():
        parts.append(f"<h2>{titles[name]}</h2><img alt='{name}' src='data:image/png;base64,"
                     f"{base64.b64encode(data).decode()}'>")  # fmt: skip
    parts.append("<h2>Runtimes, measured</h2>")
    headers = ["runtime", "size MiB", "load s", "prefill ms", "decode tok/s", "peak at full context MiB"]
    headers += ["predicted MiB", "error", "max |logit diff|", "tokens equal"]
    parts.append(_table(headers, [_runtime_row(r) for r in val.get("runtimes", [])]))
    if val.get("perplexity"):
        parts.append("<h2>Perplexity</h2>")
        parts.append(_table(["model", "perplexity"], [[k, f"{v:.2f}"] for k, v in val["perplexity"].items()]))
    runs = report.get("device_runs", [])
    if runs:
        parts.append("<h2>On devices</h2>")
        parts.append(_table(DEVICE_HEADERS, [[c.replace("**", "") for c in row] for row in device_run_rows(runs)]))
        if any(r.get("emulated") for r in runs):
            parts.append("<p>Rows marked (emulated) ran under qemu-user on the target ISA: timings and memory are "
                         "the emulator's, not a device's.</p>")  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(out_dir: Path, report: Report) -> Path:
    return atomic_write_text(out_dir / "report.html", render_html(out_dir, report))
