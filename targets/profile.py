"""Device profiles: YAML files validated into frozen, typed objects before any model loads.

Unknown keys and wrong types are rejected with the file, the key path and what was expected, so a
typo in a hand-edited profile fails immediately instead of silently falling back to a default.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ConfigError, ProfileError
from core.methods import DEFAULT_METHOD, MethodConfig, method_config
from core.runtimes import RUNTIMES, Runtime
from core.schemes import (
    HEAD_FP32,
    SCHEME_TABLE,
    EmbeddingScheme,
    HeadScheme,
    Scheme,
    effective_head,
    embedding_schemes_for,
    head_schemes_for,
    precision_text,
    rounds_by_gptq,
    schemes_for,
)

__all__ = ["RUNTIMES", "DeviceProfile", "Runtime", "Scheme", "load_profile"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CpuSpec(_Strict):
    """The CPU the model runs on; ``features`` drive kernel choices (dotprod, fp16, i8mm)."""

    arch: Literal["aarch64", "x86_64"]
    cores: int = Field(ge=1, le=256)
    features: list[str] = Field(default_factory=list)


class PruningLimits(BaseModel):
    """The profile's ``pruning:`` section: the method, how far under the budget to stop, and any knob
    of that method's config (``core/methods.py``), validated against it: an unknown knob is an error
    that lists the method's keys."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str = DEFAULT_METHOD
    max_removed_layer_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    # Prune until the prediction is this far under the budget: slack for allocator and workspace
    # variation the memory model does not capture (a few MiB run to run in a Python host).
    headroom_mib: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _knobs_belong_to_the_method(self) -> PruningLimits:
        if "width_multiple" in self.knobs():
            raise ValueError("width_multiple is a top-level profile key (it shapes every method): move it there")
        try:
            self.config()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def knobs(self) -> dict[str, Any]:
        """The method's own knobs set in the profile (beyond method, max_removed_layer_ratio, headroom_mib)."""
        return dict(self.model_extra or {})

    def config(self, **overrides: Any) -> MethodConfig:
        """The method's typed config: the profile's knobs, then ``overrides``."""
        knobs = {**self.knobs(), "max_removed_layer_ratio": self.max_removed_layer_ratio, **overrides}
        return method_config(self.method, **knobs)


class Gates(_Strict):
    """Thresholds that turn measurements into pass/fail.

    fp32 artifacts must match PyTorch (``parity_atol``, identical greedy tokens). A quantized
    artifact cannot, so it is held to its quality instead: its own perplexity over the pruned fp32
    model's, and top-1 agreement with the fp32 logits over the prompt and the decode steps."""

    parity_atol: float = Field(1e-3, gt=0.0)
    max_ppl_ratio: float | None = Field(None, gt=1.0)
    quantized_max_ppl_ratio: float = Field(1.25, gt=1.0)
    quantized_min_top1: float = Field(0.85, gt=0.0, le=1.0)

    # The quantized gates' two comparisons, in one place: validation holds a measured artifact to them
    # (targets/gates.py) and the fit a simulated precision's estimate (pipeline/fit/plan.py).
    def agreement_passes(self, top1: float) -> bool:
        return top1 >= self.quantized_min_top1

    def quantized_ratio_passes(self, ratio: float) -> bool:
        return ratio <= self.quantized_max_ppl_ratio


class DeviceProfile(_Strict):
    """A target device and the run-time constraints an exported model must meet on it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    device: str = Field(min_length=1)
    cpu: CpuSpec
    ram_mib: int = Field(gt=0)
    memory_budget_mib: int = Field(gt=0)
    context_length: int = Field(gt=0, le=1_048_576)
    prefill_tokens: int = Field(gt=0)
    # The shortest prefill chunk ``precision: auto`` may shorten ``prefill_tokens`` to before it prunes
    # (halving it): a shorter chunk costs time to the first token, not quality, and its activations
    # (a chunk of vocabulary-wide logits: Gemma 3's 262144 x 4 bytes per token) shrink with it.
    # Absent: the chunk is the profile's.
    prefill_tokens_min: int | None = Field(None, gt=0)
    # Tokens greedy-decoded with the artifact's KV cache during validation (timing + token check).
    decode_tokens: int = Field(32, ge=1, le=4096)
    # Validation fills the KV cache to context_length, the worst case the profile claims. A longer
    # context is filled this far, and the peak at context_length extrapolated from the measured slope
    # (a CPU host fills SmolLM2's 4096 positions in ~20 s; 32k would take tens of minutes).
    fill_max_positions: int = Field(8192, ge=64)
    batch_size: int = Field(1, ge=1, le=64)
    runtimes: list[Runtime] = Field(min_length=1)
    # "fp32": weights fp32 except where ``quantize:`` names a scheme. "auto": the fitting stage
    # (pipeline/fit/) picks each runtime's scheme (fp32 or one of its rows in core.schemes) and
    # the pruning together, for the least calibration loss that fits; ``quantize:`` entries pin a
    # runtime's scheme (``quantize_embedding:`` its embedding's). Activations and the KV cache stay fp32.
    precision: Literal["fp32", "auto"] = "fp32"
    threads: int = Field(ge=1, le=256)
    width_multiple: int = Field(8, ge=1, le=256)
    runtime_overhead_mib: dict[Runtime, float] = Field(default_factory=dict)
    # Weight quantization per runtime (absent: fp32): one of core.schemes.schemes_for(runtime).
    quantize: dict[Runtime, Scheme] = Field(default_factory=dict)
    # The embedding table's quantization per runtime (absent: fp32, or chosen under precision: auto):
    # one of core.schemes.embedding_schemes_for(runtime). A component of its own: the linear scheme
    # above decides the lm_head, this one only the lookup table.
    quantize_embedding: dict[Runtime, EmbeddingScheme] = Field(default_factory=dict)
    # The lm_head's quantization per runtime, apart from the blocks' (absent: it follows ``quantize:``,
    # or is chosen under precision: auto): one of core.schemes.head_schemes_for(runtime), or fp32.
    quantize_head: dict[Runtime, HeadScheme] = Field(default_factory=dict)
    # onnxruntime artifact format: "onnx" = torch.onnx's graph with Optimum's input names; "ort" =
    # ORT format for ORT Mobile / minimal builds, optimized offline for the device's CPU (model.onnx
    # is still written beside it); "genai" = the folder onnxruntime-genai's Generator loads, built by
    # its own builder (exporters/genai.py): fused ops, a shared past/present buffer, genai_config.json.
    onnx_format: Literal["onnx", "ort", "genai"] = "onnx"
    # With onnx_format: genai, the format written instead where the GenAI format cannot represent the
    # pruned model or the chosen scheme (exporters.genai.unsupported_reason: an architecture its
    # builder lacks, dynamic int8, query heads that no longer split into whole KV groups); the report
    # says what and why, and validation holds the artifact to that format's memory model. Absent: the
    # GenAI format is required, and such a model is an ExportError before any file is written.
    onnx_fallback: Literal["onnx", "ort"] | None = None
    # How the app loads the .pte (ExecuTorch's Module load modes). "file" (LOAD_MODE_FILE, or mapped and
    # locked: what the Python binding does with the privilege to lock): every byte of the program is
    # resident. "mmap" (LOAD_MODE_MMAP): mapped, not locked; XNNPACK packs the weights it runs into its
    # own memory, so what stays mapped is what the portable kernels read, the embedding table a few rows
    # at a time, and the memory model counts the table as mapped, as it does onnxruntime's (Gemma 3
    # 270M's int8 table: load peak 161 MiB lower). Validation loads as the profile says.
    executorch_load_mode: Literal["file", "mmap"] = "file"
    pruning: PruningLimits = PruningLimits()
    gates: Gates = Gates()

    @property
    def float_dtype(self) -> Literal["fp32"]:
        """What activations, the KV cache and unquantized weights are stored in."""
        return "fp32"

    def maps_program(self, runtime: str) -> bool:
        """Whether ``runtime``'s artifact is loaded mapped and unlocked by this profile's choice
        (``executorch_load_mode: mmap``); onnxruntime maps its external data whatever the profile."""
        return runtime == "executorch" and self.executorch_load_mode == "mmap"

    @property
    def channel_multiple(self) -> int:
        """The multiple pruned widths keep: ``width_multiple``, and whole groups of every scheme that
        needs its groups to tile a weight's input width (else that weight would stay fp32)."""
        groups = [SCHEME_TABLE[s].group_size for s in self.quantize.values() if SCHEME_TABLE[s].whole_groups]
        return math.lcm(self.width_multiple, *groups)

    def quantized(self, runtime: str) -> str | None:
        """``runtime``'s quantization in words (linear scheme, embedding scheme), None when all fp32:
        a quantized artifact is gated on its quality, an fp32 one on parity."""
        linear, table = self.quantize.get(runtime), self.quantize_embedding.get(runtime)  # type: ignore[call-overload]
        return precision_text(linear, table, self.quantize_head.get(runtime)) or None  # type: ignore[call-overload]

    def head_scheme(self, runtime: str) -> str | None:
        """The scheme ``runtime`` stores the lm_head in (None: fp32): ``quantize_head:``, else the
        linear scheme's."""
        return effective_head(self.quantize.get(runtime), self.quantize_head.get(runtime))  # type: ignore[call-overload]

    def rounds_by_gptq(self, runtime: str) -> bool:
        """Whether ``runtime``'s blocks or lm_head are GPTQ-rounded on the calibration text at export."""
        return rounds_by_gptq(self.quantize.get(runtime)) or rounds_by_gptq(self.head_scheme(runtime))  # type: ignore[call-overload]

    def with_quantize(
        self,
        quantize: dict[Runtime, Scheme],
        embedding: dict[Runtime, EmbeddingScheme] | None = None,
        head: dict[Runtime, HeadScheme] | None = None,
    ) -> DeviceProfile:
        """This profile with ``quantize`` as its per-runtime linear schemes, ``embedding`` as its
        embedding schemes and ``head`` as its lm_head schemes (None: the profile's own), as a fitted
        ``precision: auto`` runs it."""
        update: dict[str, Any] = {"quantize": dict(quantize)}
        if embedding is not None:
            update["quantize_embedding"] = dict(embedding)
        if head is not None:
            update["quantize_head"] = dict(head)
        return self.model_copy(update=update)

    def with_runtimes(self, runtimes: list[Runtime]) -> DeviceProfile:
        """This profile exporting for ``runtimes`` only (a subset of its own, in its order), their pins
        and overheads kept: ``--runtimes`` on the command line, or the lever an infeasible budget names
        when one runtime cannot fit where another can (Gemma 3 270M: ExecuTorch's floor is ~100 MiB above
        onnxruntime's, its packed int4 lm_head)."""
        unknown = [rt for rt in runtimes if rt not in self.runtimes]
        if unknown or not runtimes:
            raise ProfileError(
                f"--runtimes {','.join(runtimes) or '(none)'}: profile '{self.name}' exports for "
                f"{', '.join(self.runtimes)}; name one or more of those (edit runtimes: in the profile to add one)"
            )
        keep = [rt for rt in self.runtimes if rt in runtimes]
        data = self.model_dump()
        data["runtimes"] = keep
        for key in ("quantize", "quantize_embedding", "quantize_head", "runtime_overhead_mib"):
            data[key] = {rt: v for rt, v in data[key].items() if rt in keep}
        return DeviceProfile.model_validate(data)

    def prefill_chunks(self) -> list[int]:
        """The prefill chunks ``precision: auto`` may export with, longest first: ``prefill_tokens``
        halved down to ``prefill_tokens_min`` (that one included)."""
        chunks, low = [self.prefill_tokens], self.prefill_tokens_min or self.prefill_tokens
        while chunks[-1] // 2 >= low:
            chunks.append(chunks[-1] // 2)
        return chunks if chunks[-1] == low else [*chunks, low]

    def prune_config(self, method: str | None = None, **overrides: Any) -> MethodConfig:
        """The pruning method's typed config for this profile: its ``pruning:`` knobs (when
        ``method`` is the profile's own), the profile's width multiple, then ``overrides``."""
        overrides = {"width_multiple": self.channel_multiple, **overrides}
        if method is None or method == self.pruning.method:
            return self.pruning.config(**overrides)
        # another method: the profile's knobs are its own method's; the shared limit carries over
        return method_config(method, max_removed_layer_ratio=self.pruning.max_removed_layer_ratio, **overrides)

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        if self.memory_budget_mib >= self.ram_mib:
            raise ValueError(
                f"memory_budget_mib ({self.memory_budget_mib}) must be below ram_mib ({self.ram_mib}): "
                "the OS and other apps need the rest"
            )
        if self.prefill_tokens + self.decode_tokens > self.context_length:
            raise ValueError(
                f"prefill_tokens + decode_tokens ({self.prefill_tokens} + {self.decode_tokens}) cannot exceed "
                f"context_length ({self.context_length})"
            )
        if self.prefill_tokens_min is not None and self.prefill_tokens_min > self.prefill_tokens:
            raise ValueError(
                f"prefill_tokens_min ({self.prefill_tokens_min}) cannot exceed prefill_tokens ({self.prefill_tokens})"
            )
        if self.fill_max_positions < min(self.context_length, 4 * self.prefill_tokens):
            raise ValueError(
                f"fill_max_positions ({self.fill_max_positions}) must cover 4 prefill chunks "
                f"({4 * self.prefill_tokens} positions) or the whole context: fewer points cannot give a slope"
            )
        if len(set(self.runtimes)) != len(self.runtimes):
            raise ValueError(f"runtimes lists a runtime twice: {list(self.runtimes)}")
        if self.threads > self.cpu.cores:
            raise ValueError(f"threads ({self.threads}) exceeds cpu.cores ({self.cpu.cores})")
        if self.pruning.headroom_mib >= self.memory_budget_mib:
            raise ValueError(
                f"pruning.headroom_mib ({self.pruning.headroom_mib}) must be below memory_budget_mib "
                f"({self.memory_budget_mib})"
            )
        for rt, scheme in self.quantize.items():
            allowed = schemes_for(rt)
            if scheme not in allowed:
                raise ValueError(f"quantize.{rt}: '{scheme}' is not a {rt} scheme; use one of {', '.join(allowed)}")
            if rt not in self.runtimes:
                raise ValueError(f"quantize.{rt} is set but '{rt}' is not in runtimes {list(self.runtimes)}")
        for rt, emb in self.quantize_embedding.items():
            tables = embedding_schemes_for(rt)
            if emb not in tables:
                raise ValueError(
                    f"quantize_embedding.{rt}: '{emb}' is not an embedding scheme {rt} runs; "
                    f"use one of: {', '.join(tables) or 'none (remove the key)'}"
                )
            if rt not in self.runtimes:
                raise ValueError(f"quantize_embedding.{rt} is set but '{rt}' is not in runtimes {list(self.runtimes)}")
        for rt, head in self.quantize_head.items():
            heads = (*head_schemes_for(rt), HEAD_FP32)
            if head not in heads:
                raise ValueError(
                    f"quantize_head.{rt}: '{head}' is not a lm_head scheme {rt} runs; use one of: {', '.join(heads)}"
                )
            if rt not in self.runtimes:
                raise ValueError(f"quantize_head.{rt} is set but '{rt}' is not in runtimes {list(self.runtimes)}")
            if rt == "onnxruntime" and self.onnx_format == "genai" and self.head_scheme(rt) != self.quantize.get(rt):
                raise ValueError(
                    "quantize_head.onnxruntime: onnxruntime-genai's builder stores the lm_head in the linear "
                    "weights' scheme; remove the key (or use onnx_format: onnx)"
                )
        if self.onnx_fallback is not None and self.onnx_format != "genai":
            raise ValueError(
                f"onnx_fallback ({self.onnx_fallback}) only applies to onnx_format: genai (this profile writes "
                f"{self.onnx_format}); remove it"
            )
        for rt, mib in self.runtime_overhead_mib.items():
            if mib < 0:
                raise ValueError(f"runtime_overhead_mib.{rt} must be >= 0, got {mib}")
        return self


def profiles_dir() -> Path:
    """Where shipped profiles live (override with PRUNEFIT_PROFILES_DIR)."""
    env = os.environ.get("PRUNEFIT_PROFILES_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "device_profiles"


def available_profiles(directory: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (directory or profiles_dir()).glob("*.yaml"))


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{loc}': remove it or check its spelling")
        elif err["type"] == "missing":
            lines.append(f"  - missing required key '{loc}'")
        else:
            got = err.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"  - {loc}: {err['msg']}{got_s}")
    valid = ", ".join(DeviceProfile.model_fields)
    return f"Invalid device profile {path}:\n" + "\n".join(lines) + f"\nValid top-level keys: {valid}."


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """Accept a profile name (``android``) or a path to a YAML file. A name means a file only when
    it ends in ``.yaml``/``.yml`` or contains a path separator: a directory that happens to be named
    like a target (``--out android`` run from the same folder) is not a profile."""
    p = Path(name_or_path)
    if isinstance(name_or_path, Path) or p.suffix in (".yaml", ".yml") or os.sep in str(name_or_path):
        if not p.is_file():
            raise ProfileError(f"Profile file {p} does not exist.")
        return p
    candidate = profiles_dir() / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ProfileError(
            f"Unknown target '{name_or_path}'. Valid targets: {', '.join(available_profiles()) or '(none)'} "
            f"(files in {profiles_dir()}), or pass a path to a profile YAML."
        )
    return candidate


def load_profile(name_or_path: str | Path, check_stem: bool = True) -> DeviceProfile:
    """Load and validate one profile; the ``name`` key must equal the file stem (not checked for
    the copy saved beside the artifacts, ``OUT/profile.yaml``)."""
    path = resolve_profile_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"Cannot read profile {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"Profile {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"Profile {path} must be a YAML mapping of keys to values, got {type(data).__name__}.")
    try:
        profile = DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_format_errors(path, exc)) from exc
    if check_stem and profile.name != path.stem:
        raise ProfileError(f"Profile {path}: name '{profile.name}' must equal the file stem '{path.stem}'.")
    return profile


def load_profiles(directory: Path | None = None) -> dict[str, DeviceProfile]:
    d = directory or profiles_dir()
    return {p.stem: load_profile(p) for p in sorted(d.glob("*.yaml"))}
