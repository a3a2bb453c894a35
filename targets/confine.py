"""Run a command inside a memory-limited cgroup and read back its peak usage.

A budget is only proven when the process is *held* to it: the kernel kills a confined process that
exceeds its limit instead of letting it borrow from the rest of the machine. cgroup v2 (a
``memory.max`` / ``memory.peak`` hierarchy) is used where the memory controller is available,
cgroup v1 (``memory.limit_in_bytes`` / ``memory.max_usage_in_bytes``) otherwise. Both count page
cache the process touches, which the kernel reclaims under pressure before it kills.

The child joins the group before it runs anything: a constant ``sh`` snippet writes its own pid
into ``cgroup.procs`` and ``exec``\\ s the command, whose arguments are passed as positional
parameters (never spliced into a shell string).
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import RuntimeMissingError

MIB = 1024 * 1024
_JOIN = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


@dataclass(frozen=True)
class Confined:
    """Outcome of one confined run."""

    returncode: int
    stdout: str
    stderr: str
    limit_mib: float
    peak_mib: float  # the group's high-water mark (includes page cache)
    oom_killed: bool
    version: int  # cgroup version used
    # the peak is the maximum of memory.current sampled during the run (cgroup v2 without memory.peak)
    peak_polled: bool = False
    # times the group's usage reached its limit and the kernel reclaimed (page cache first: the
    # mapped model file) to stay under it (v2 memory.events "max", v1 memory.failcnt; v1 often
    # reclaims without counting, so 0 there says little). None: unreadable.
    limit_hits: int | None = None

    @property
    def at_limit(self) -> bool:
        """Whether the run reached its limit (and, not killed, was held there by reclaim): its
        cgroup peak then reads the limit, which is real pressure, not a misread counter."""
        return bool(self.limit_hits) or self.peak_mib >= self.limit_mib - 1.0


def _v1_root() -> Path | None:
    base = Path("/sys/fs/cgroup/memory")
    if not (base / "memory.limit_in_bytes").exists():
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            own = base / path.lstrip("/")
            return own if own.is_dir() else base
    return base


def _v2_root() -> Path | None:
    base = Path("/sys/fs/cgroup")
    controllers = base / "cgroup.controllers"
    if not controllers.is_file() or "memory" not in controllers.read_text().split():
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            own = base / line[3:].lstrip("/")
            return own.parent if own.is_dir() else base  # a process may not sit in an inner node with children
    return base


def _new_group(prefix: str) -> tuple[Path, int]:
    """Create an empty child cgroup with the memory controller (v2 first); raise with the reason."""
    why = "no cgroup memory controller mounted"
    for version, root in ((2, _v2_root()), (1, _v1_root())):
        if root is None:
            continue
        group = root / f"{prefix}-{uuid.uuid4().hex[:12]}"
        try:
            group.mkdir()
            return group, version
        except OSError as exc:
            why = f"cannot create a cgroup under {root}: {exc.strerror}"
    raise RuntimeMissingError(f"Cannot confine a process to a memory budget here: {why}. Run as root on Linux.")


@functools.cache
def available() -> tuple[bool, str]:
    """Whether this process may create memory-limited cgroups (and why not); a property of the
    machine and the process's privileges, probed once."""
    try:
        group, version = _new_group("prunefit-probe")
    except RuntimeMissingError as exc:
        return False, str(exc)
    group.rmdir()
    return True, f"cgroup v{version} at {group.parent}"


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[tuple[Path, int]]:
    """A fresh cgroup limited to ``limit_bytes`` (removed afterwards); yields (path, version)."""
    group, version = _new_group("prunefit")
    try:
        if version == 2:
            (group / "memory.max").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):
                (group / "memory.swap.max").write_text("0")
        else:
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):  # no swap accounting: the limit is already RAM-only
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        yield group, version
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def _read_bytes(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _peak_bytes(group: Path, version: int) -> int | None:
    """The group's own high-water mark; None where the kernel keeps none (cgroup v2 before Linux
    5.19 has no ``memory.peak``): then the poller's maximum of ``memory.current`` stands in."""
    return _read_bytes(group / ("memory.peak" if version == 2 else "memory.max_usage_in_bytes"))


class CurrentPoller:
    """The maximum of ``memory.current`` seen while a run goes, sampled every ``interval_s`` in a
    thread. Sampling can miss a short spike, so it is a lower bound, used only where the kernel
    keeps no peak; reading 0 instead would make a model that fits look over budget (and one over
    budget look fine)."""

    def __init__(self, current: Path, interval_s: float = 0.005) -> None:
        import threading

        self.current, self.interval_s = current, interval_s
        self.max_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            value = _read_bytes(self.current)
            if value is not None:
                self.max_bytes = max(self.max_bytes, value)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> CurrentPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _oom(group: Path, version: int, returncode: int) -> bool:
    """Whether the kernel's OOM killer acted in the group (v2 memory.events, v1 memory.oom_control)."""
    name = "memory.events" if version == 2 else "memory.oom_control"
    try:
        fields = dict(line.split()[:2] for line in (group / name).read_text().splitlines() if line.strip())
        if "oom_kill" in fields:
            return int(fields["oom_kill"]) > 0
    except (OSError, ValueError):
        pass
    return returncode == -9


def _limit_hits(group: Path, version: int) -> int | None:
    """How often the group hit its limit (see ``Confined.limit_hits``); None where unreadable."""
    try:
        if version == 2:
            fields = dict(line.split()[:2] for line in (group / "memory.events").read_text().splitlines() if line)
            return int(fields["max"])
        return int((group / "memory.failcnt").read_text())
    except (OSError, ValueError, KeyError):
        return None


def run_confined(
    cmd: Sequence[str], limit_mib: float, env: dict[str, str] | None = None, timeout: float | None = None
) -> Confined:
    """Run ``cmd`` held to ``limit_mib`` of memory; a process over the limit is killed, not failed over."""
    limit = int(limit_mib * MIB)
    with memory_cgroup(limit) as (group, version):
        polled = _peak_bytes(group, version) is None
        poller = CurrentPoller(group / "memory.current") if polled else contextlib.nullcontext()
        with poller:
            proc = subprocess.run(
                ["sh", "-c", _JOIN, str(group), *cmd],
                capture_output=True,
                text=True,
                env={**os.environ, **(env or {})},
                timeout=timeout,
                check=False,
            )
        peak = poller.max_bytes if isinstance(poller, CurrentPoller) else _peak_bytes(group, version) or 0
        return Confined(
            returncode=proc.returncode,
            stdout=proc.stdout,
            stderr=proc.stderr,
            limit_mib=limit_mib,
            peak_mib=peak / MIB,
            oom_killed=_oom(group, version, proc.returncode),
            version=version,
            peak_polled=polled,
            limit_hits=_limit_hits(group, version),
        )
