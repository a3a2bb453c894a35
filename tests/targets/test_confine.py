"""The cgroup peak where the kernel keeps none: cgroup v2 before Linux 5.19 has no memory.peak, and
reading it as 0 made a model that fits look over budget. The poller's maximum of memory.current
stands in (checked on a fake cgroup directory: this host has cgroup v1)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from targets import confine


def test_missing_peak_reads_none_not_zero(tmp_path: Path) -> None:
    assert confine._peak_bytes(tmp_path, 2) is None
    (tmp_path / "memory.peak").write_text("12345\n")
    assert confine._peak_bytes(tmp_path, 2) == 12345
    (tmp_path / "memory.max_usage_in_bytes").write_text("777\n")
    assert confine._peak_bytes(tmp_path, 1) == 777


def test_poller_keeps_the_maximum_of_memory_current(tmp_path: Path) -> None:
    current = tmp_path / "memory.current"
    current.write_text("100\n")
    values = [300, 5000, 200, 50]

    def writer() -> None:
        for v in values:
            time.sleep(0.05)
            current.write_text(f"{v}\n")

    with confine.CurrentPoller(current, interval_s=0.002) as poller:
        t = threading.Thread(target=writer)
        t.start()
        t.join()
        time.sleep(0.05)
    assert poller.max_bytes == 5000
    current.write_text("9999999\n")  # after the run: not counted
    time.sleep(0.02)
    assert poller.max_bytes == 5000
