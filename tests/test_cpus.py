"""Local runs never oversubscribe the CPUs this process may use (core/cpus.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core import cpus


def test_available_cpus_is_the_affinity_mask_without_a_quota(monkeypatch) -> None:
    monkeypatch.setattr(cpus, "_cgroup_v2_quota", lambda: None)
    monkeypatch.setattr(cpus, "_cgroup_v1_quota", lambda: None)
    got = cpus.available_cpus()
    assert got.count == len(os.sched_getaffinity(0)) and "affinity" in got.limited_by


def test_a_cgroup_quota_lowers_it(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(cpus, "_cgroup_v2_quota", lambda: 1.5)
    got = cpus.available_cpus()
    assert got.count == 2 and "1.5 CPUs" in got.limited_by  # rounded up: two threads at 75%


def test_cgroup_v2_quota_takes_the_tightest_ancestor(tmp_path: Path, monkeypatch) -> None:
    leaf = tmp_path / "a" / "b"
    leaf.mkdir(parents=True)
    (tmp_path / "a" / "cpu.max").write_text("150000 100000\n")
    (leaf / "cpu.max").write_text("max 100000\n")
    real_read = Path.read_text

    def read_text(self: Path, *a, **k) -> str:
        return "0::/a/b\n" if str(self) == "/proc/self/cgroup" else real_read(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert cpus._cgroup_v2_quota(tmp_path) == pytest.approx(1.5)
    (tmp_path / "a" / "cpu.max").write_text("max 100000\n")
    assert cpus._cgroup_v2_quota(tmp_path) is None


def test_profile_threads_are_capped_locally_and_say_so(monkeypatch) -> None:
    monkeypatch.setattr(cpus, "available_cpus", lambda: cpus.Cpus(2, "a cgroup CPU quota of 2 CPUs"))
    t = cpus.local_threads(4)
    assert t.used == 2 and t.capped and "4 threads ran as 2" in t.note and "quota" in t.note
    t = cpus.local_threads(2)
    assert t.used == 2 and not t.capped and t.note == ""
