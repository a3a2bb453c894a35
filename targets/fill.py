"""The context fill: how far validation fills each artifact's KV cache, and what its trace says
about the profile's full context.

A profile claims a context length; the budget must hold there, not at the 100-odd positions a
parity run touches (issue 20: onnxruntime peaked 20% over a projection from 160 positions). The
runner fills the cache to ``context_length`` (prompt in prefill chunks, then decode steps) and
records each call's resident peak. A context longer than the profile's ``fill_max_positions`` is
filled that far and the peak at the full context extrapolated with the measured slope: a straight
line through the later prefill chunks (the KV cache and the chunk's attention scores both grow
linearly with the positions filled).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from targets.measurement import FillPoint
from targets.profile import DeviceProfile


class FillPlan(BaseModel):
    """How validation fills one profile's context."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    context: int  # the profile's context_length: the worst case it claims
    positions: int  # how far the runner fills
    mode: Literal["filled", "extrapolated"]


def fill_plan(profile: DeviceProfile) -> FillPlan:
    positions = min(profile.context_length, profile.fill_max_positions)
    mode = "filled" if positions == profile.context_length else "extrapolated"
    return FillPlan(context=profile.context_length, positions=positions, mode=mode)


class FillSummary(BaseModel):
    """What the fill measured, for the report: the peak at the full context (measured, or
    extrapolated with its line), and every point of the trace (the plot's data)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["filled", "extrapolated"]
    context: int
    positions_filled: int
    peak_at_context_mib: float  # the model's own peak at the full context (the memory gate's input)
    slope_mib_per_1k: float  # fitted on the later prefill chunks
    intercept_mib: float
    points_fitted: int
    seconds: float
    trace: list[FillPoint]
    killed_at: int | None = None  # a run the kernel killed: the positions it had filled
    # the memory model's prediction of the same peak at some positions: (positions, MiB)
    predicted: list[tuple[int, float]] = []
    library_mib: float = 0.0  # the device's runtime library, added to the peak for the budget

    def how(self) -> str:
        """How the peak at the full context was reached, in words (the memory gate, the report)."""
        if self.mode == "filled":
            return f"measured: {self.positions_filled} positions filled in {self.seconds:.0f} s"
        return (
            f"extrapolated from {self.positions_filled} of {self.context} positions filled (fill_max_positions; "
            f"{self.slope_mib_per_1k:.1f} MiB per 1k positions over {self.points_fitted} chunks)"
        )


def line(points: list[FillPoint]) -> tuple[float, float, int]:
    """(intercept, slope per position, points used): least squares of each prefill chunk's peak
    over the positions filled after it, on the later half of the chunks (the early ones sit under
    the load's peak and the runtime's first allocations). Fewer than two chunks: no slope."""
    chunks = [p for p in points if p.kind == "prefill"]
    later = chunks[len(chunks) // 2 :] if len(chunks) >= 6 else chunks
    if len(later) < 2:
        return (later[0].peak_mib if later else 0.0), 0.0, len(later)
    x = np.array([p.positions for p in later], dtype=np.float64)
    y = np.array([p.peak_mib for p in later], dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), max(float(slope), 0.0), len(later)


def summarize(
    plan: FillPlan,
    points: list[FillPoint],
    run_peak_mib: float,
    predicted: list[tuple[int, float]] | None = None,
    library_mib: float = 0.0,
    killed: bool = False,
) -> FillSummary:
    """The fill's peak at the full context: measured when the fill reached it, else the larger of
    what was measured (``run_peak_mib``: load and parity runs too) and the line at the context."""
    intercept, slope, used = line(points)
    reached = points[-1].positions if points else 0
    peak = run_peak_mib
    if reached < plan.context:
        peak = max(peak, intercept + slope * plan.context)
    return FillSummary(
        mode=plan.mode,
        context=plan.context,
        positions_filled=reached,
        peak_at_context_mib=peak,
        slope_mib_per_1k=slope * 1000,
        intercept_mib=intercept,
        points_fitted=used,
        seconds=points[-1].s if points else 0.0,
        trace=points,
        killed_at=reached if killed else None,
        predicted=predicted or [],
        library_mib=library_mib,
    )


def checkpoints(plan: FillPlan, chunk: int, count: int = 8) -> list[int]:
    """Positions to predict the peak at for the plot: ``count`` steps up to the context, from one chunk."""
    step = max(1, plan.context // count)
    return sorted({min(chunk, plan.context), *range(step, plan.context + 1, step), plan.context})


def read_trace(path: Path) -> list[FillPoint]:
    """The points a runner wrote before it ended (or was killed): a cut last line is dropped."""
    out: list[FillPoint] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for text in lines:
        try:
            out.append(FillPoint.model_validate(json.loads(text)))
        except (json.JSONDecodeError, ValueError):
            break
    return out
