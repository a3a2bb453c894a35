"""The report of a run, typed: one pydantic model with one schema version. ``report.json`` is its
dump; ``report.md`` (``targets/markdown.py``) and ``report.html`` (``targets/html.py``) are rendered
from it; device and emulated runs are merged into it (``targets/device.py``). A report of another
schema version is refused with what to run, instead of rendering half of it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from core.errors import GateError
from targets.fill import FillSummary
from targets.gates import Gate

# 2: typed (this module); killed runs; gates that were not checked have no threshold.
# 3: the memory gate at the full context (``fill``), no projection of a KV cache the run did not hold.
SCHEMA_VERSION = 3


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeResult(_Section):
    """One artifact measured in its runtime, compared with PyTorch, against the prediction."""

    runtime: str
    artifact: str
    size_mib: float
    measured: dict[str, Any]  # targets.measurement.RunMeasurement's fields + how it was confined
    predicted: dict[str, Any]  # targets.budget.MemoryEstimate.to_dict()
    projected_peak_mib: float  # the peak at full context + the device's runtime library: the memory gate's value
    predicted_model_peak_mib: float  # the part of the prediction the child process measures (full context)
    prediction_error: float  # peak at full context / predicted - 1
    max_abs_logit_diff: float
    argmax_agreement: float
    fill: FillSummary | None = None  # the context fill: peak at full context, how it was reached, the trace
    generation: dict[str, Any] = Field(default_factory=dict)
    # what ran beside this measurement on the host (another runtime's export): its load, prefill and
    # decode times are then lower than an idle host's; memory is per process and unaffected
    shared_host_with: str = ""


class KilledRun(_Section):
    """An artifact's run the kernel killed at its cgroup limit: the model needed more than its share.
    ``cgroup_limit_mib`` is the limit as the cgroup counted it (host interpreter and library charge +
    the model's share + slack); ``model_share_mib`` the budget's part the model itself could use."""

    runtime: str
    artifact: str
    size_mib: float
    model_share_mib: float
    cgroup_limit_mib: float
    predicted_model_peak_mib: float
    fill: FillSummary | None = None  # how far the fill got before the kill (``killed_at``), its trace


class ValidationResult(_Section):
    """Every artifact's measurements and every gate of one validation."""

    profile: str
    runtimes: list[RuntimeResult] = Field(default_factory=list)
    gates: list[Gate] = Field(default_factory=list)
    perplexity: dict[str, float] = Field(default_factory=dict)
    # runs the kernel killed at their memory limit: no measured row, this says what they were held to
    killed: list[KilledRun] = Field(default_factory=list)
    # the runners' thread count here, when the profile's was capped at the CPUs this host gives us
    threads_note: str = ""

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, data: Any) -> Any:
        """``passed`` is written with the report (for its readers) but always derived from the gates."""
        if isinstance(data, dict) and "passed" in data:
            data = {k: v for k, v in data.items() if k != "passed"}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def failures(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def raise_if_failed(self) -> None:
        failed = self.failures()
        if failed:
            lines = "\n".join(f"  - {g.name}: {g.detail}" for g in failed)
            raise GateError(f"Validation on profile '{self.profile}' failed {len(failed)} gate(s):\n{lines}")


class DeviceRun(BaseModel):
    """A run on a real device or under emulation, merged in (its comparison keys vary by source)."""

    model_config = ConfigDict(extra="allow")

    label: str
    runtime: str
    measured: dict[str, Any]


class Report(_Section):
    schema_version: Literal[3] = 3  # SCHEMA_VERSION
    model: str
    eval_source: str
    calib_source: str
    profile: dict[str, Any]  # the resolved DeviceProfile
    prune: dict[str, Any]  # pipeline.prune.PrunePlan.to_dict()
    # precision: auto's choice (pipeline.fit.FitPlan.to_dict()): the candidates, the frontier, why
    fit: dict[str, Any] | None = None
    validation: ValidationResult
    stages: dict[str, Any]
    versions: dict[str, Any]
    artifacts: dict[str, str]
    device_runs: list[DeviceRun] = Field(default_factory=list)
