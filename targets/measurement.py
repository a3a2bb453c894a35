"""What the runner child process (``targets/runner.py``) reports, typed: it writes one JSON result
file per run (``--result-out``), which is read here into these models. A field the runner adds or
drops without this contract changing is an error, not a silently missing number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import ExportError, GateError, RuntimeMissingError


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunnerFailure(_Result):
    """The runner could not run the artifact, for a reason it recognised."""

    error: Literal["runtime_missing", "stale_artifact"]
    message: str


class ProbeResult(_Result):
    """A probe run: only the runtime imported; what the host (interpreter + library) is charged."""

    baseline_rss_mib: float


class FillPoint(_Result):
    """One call of the runner's context fill: positions filled after it, its own resident peak and
    the RSS after it (model's share: above the baseline, less host code), seconds since the fill began."""

    positions: int
    kind: Literal["prefill", "decode"]
    peak_mib: float
    rss_mib: float
    s: float


class RunMeasurement(_Result):
    """One measured run: load, prefill of the prompt, greedy decoding with the artifact's KV cache.

    ``model_peak_mib`` is the model's own peak: the resident high-water mark over loading and
    running (with a context fill: loading and the fill, the workload a device runs; the parity
    run's own copy of every prompt position's logits is the harness's, ``short_run_peak_mib``
    includes it), less the baseline after the runtime was imported and less the host code paged
    in meanwhile (``host_code_growth_mib``; see the runner's docstring)."""

    runtime: str
    artifact: str
    threads: int
    input_shape: list[int]
    new_tokens: int
    interpreter_rss_mib: float
    baseline_rss_mib: float
    loaded_rss_mib: float
    load_peak_mib: float
    peak_rss_mib: float
    host_code_growth_mib: float
    load_host_code_growth_mib: float  # the part paged in while loading: the load peak's own correction
    model_peak_mib: float
    # the peak of load and the parity runs alone (prompt + new_tokens positions), before the fill
    short_run_peak_mib: float
    fill_positions: int  # positions the fill reached (0: no fill)
    fill_s: float
    fill: list[FillPoint]  # one per call of the fill, in order
    peak_reset: bool
    load_s: float
    first_prefill_s: float
    prefill_s: float
    decode_s_per_token: float
    decode_tokens_per_s: float
    prefill_chunk: int


class EvalResult(_Result):
    """The artifact's own perplexity on evaluation windows (an unconfined second run)."""

    perplexity: float
    perplexity_s: float


def read_result(path: Path, kind: type[_Result], runtime: str, returncode: int, output: str) -> _Result:
    """The result the runner wrote to ``path``, as ``kind``. A missing runtime or a stale artifact
    the runner reported becomes its typed error; no result, or one of the wrong shape, is a
    GateError that carries the child's output."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise GateError(f"The {runtime} runner wrote no result (exit {returncode}):\n{output[-3000:]}") from None
    if isinstance(data, dict) and "error" in data:
        failure = RunnerFailure.model_validate(data)
        if failure.error == "runtime_missing":
            raise RuntimeMissingError(f"Runtime '{runtime}' is not installed: {failure.message}. Run `make setup`.")
        raise ExportError(failure.message)
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise GateError(f"The {runtime} runner's result does not match {kind.__name__}: {exc}") from None
