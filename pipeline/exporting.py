"""The export stage's runtimes side by side, when the host has the CPUs and memory for it.

Why: each exporter's work (torch.export, ExecuTorch's edge lowering and XNNPACK preprocessing,
torch.onnx's translation) is single-threaded Python. On the default model ExecuTorch's export takes
~240 s and onnxruntime's ~120 s, each on one core. With two CPUs and the memory for a second copy
of the model, ExecuTorch's export (the longest) runs in a child process while the others run here,
and the stage takes about as long as its longest export.

The child loads the pruned model from ``pruned_model/`` (the same bytes the parent loaded) and
returns the artifact's description; the manifests are written here, as a serial run writes them.
A child that dies (the kernel's OOM killer, a crash in native code) costs nothing but time: its
export is redone here, serially, with a warning. Set ``PRUNEFIT_SERIAL_EXPORT=1`` to never overlap.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from transformers import PreTrainedModel

from core.cpus import available_cpus
from core.logs import configure_logging
from exporters import get_exporter
from exporters.base import ExportArtifact, ExportConfig

log = logging.getLogger(__name__)

CHILD_RUNTIME = "executorch"  # the longest export: the one moved off this process
# host memory an export may take, in fp32 copies of the model (torch.export's fake and real
# tensors, the lowered program, the serialized buffer)
EXPORT_COPIES = 6

Job = tuple[str, ExportConfig]  # (runtime, its export config)
Done = Callable[[str, ExportArtifact, float], None]  # (runtime, artifact, wall seconds)
Idle = Callable[[set[str]], None]  # called with the runtimes still exporting in the child


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def overlap_reason(jobs: list[Job], model: torch.nn.Module) -> str | None:
    """None when ``jobs`` may run side by side here; else why not (logged)."""
    if os.environ.get("PRUNEFIT_SERIAL_EXPORT"):
        return "PRUNEFIT_SERIAL_EXPORT is set"
    if len(jobs) < 2 or CHILD_RUNTIME not in {rt for rt, _ in jobs}:
        return "one export to run"
    cpus = available_cpus()
    if cpus.count < 2:
        return f"one CPU ({cpus.limited_by})"
    need = EXPORT_COPIES * sum(p.numel() * 4 for p in model.parameters())
    have = _mem_available()
    if have is not None and have < 2 * need:
        return f"{have / 2**30:.1f} GiB available, {2 * need / 2**30:.1f} GiB wanted for two exports at once"
    return None


def _child_export(
    pruned_dir: str, runtime: str, cfg: ExportConfig, out: str, level: int, log_file: str | None
) -> ExportArtifact:
    """In the child process: load the pruned model and export it (one thread: the parent has the rest),
    logging as the parent does, to its stderr and its log file."""
    from pipeline.rewrite import load_pruned

    configure_logging(level, Path(log_file) if log_file else None)
    torch.set_num_threads(1)
    return get_exporter(runtime).export(load_pruned(Path(pruned_dir)), cfg, Path(out))


def run_exports(model: PreTrainedModel, jobs: list[Job], out: Path, done: Done, idle: Idle | None = None) -> None:
    """Export ``model`` (saved in ``out/pruned_model``) for every job, calling ``done`` as each
    finishes; ExecuTorch's in a child process when :func:`overlap_reason` allows. Then, while the
    child still exports, ``idle`` does other work here (the pipeline validates what is written)."""
    why_not = overlap_reason(jobs, model)
    if why_not is not None:
        if len(jobs) > 1:
            log.info("exports run one after another: %s", why_not)
        _serial(model, jobs, out, done)
        return
    child_job = next(job for job in jobs if job[0] == CHILD_RUNTIME)
    here = [job for job in jobs if job is not child_job]
    log.info("exporting for %s in a child process while %s export here", CHILD_RUNTIME, ", ".join(rt for rt, _ in here))
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        root = logging.getLogger()
        log_file = next((h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)), None)
        future: Future[ExportArtifact] = pool.submit(
            _child_export, str(out / "pruned_model"), CHILD_RUNTIME, child_job[1], str(out),
            root.getEffectiveLevel(), log_file,
        )  # fmt: skip
        torch.set_num_threads(max(1, available_cpus().count - 1))
        _serial(model, here, out, done)
        if idle is not None:
            if future.done():  # nothing to overlap with any more: this process's threads back
                torch.set_num_threads(threads)
            idle({CHILD_RUNTIME})
        try:
            art = future.result()
        except BrokenProcessPool:
            log.warning("the %s export process died (out of memory?); exporting it here instead", CHILD_RUNTIME)
            torch.set_num_threads(threads)
            _serial(model, [child_job], out, done)
            return
        done(CHILD_RUNTIME, art, time.perf_counter() - t0)
    except BaseException:  # an export here failed (or Ctrl-C): stop the child now rather than wait for it
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        raise
    finally:
        torch.set_num_threads(threads)
        pool.shutdown(wait=True, cancel_futures=True)


def _serial(model: PreTrainedModel, jobs: list[Job], out: Path, done: Done) -> None:
    for runtime, cfg in jobs:
        t0 = time.perf_counter()
        exporter = get_exporter(runtime)
        log.info("exporting %s for %s", exporter.artifact_name(cfg), runtime)
        done(runtime, exporter.export(model, cfg, out), time.perf_counter() - t0)
