"""Validate exported artifacts on a device profile: run each in its real runtime in a separate
process, then turn measurements into gates (parity, memory vs budget, quality).

Every gate is evaluated and recorded before any failure is raised, so the report shows all of
them; the caller raises :class:`GateError` naming each failed gate and by how much.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from exporters.base import artifact_files, artifact_size_bytes
from pipeline.errors import GateError, RuntimeMissingError
from targets import confine
from targets.budget import MemoryEstimate, estimate, library_mib, model_shape
from targets.profile import DeviceProfile, Runtime

log = logging.getLogger(__name__)
HOST_PROBE_LIMIT_MIB = 8192.0  # generous: the probe only imports the runtime


@dataclass
class Gate:
    name: str
    passed: bool
    value: float
    threshold: float
    detail: str


@dataclass
class RuntimeReport:
    runtime: str
    artifact: str
    size_mib: float
    measured: dict[str, Any]
    predicted: dict[str, Any]
    projected_peak_mib: float
    predicted_model_peak_mib: float  # the part of the prediction the child process measures
    prediction_error: float  # measured / predicted - 1
    max_abs_logit_diff: float
    argmax_agreement: float


@dataclass
class ValidationReport:
    profile: str
    runtimes: list[RuntimeReport] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)
    perplexity: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def failures(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def raise_if_failed(self) -> None:
        failed = self.failures()
        if failed:
            lines = "\n".join(f"  - {g.name}: {g.detail}" for g in failed)
            raise GateError(f"Validation on profile '{self.profile}' failed {len(failed)} gate(s):\n{lines}")


def _runner_cmd(runtime: Runtime, artifact: Path, ids: Path, logits: Path, threads: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "targets.runner", "--runtime", runtime, "--artifact", str(artifact),
        "--inputs", str(ids), "--logits-out", str(logits), "--threads", str(threads), *extra,
    ]  # fmt: skip


def _last_json(stdout: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _check_missing(runtime: Runtime, result: dict[str, Any]) -> None:
    if result.get("error") == "runtime_missing":
        raise RuntimeMissingError(f"Runtime '{runtime}' is not installed: {result['message']}. Run `make setup`.")


def _evict_from_page_cache(artifact: Path) -> None:
    """Drop the artifact's files from the page cache, so the confined run is charged for reading
    (or mapping) its weights: pages already cached by an earlier process would be free for it."""
    for f in artifact_files(artifact):
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def run_artifact(
    runtime: Runtime,
    artifact: Path,
    inputs: np.ndarray,
    work_dir: Path,
    threads: int,
    model_limit_mib: float | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Run one artifact in a child process (``python -m targets.runner``); return (measurements, logits).

    With ``model_limit_mib`` the child runs in a memory cgroup limited to its host baseline (the
    interpreter and runtime library, measured by a probe run) plus that many MiB for the model: a
    model over budget is killed by the kernel instead of borrowing memory, and comes back as
    ``oom_killed`` with no logits. Without cgroups here, the run is unconfined (``confined: false``).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    ids_path, logits_path = work_dir / f"{runtime}_inputs.npy", work_dir / f"{runtime}_logits.npy"
    np.save(ids_path, inputs.astype(np.int64), allow_pickle=False)
    cmd = _runner_cmd(runtime, artifact, ids_path, logits_path, threads)
    confined = model_limit_mib is not None and confine.available()[0]
    if confined:
        assert model_limit_mib is not None
        # The host's own charge (interpreter + runtime library, as the cgroup counts it: pages
        # already cached by another process are not charged again) is measured by a probe run.
        # The first probe warms the page cache with the runtime's libraries, so the measured one
        # sees the cache as the real run will; a cold probe would be charged for reading them and
        # inflate the limit by their size.
        _evict_from_page_cache(artifact)
        for _ in range(2):
            probe = confine.run_confined([*cmd, "--probe"], HOST_PROBE_LIMIT_MIB)
            _check_missing(runtime, _last_json(probe.stdout))
        limit = probe.peak_mib + model_limit_mib
        run = confine.run_confined(cmd, limit)
        returncode, stdout, stderr = run.returncode, run.stdout, run.stderr
        extra = {"confined": True, "cgroup_limit_mib": limit, "cgroup_peak_mib": run.peak_mib}
        if run.oom_killed:
            return {**extra, "oom_killed": True, "model_limit_mib": model_limit_mib}, None
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        extra = {"confined": False}
    result = _last_json(stdout)
    _check_missing(runtime, result)
    if returncode != 0 or not result:
        tail = (stderr or stdout)[-3000:]
        raise GateError(f"Running {artifact} in {runtime} failed (exit {returncode}):\n{tail}")
    return {**result, **extra, "oom_killed": False}, np.load(logits_path, allow_pickle=False)


def validate(
    profile: DeviceProfile,
    model: PreTrainedModel,
    artifacts: dict[Runtime, Path],
    inputs: torch.Tensor,
    work_dir: Path,
    perplexity: dict[str, float],
    enforce: bool = True,
) -> ValidationReport:
    """Run every artifact, compare with PyTorch, and evaluate all gates.

    With ``enforce`` (the default) each run is confined to the model's share of the budget in a
    memory cgroup where this machine allows it (see :func:`run_artifact`)."""
    report = ValidationReport(profile=profile.name, perplexity=perplexity)
    with torch.no_grad():
        reference = model(inputs, use_cache=False).logits.float().numpy()
    shape = model_shape(model)
    for runtime, path in tqdm(artifacts.items(), desc="validate", unit="runtime", disable=None):
        log.info("validating %s in %s (threads=%d)", path.name, runtime, profile.threads)
        pred: MemoryEstimate = estimate(shape, profile, runtime)
        # The prefill graph holds no KV cache, so the cache a decode loop would hold at the
        # profile's context length is added from the model's shapes. The runtime library's own
        # resident size is in the measured baseline (with the Python host), so the device's figure
        # for it is added from the profile. What is left of the budget is what the model may use.
        lib = library_mib(profile, runtime)
        model_share = float(profile.memory_budget_mib) - pred.kv_cache_mib - lib
        measured, logits = run_artifact(
            runtime, path, inputs.numpy(), work_dir, profile.threads, model_share if enforce else None
        )
        if logits is None:  # killed by the kernel at the budget: gates say so; no measured row
            report.gates.append(
                Gate(
                    f"memory[{runtime}]",
                    False,
                    float(measured["cgroup_limit_mib"]),
                    float(profile.memory_budget_mib),
                    f"killed by the kernel: the model needed more than its {model_share:.1f} MiB share of the "
                    f"{profile.memory_budget_mib} MiB budget (KV cache {pred.kv_cache_mib:.1f} + runtime library "
                    f"{lib:.1f} take the rest); predicted {pred.total_mib:.1f} MiB in all. Raise "
                    "pruning.headroom_mib (prune further under the budget) or memory_budget_mib.",
                )
            )
            report.gates.append(
                Gate(f"parity[{runtime}]", False, 0.0, profile.gates.parity_atol, "not checked: killed at the budget")
            )
            continue
        diff = float(np.abs(logits - reference).max())
        agree = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        projected = measured["model_peak_mib"] + pred.kv_cache_mib + lib
        rr = RuntimeReport(
            runtime=runtime,
            artifact=path.name,
            size_mib=artifact_size_bytes(path) / 2**20,
            measured=measured,
            predicted=pred.to_dict(),
            projected_peak_mib=projected,
            predicted_model_peak_mib=pred.total_mib - pred.kv_cache_mib - lib,
            prediction_error=measured["model_peak_mib"] / (pred.total_mib - pred.kv_cache_mib - lib) - 1.0,
            max_abs_logit_diff=diff,
            argmax_agreement=agree,
        )
        report.runtimes.append(rr)
        atol = profile.gates.parity_atol
        report.gates.append(
            Gate(
                f"parity[{runtime}]",
                diff <= atol and agree == 1.0,
                diff,
                atol,
                f"max |logit diff| {diff:.2e} (limit {atol:.0e}), argmax agreement {agree:.1%} (need 100%)",
            )
        )
        budget = float(profile.memory_budget_mib)
        report.gates.append(
            Gate(
                f"memory[{runtime}]",
                projected <= budget,
                projected,
                budget,
                f"measured model peak {measured['model_peak_mib']:.1f} MiB + KV cache {pred.kv_cache_mib:.1f} + "
                f"runtime library {lib:.1f} = {projected:.1f} MiB vs budget {budget:.0f} MiB "
                f"({'under' if projected <= budget else 'over'} by {abs(budget - projected):.1f} MiB)",
            )
        )
    max_ratio = profile.gates.max_ppl_ratio
    if max_ratio is not None and "dense" in perplexity and "pruned" in perplexity:
        ratio = perplexity["pruned"] / perplexity["dense"]
        report.gates.append(
            Gate(
                "quality[perplexity]",
                ratio <= max_ratio,
                ratio,
                max_ratio,
                f"pruned/dense perplexity {perplexity['pruned']:.2f}/{perplexity['dense']:.2f} = {ratio:.2f}x "
                f"(limit {max_ratio:.2f}x)",
            )
        )
    return report
