"""What ``precision: auto`` may choose, per runtime and component, and the floor it may reach.

The fitting stage (``pipeline.fit.plan``) prices every one of these choices on the calibration
windows; the feasibility check (``pipeline.feasibility``) only needs the smallest peak among them,
before any weight is read. Both read the choices here, so that the check refuses exactly what
fitting could not reach (it lives outside ``pipeline.fit`` because fitting imports the check).
"""

from __future__ import annotations

from typing import Any

from core.runtimes import Runtime
from core.schemes import embedding_schemes_for, head_schemes_for, schemes_for
from targets.budget import ModelShape, estimate
from targets.profile import DeviceProfile

FP32 = "fp32"


def _choices(profile: DeviceProfile, pinned: str | None, schemes: tuple[str, ...]) -> list[str]:
    """One component's precisions: its pin, or fp32 and ``schemes`` under ``precision: auto`` (fp32
    alone otherwise)."""
    if pinned is not None:
        return [pinned]
    return [FP32, *schemes] if profile.precision == "auto" else [FP32]


def options(profile: DeviceProfile, runtime: Runtime) -> list[str]:
    """The linear-weight precisions ``runtime`` may take under ``profile``: its pinned scheme, or fp32
    and every scheme of the runtime (``precision: fp32`` without a pin: fp32 only)."""
    return _choices(profile, profile.quantize.get(runtime), schemes_for(runtime))


def embedding_options(profile: DeviceProfile, runtime: Runtime) -> list[str]:
    """The embedding-table precisions ``runtime`` may take, by the same rule."""
    return _choices(profile, profile.quantize_embedding.get(runtime), embedding_schemes_for(runtime))


def head_options(profile: DeviceProfile, runtime: Runtime, linear: str) -> list[str]:
    """The lm_head precisions ``runtime`` may take beside blocks in ``linear``: its pin; the linear
    scheme's where that is pinned (or the GenAI builder, which takes one scheme, writes it);
    else fp32 and every head scheme of the runtime. Dynamic ``int8`` is no head scheme: its head
    follows it (a tied one stays fp32), which is what ``fp32`` spells among the choices."""
    pinned = profile.quantize_head.get(runtime)
    if pinned is not None:
        return [pinned]
    genai = runtime == "onnxruntime" and profile.onnx_format == "genai"
    if profile.precision != "auto" or runtime in profile.quantize or genai:
        return [linear]
    return [FP32, *head_schemes_for(runtime)]


def runtime_options(profile: DeviceProfile, runtime: Runtime) -> list[tuple[str, str, str]]:
    """Every (linear, head, embedding) precision ``runtime`` may take under ``profile``."""
    return [
        (lin, head, emb)
        for lin in options(profile, runtime)
        for head in head_options(profile, runtime, lin)
        for emb in embedding_options(profile, runtime)
    ]


def most_compressed(profile: DeviceProfile, floor: ModelShape) -> DeviceProfile:
    """``profile`` with each runtime's free components at the precisions that make ``floor`` (the
    most pruned shape) smallest on it: the floor ``precision: auto`` may reach, for the feasibility
    check before any weight is read (pins kept; ``fp32``: unchanged).

    The fewest weight bits are not always the smallest peak: a quantized program's fixed session
    cost can outweigh what it saves on a small model (XNNPACK's 8da8w/8da4w on a tiny one), so
    every combination is priced, fp32 included."""
    if profile.precision != "auto":
        return profile
    profile = profile.model_copy(update={"prefill_tokens": profile.prefill_chunks()[-1]})
    quantize: dict[Any, str] = dict(profile.quantize)
    tables: dict[Any, str] = dict(profile.quantize_embedding)
    heads: dict[Any, str] = dict(profile.quantize_head)
    for rt in profile.runtimes:
        priced = []
        for lin, head, emb in runtime_options(profile, rt):
            q, h = _with(quantize, rt, lin), _with_head(heads, rt, lin, head)
            trial = profile.with_quantize(q, _with(tables, rt, emb), h)  # type: ignore[arg-type]
            priced.append((estimate(floor, trial, rt).bound_mib, lin, head, emb))
        _, lin, head, emb = min(priced)
        quantize, tables, heads = _with(quantize, rt, lin), _with(tables, rt, emb), _with_head(heads, rt, lin, head)
    return profile.with_quantize(quantize, tables, heads)  # type: ignore[arg-type]


def _with(chosen: dict[Any, str], runtime: Runtime, precision: str) -> dict[Any, str]:
    """``chosen`` with ``runtime`` at ``precision`` (fp32: absent, as profiles spell it)."""
    out = {rt: s for rt, s in chosen.items() if rt != runtime}
    return out if precision == FP32 else {**out, runtime: precision}


def _with_head(chosen: dict[Any, str], runtime: Runtime, linear: str, head: str) -> dict[Any, str]:
    """``chosen`` with ``runtime``'s lm_head at ``head`` beside blocks in ``linear``: absent where it
    follows them (as profiles spell it), else named, ``fp32`` included."""
    out = {rt: s for rt, s in chosen.items() if rt != runtime}
    return out if head == linear else {**out, runtime: head}
