"""Resident-memory measurement of this process, from the kernel's own counters (Linux /proc).

Standard library only: ``targets.runner`` imports this before it takes its baseline, so whatever is
imported here is counted as host, not model.
"""

from __future__ import annotations

from pathlib import Path

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_rss_bytes() -> int:
    """VmHWM: this process's RSS high-water mark. Unlike ``ru_maxrss`` it is not inherited from
    the (large) parent across fork+exec, so it measures only what this runner touched."""
    return _status_kib("VmHWM") * 1024


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def host_file_rss_bytes(artifact_dir: Path) -> int:
    """Resident pages of file mappings outside ``artifact_dir`` (shared libraries, Python
    extension modules, locale data): the host's code, whatever the model is."""
    own = str(artifact_dir.resolve()) + "/"
    total, host = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(maxsplit=5)
            if head[0].endswith(":"):
                if host and head[0] == "Rss:":
                    total += int(head[1]) * 1024
            else:  # a mapping: address perms offset dev inode [path]
                path = head[5].strip() if len(head) > 5 else ""
                host = head[4] != "0" and path.startswith("/") and not path.startswith(own)
    return total


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
