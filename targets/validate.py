"""Validate exported artifacts on a device profile: run each in its real runtime in a separate
process (prefill, then greedy decoding with the artifact's KV cache), then turn measurements into
gates (logit parity, token-by-token generation, memory vs budget, quality).

Every gate is evaluated and recorded before any failure is raised, so the report shows all of
them; the caller raises :class:`GateError` naming each failed gate and by how much.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from core.cpus import local_threads
from core.errors import GateError
from core.runtimes import runner_backend
from exporters.base import artifact_files, artifact_size_bytes
from targets import confine
from targets.budget import MemoryEstimate, estimate, library_mib, model_shape
from targets.fill import checkpoints, fill_plan, read_trace, summarize
from targets.gates import Gate, fp32_gates, killed_gates, memory_gate, perplexity_gate, quantized_gates, session_gate
from targets.measurement import EvalResult, FillPoint, ProbeResult, RunMeasurement, read_result
from targets.profile import DeviceProfile, Runtime
from targets.results import KilledRun, RuntimeResult, ValidationResult

log = logging.getLogger(__name__)
HOST_PROBE_LIMIT_MIB = 8192.0  # generous: the probe only imports the runtime
# The cgroup charges more than the resident set the memory gate compares with the budget: page
# tables and other kernel memory of ~1 GiB of mappings, and the model file's page cache while it is
# read (reclaimable, but reclaim under a hard limit is not instant). Measured on SmolLM2's .pte: a
# run whose VmHWM was 763.1 MiB was killed at a limit 764 MiB above its host's charge. The limit gets
# this slack; the gate itself stays on the measured resident peak.
CGROUP_SLACK_MIB = 32.0


def _runner_cmd(
    runtime: str,
    artifact: Path,
    ids: Path,
    logits: Path,
    threads: int,
    new_tokens: int,
    chunk: int,
    mapped: bool = False,
) -> list[str]:
    return [
        sys.executable, "-m", "targets.runner", "--runtime", runtime, "--artifact", str(artifact),
        "--inputs", str(ids), "--logits-out", str(logits), "--threads", str(threads),
        "--new-tokens", str(new_tokens), "--chunk", str(chunk), *(["--no-mlock"] if mapped else []),
    ]  # fmt: skip


@dataclass
class Generation:
    """What a greedy generation produced: every prompt position's logits, then each step's."""

    prefill: np.ndarray  # [batch, prompt, vocab]
    steps: np.ndarray  # [batch, new_tokens, vocab]: the logits that chose each token
    tokens: np.ndarray  # [batch, new_tokens]
    eval_top1: np.ndarray | None = None  # [windows, length - 1]: top-1 at every scored position of the eval text


@torch.no_grad()
def reference_generation(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> Generation:
    """PyTorch's own answer: a cache-free forward over the prompt, then ``generate`` (greedy)."""
    prefill = model(ids, use_cache=False).logits
    lm: Any = model  # generate() is attached by GenerationMixin; its stubs are not seen here
    out = lm.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # EOS must not end the comparison early
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=model.config.pad_token_id or 0,
    )
    steps = torch.stack(list(out.logits), 1)
    return Generation(prefill.float().numpy(), steps.float().numpy(), out.sequences[:, ids.shape[1] :].numpy())


@torch.no_grad()
def reference_top1(model: PreTrainedModel, windows: np.ndarray) -> np.ndarray:
    """PyTorch's top-1 at every scored position of ``windows`` [n, length] (teacher-forced, one
    window at a time): the reference a quantized artifact's ``eval_top1`` is compared with."""
    out = [
        model(torch.from_numpy(w[None].astype(np.int64)), use_cache=False).logits[0, :-1].argmax(-1) for w in windows
    ]
    return torch.stack(out).numpy().astype(np.int32)


def top1_agreement(got: Generation, ref: Generation, ref_eval_top1: np.ndarray | None) -> tuple[float, int]:
    """Top-1 agreement with the reference over the prompt and, when both sides scored the eval
    text, over every eval position too; returns (agreement, positions counted). A 64-token prompt
    alone moves 1.6 points per token: too few positions to hold a threshold to."""
    same = int((got.prefill.argmax(-1) == ref.prefill.argmax(-1)).sum())
    count = int(np.prod(got.prefill.shape[:-1]))
    if got.eval_top1 is not None and ref_eval_top1 is not None and got.eval_top1.shape == ref_eval_top1.shape:
        same += int((got.eval_top1 == ref_eval_top1).sum())
        count += int(got.eval_top1.size)
    return same / max(count, 1), count


def compare_generation(got: Generation, ref: Generation) -> dict[str, Any]:
    """Logit parity (prompt and every step) and token-by-token agreement with the reference.

    Step logits are compared only up to the first differing token: after it, the two runs are
    conditioned on different text."""
    diverged = np.nonzero((got.tokens != ref.tokens).any(0))[0]
    first = int(diverged[0]) if diverged.size else None
    upto = got.tokens.shape[1] if first is None else first + 1
    diff = max(
        float(np.abs(got.prefill - ref.prefill).max()),
        float(np.abs(got.steps[:, :upto] - ref.steps[:, :upto]).max()),
    )
    return {
        "max_abs_logit_diff": diff,
        "argmax_agreement": float((got.prefill.argmax(-1) == ref.prefill.argmax(-1)).mean()),
        "tokens_equal": first is None,
        "first_token_mismatch": first,
        "tokens": got.tokens[0].tolist(),
        "reference_tokens": ref.tokens[0].tolist(),
    }


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
    runtime: str,
    artifact: Path,
    inputs: np.ndarray,
    work_dir: Path,
    threads: int,
    model_limit_mib: float | None = None,
    new_tokens: int = 8,
    chunk: int = 0,
    eval_windows: np.ndarray | None = None,
    fill_positions: int = 0,
    harness_mib: float = 0.0,
    mapped: bool = False,
) -> tuple[dict[str, Any], Generation | None]:
    """Run one artifact in a child process (``python -m targets.runner``): prefill ``inputs``, then
    greedy-decode ``new_tokens`` with the artifact's KV cache; return (measurements, generation).
    Prompts go in chunks of at most ``chunk`` tokens (the profile's prefill chunk). With
    ``fill_positions`` the same process then fills the cache that far (``targets.fill``); its
    trace is in the measurements, and in them too when the run is killed (``fill``: how far it got).
    With ``eval_windows`` a second, unconfined run of the artifact reports its own perplexity on
    them (scoring text is not the measured workload).

    With ``model_limit_mib`` the child runs in a memory cgroup limited to its host baseline (the
    interpreter and runtime library, measured by a probe run) plus that many MiB for the model: a
    model over budget is killed by the kernel instead of borrowing memory, and comes back as
    ``oom_killed`` with no logits. Without cgroups here, the run is unconfined (``confined: false``).
    ``harness_mib`` is added to the limit for what the runner itself holds and no device runner
    does (the parity run's logits for every prompt position, :func:`parity_logits_mib`); the measured
    model peak leaves it out, so the memory gate still compares the model's own peak. ``mapped``: the
    program is loaded mapped and unlocked (``executorch_load_mode: mmap``).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    ids_path, logits_path = work_dir / f"{runtime}_inputs.npy", work_dir / f"{runtime}_generation.npz"
    np.save(ids_path, inputs.astype(np.int64), allow_pickle=False)
    cmd = _runner_cmd(runtime, artifact, ids_path, logits_path, threads, new_tokens, chunk, mapped)
    result_path, trace_path = work_dir / f"{runtime}_result.json", work_dir / f"{runtime}_fill.jsonl"
    result_path.unlink(missing_ok=True)  # never read a previous run's result
    trace_path.unlink(missing_ok=True)
    run_cmd = [*cmd, "--result-out", str(result_path)]
    if fill_positions:
        run_cmd += ["--fill", str(fill_positions), "--trace-out", str(trace_path)]
    confined = model_limit_mib is not None and confine.available()[0]
    if confined:
        assert model_limit_mib is not None
        # The host's own charge (interpreter + runtime library, as the cgroup counts it: pages
        # already cached by another process are not charged again) is measured by a probe run.
        # The first probe warms the page cache with the runtime's libraries, so the measured one
        # sees the cache as the real run will; a cold probe would be charged for reading them and
        # inflate the limit by their size.
        _evict_from_page_cache(artifact)
        probe_path = work_dir / f"{runtime}_probe.json"
        for _ in range(2):
            probe_path.unlink(missing_ok=True)
            probe = confine.run_confined([*cmd, "--probe", "--result-out", str(probe_path)], HOST_PROBE_LIMIT_MIB)
            read_result(probe_path, ProbeResult, runtime, probe.returncode, probe.stderr or probe.stdout)
        limit = probe.peak_mib + model_limit_mib + CGROUP_SLACK_MIB + harness_mib
        run = confine.run_confined(run_cmd, limit)
        returncode, stdout, stderr = run.returncode, run.stdout, run.stderr
        extra = {"confined": True, "cgroup_limit_mib": limit, "cgroup_harness_mib": harness_mib,
                 "cgroup_peak_mib": run.peak_mib,
                 "cgroup_peak_polled": run.peak_polled, "cgroup_limit_hits": run.limit_hits,
                 "cgroup_at_limit": run.at_limit}  # fmt: skip
        if run.oom_killed:
            trace = [p.model_dump() for p in read_trace(trace_path)]
            return {**extra, "oom_killed": True, "model_limit_mib": model_limit_mib, "fill": trace}, None
    else:
        proc = subprocess.run(run_cmd, capture_output=True, text=True, check=False)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        extra = {"confined": False}
    measurement = read_result(result_path, RunMeasurement, runtime, returncode, stderr or stdout)
    if returncode != 0:
        raise GateError(f"Running {artifact} in {runtime} failed (exit {returncode}):\n{(stderr or stdout)[-3000:]}")
    result: dict[str, Any] = measurement.model_dump()
    with np.load(logits_path, allow_pickle=False) as data:
        generation = Generation(data["prefill"], data["steps"], data["tokens"])
    if eval_windows is not None:  # a second, unconfined run: scoring text is not the measured workload
        eval_path, top1_path = work_dir / f"{runtime}_eval.npy", work_dir / f"{runtime}_eval_top1.npy"
        np.save(eval_path, eval_windows.astype(np.int64), allow_pickle=False)
        eval_result = work_dir / f"{runtime}_eval.json"
        eval_result.unlink(missing_ok=True)
        proc = subprocess.run(
            [*cmd, "--eval-only", "--eval-inputs", str(eval_path), "--top1-out", str(top1_path),
             "--result-out", str(eval_result)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        scored = read_result(eval_result, EvalResult, runtime, proc.returncode, proc.stderr or proc.stdout)
        if proc.returncode != 0:
            raise GateError(
                f"Scoring text with {artifact} in {runtime} failed:\n{(proc.stderr or proc.stdout)[-3000:]}"
            )
        result |= scored.model_dump()
        generation.eval_top1 = np.load(top1_path, allow_pickle=False)
    return {**result, **extra, "oom_killed": False}, generation


def parity_logits_mib(batch: int, prompt: int, new_tokens: int, vocab: int) -> float:
    """What the runner's parity run holds beyond the model: every prompt position's logits and each
    decode step's, fp32, and one more copy while the prompt's chunks are joined. At Gemma 3's 262144
    vocabulary a 128-token prompt's are 128 MiB: without this in the cgroup limit, Gemma 3 270M's
    android artifacts were killed in the parity run, before the fill the gate measures."""
    return 2.0 * batch * (prompt + new_tokens) * vocab * 4 / 2**20


def _session_check(
    profile: DeviceProfile, path: Path, inputs: torch.Tensor, work_dir: Path, threads: int, generator: Generation
) -> Gate:
    """Run a GenAI folder's graph in a plain onnxruntime session (unconfined, no fill: a parity run)
    and hold it to what the Generator produced. A graph whose sliding-window layers keep the
    builder's windowed cache runs only under the Generator, which manages that cache."""
    config = json.loads((path.parent / "genai_config.json").read_text())
    if config["model"]["decoder"].get("sliding_window"):
        return session_gate(
            profile, None, "its sliding-window layers use the windowed cache only the Generator manages"
        )
    _, got = run_artifact("onnxruntime", path, inputs.numpy(), work_dir, threads, None,
                          generator.steps.shape[1], profile.prefill_tokens)  # fmt: skip
    assert got is not None
    return session_gate(profile, compare_generation(got, generator))


class Validator:
    """Validation of one run's artifacts, one runtime at a time.

    Why a class: the pipeline validates an artifact as soon as it is written, while another
    runtime's export still runs in a child process (:mod:`pipeline.exporting`), so the runs come
    one by one and not in the profile's order; :meth:`result` gathers them in that order.

    With ``enforce`` (the default) each run is confined to the model's share of the budget in a
    memory cgroup where this machine allows it (see :func:`run_artifact`). With ``eval_windows``
    each artifact's own perplexity is measured too (``perplexity["exported[<runtime>]"]``)."""

    def __init__(
        self,
        profile: DeviceProfile,
        model: PreTrainedModel,
        inputs: torch.Tensor,
        work_dir: Path,
        perplexity: dict[str, float],
        enforce: bool = True,
        eval_windows: torch.Tensor | None = None,
    ) -> None:
        self.profile, self.model, self.inputs, self.work_dir = profile, model, inputs, work_dir
        self.enforce = enforce
        # the eval text each artifact scores (its own perplexity, top-1), cut to the profile's context
        self.windows = None if eval_windows is None else eval_windows[:, : profile.context_length].numpy()
        self.threads = local_threads(profile.threads)
        self.report = ValidationResult(profile=profile.name, perplexity=perplexity, threads_note=self.threads.note)
        self.perplexity = perplexity  # the PyTorch figures the perplexity gate holds (not the runtimes' own)
        if self.threads.capped:
            log.warning("%s", self.threads.note)
        self.shape = model_shape(model)
        self.plan = fill_plan(profile)
        if self.plan.mode == "extrapolated":
            log.warning(
                "context_length %d is past fill_max_positions %d: each artifact's cache is filled to %d positions and "
                "its peak at %d extrapolated from the measured slope (the report says so); raise fill_max_positions "
                "to measure it",
                self.plan.context, self.plan.positions, self.plan.positions, self.plan.context,
            )  # fmt: skip
        self._reference: Generation | None = None
        self._ref_top1: np.ndarray | None = None
        self._gates: dict[str, list[Gate]] = {}  # per runtime, in the order they were run

    @property
    def reference(self) -> Generation:
        """PyTorch's greedy generation on the validation prompt (computed once, on first use)."""
        if self._reference is None:
            self._reference = reference_generation(self.model, self.inputs, self.profile.decode_tokens)
        return self._reference

    def reference_top1(self, windows: np.ndarray) -> np.ndarray:
        """PyTorch's top-1 on ``windows`` (:attr:`windows`; computed once, on first use)."""
        if self._ref_top1 is None:
            self._ref_top1 = reference_top1(self.model, windows)
        return self._ref_top1

    def prepare(self, runtimes: list[Runtime]) -> None:
        """Compute now the PyTorch references ``runtimes``' runs will be compared with (the
        pipeline does it while an export still runs, off the critical path)."""
        _ = self.reference
        if self.windows is not None and any(self.profile.quantized(rt) for rt in runtimes):
            self.reference_top1(self.windows)

    def done(self) -> set[str]:
        """The runtimes validated so far."""
        return set(self._gates)

    def run(self, runtime: Runtime, path: Path, beside: str = "") -> None:
        """Run ``path`` in ``runtime`` under its share of the budget and evaluate its gates.
        ``beside`` names what else runs on the host meanwhile (the report says its times are shared)."""
        profile, plan, shape, threads = self.profile, self.plan, self.shape, self.threads
        log.info("validating %s in %s (threads=%d, filling %d positions)", path.name, runtime, threads.used,
                 plan.positions)  # fmt: skip
        pred: MemoryEstimate = estimate(shape, profile, runtime)
        # The run fills the cache to the profile's context (or fill_max_positions: what the memory
        # model predicts for the rest is kept out of its share). The runtime library's own resident
        # size is in the measured baseline (with the Python host), so the device's figure for it is
        # added from the profile. What is left of the budget is what the run may use.
        rest = pred.total_mib - estimate(shape, profile, runtime, plan.positions).total_mib
        lib = library_mib(profile, runtime)
        model_share = float(profile.memory_budget_mib) - rest - lib
        predicted_run = pred.total_mib - lib
        curve = [(n, estimate(shape, profile, runtime, n).total_mib - lib)
                 for n in checkpoints(plan, profile.prefill_tokens)]  # fmt: skip
        windows = self.windows
        new_tokens = profile.decode_tokens
        measured, got = run_artifact(
            runner_backend(runtime, profile.onnx_format),
            path,
            self.inputs.numpy(),
            self.work_dir,
            threads.used,
            model_share if self.enforce else None,
            new_tokens,
            profile.prefill_tokens,
            windows,
            plan.positions,
            parity_logits_mib(self.inputs.shape[0], self.inputs.shape[1], new_tokens,
                              int(self.model.config.vocab_size)),
            profile.maps_program(runtime),
        )  # fmt: skip
        report = self.report
        gates: list[Gate] = []
        if "perplexity" in measured:
            report.perplexity[f"exported[{runtime}]"] = measured["perplexity"]
        if got is None:  # killed by the kernel at the budget: gates say so; the report a row
            trace = [FillPoint.model_validate(p) for p in measured.get("fill", [])]
            peak = max((p.peak_mib for p in trace), default=0.0)
            fill = summarize(plan, trace, peak, curve, lib, killed=True) if trace else None
            where = (
                f"at {fill.positions_filled} of {plan.context} positions filled, after a measured {peak:.1f} MiB"
                if fill
                else "before the context fill began (loading or the parity run)"
            )
            # at least: its share and the slack were not enough (the budget, + the slack); more where
            # the fill's slope says so
            needed = model_share + CGROUP_SLACK_MIB + rest + lib
            if fill is not None and fill.points_fitted >= 2:
                needed = max(needed, fill.peak_at_context_mib + lib)
            report.killed.append(
                KilledRun(
                    runtime=runtime,
                    artifact=path.name,
                    size_mib=artifact_size_bytes(path) / 2**20,
                    model_share_mib=model_share,
                    cgroup_limit_mib=float(measured["cgroup_limit_mib"]),
                    predicted_model_peak_mib=predicted_run,
                    fill=fill,
                )
            )  # fmt: skip
            gates += killed_gates(
                profile,
                runtime,
                f"killed by the kernel {where}: the run needed more than its {model_share:.1f} MiB share (+"
                f"{CGROUP_SLACK_MIB:.0f} MiB slack for kernel-side charges) of the {profile.memory_budget_mib} MiB "
                f"budget (runtime library {lib:.1f}"
                + (f", predicted rest of the context {rest:.1f}" if rest else "")
                + f"); needed about {needed:.1f} MiB in all, predicted {pred.total_mib:.1f}. Raise "
                "pruning.headroom_mib (prune further under the budget), lower context_length, or raise "
                "memory_budget_mib.",
                needed_mib=needed,
            )
            self._gates[runtime] = gates
            return
        reference = self.reference
        cmp = compare_generation(got, reference)
        if profile.quantized(runtime) and windows is not None and got.eval_top1 is not None:
            ref_top1 = self.reference_top1(windows)
            cmp["top1_agreement"], cmp["top1_positions"] = top1_agreement(got, reference, ref_top1)
            cmp["eval_top1_agreement"] = float((got.eval_top1 == ref_top1).mean())
        trace = [FillPoint.model_validate(p) for p in measured.pop("fill")]
        fill = summarize(plan, trace, float(measured["model_peak_mib"]), curve, lib)
        report.runtimes.append(
            RuntimeResult(
                runtime=runtime,
                artifact=path.name,
                size_mib=artifact_size_bytes(path) / 2**20,
                measured=measured,
                predicted=pred.to_dict(),
                projected_peak_mib=fill.peak_at_context_mib + lib,
                predicted_model_peak_mib=predicted_run,
                prediction_error=fill.peak_at_context_mib / predicted_run - 1.0,
                max_abs_logit_diff=cmp["max_abs_logit_diff"],
                argmax_agreement=cmp["argmax_agreement"],
                fill=fill,
                generation=cmp,
                shared_host_with=beside,
            )
        )
        scheme = profile.quantized(runtime)
        if scheme:
            gates += quantized_gates(profile, runtime, scheme, cmp, report.perplexity)
        else:
            gates += fp32_gates(profile, runtime, cmp, new_tokens)
        gates.append(memory_gate(runtime, fill.peak_at_context_mib, lib, float(profile.memory_budget_mib), fill.how()))
        if runner_backend(runtime, profile.onnx_format) != runtime:  # GenAI: the second way, a plain session
            gates.append(_session_check(profile, path, self.inputs, self.work_dir / "session", threads.used, got))
        self._gates[runtime] = gates

    def run_all(self, artifacts: dict[Runtime, Path]) -> ValidationResult:
        """Run every artifact not validated yet (a progress bar over them), then :meth:`result` in
        ``artifacts``' order."""
        todo = [(rt, path) for rt, path in artifacts.items() if rt not in self.done()]
        for runtime, path in tqdm(todo, desc="validate", unit="runtime", disable=None):
            self.run(runtime, path)
        return self._result(list(artifacts))

    def _result(self, order: list[Runtime]) -> ValidationResult:
        """Every validated runtime's rows and gates in ``order`` (the profile's), then the
        perplexity gate."""
        report = self.report
        rank: dict[str, int] = {rt: i for i, rt in enumerate(order)}

        def key(runtime: str) -> int:
            return rank.get(runtime, len(rank))

        report.runtimes.sort(key=lambda r: key(r.runtime))
        report.killed.sort(key=lambda r: key(r.runtime))
        report.gates = [g for rt in sorted(self._gates, key=key) for g in self._gates[rt]]
        ppl_gate = perplexity_gate(self.profile, self.perplexity)
        if ppl_gate is not None:
            report.gates.append(ppl_gate)
        return report
