"""How many CPUs this process may really use: its affinity mask and its cgroup's CPU quota.

``os.cpu_count()`` counts the host's CPUs, not ours: in a container limited to 2 CPUs on a 64-core
host, 64 threads would time-slice on 2 CPUs and every measured speed would be the scheduler's. The
profile's ``threads`` describes the device and is what the device scripts use; local runs (the
validation runners, emulation, PyTorch) take at most what this function gives, and the report says
when the profile's count was capped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_v2_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The tightest ``cpu.max`` quota (CPUs) on this process's cgroup v2 path, None when unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rel = next((line.split("::", 1)[1] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return None
    best: float | None = None
    d = root / rel.lstrip("/")
    while True:
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
            if quota != "max":
                cpus = int(quota) / int(period)
                best = cpus if best is None else min(best, cpus)
        except (OSError, ValueError):
            pass
        if d == root or root not in d.parents:
            break
        d = d.parent
    return best


def _cgroup_v1_quota(root: Path = CGROUP_ROOT) -> float | None:
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


@dataclass(frozen=True)
class Cpus:
    """The CPUs this process may use, and what sets that number."""

    count: int
    limited_by: str


def available_cpus() -> Cpus:
    """The CPUs this process may use: its affinity mask, lowered by a cgroup CPU quota (rounded up:
    a 1.5-CPU quota runs two threads at 75%)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    why = f"{n} CPUs in this process's affinity mask"
    quota = _cgroup_v2_quota()
    if quota is None:
        quota = _cgroup_v1_quota()
    if quota is not None and math.ceil(quota) < n:
        n, why = max(1, math.ceil(quota)), f"a cgroup CPU quota of {quota:g} CPUs"
    return Cpus(n, why)


@dataclass(frozen=True)
class LocalThreads:
    """The thread count a local run uses for a profile that asks for ``requested``."""

    requested: int
    used: int
    note: str  # empty unless capped

    @property
    def capped(self) -> bool:
        return self.used < self.requested


def local_threads(requested: int) -> LocalThreads:
    """``requested`` (the profile's ``threads``), capped at :func:`available_cpus` so a local run never
    oversubscribes the CPUs it has."""
    cpus = available_cpus()
    if requested <= cpus.count:
        return LocalThreads(requested, requested, "")
    return LocalThreads(
        requested,
        cpus.count,
        f"the profile's {requested} threads ran as {cpus.count} here ({cpus.limited_by}); the device scripts "
        f"use {requested}",
    )
