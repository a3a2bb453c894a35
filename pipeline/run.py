"""The whole job, top to bottom: calibrate -> prune -> rewrite -> export -> validate -> report.

1. Validate the profile and every option before anything heavy loads.
2. Prune stage (cached): load the model, cut calibration windows, measure dense perplexity,
   prune until the memory model says the profile's budget is met, save the pruned model
   (safetensors + config.json) and check it reloads to identical logits.
3. Export stage per runtime (cached): ONNX and/or .pte, side by side where the host allows
   (pipeline/exporting.py).
4. Validate: run each artifact in its runtime in a child process; gates; report.json/report.md.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from core.cpus import available_cpus, local_threads
from core.errors import CalibrationError, ConfigError, ExportError
from core.fsio import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    exclusive_lock,
    remove_stale_temps,
)
from core.methods import MethodConfig
from core.perplexity import perplexity
from core.runtimes import RUNTIME_TABLE
from core.schemes import EMBEDDING_TABLE, SCHEME_TABLE
from exporters import check_runtime_available, get_exporter
from exporters.base import ExportArtifact, ExportConfig, artifact_files
from pipeline.calib_cache import content_digest
from pipeline.data import DataConfig, first_windows, generated_windows, load_calibration, read_text
from pipeline.exporting import run_exports
from pipeline.feasibility import check_feasible, floor_shape
from pipeline.fit import choose_precision, fitted_profile, most_compressed
from pipeline.manifest import fingerprint_path, is_fresh, package_versions, source_digest, stage_key, write_manifest
from pipeline.memo import Memo
from pipeline.methods.base import PPL_WINDOWS
from pipeline.model import DEFAULT_MODEL, load_config, load_model, resolve_model_path, skeleton
from pipeline.prune import prune_to_budget, will_prune
from pipeline.rewrite import check_round_trip, load_pruned, save_model
from targets.profile import DeviceProfile, Runtime, load_profile
from targets.report import write_report
from targets.results import Report
from targets.validate import Validator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Held-out text for perplexity: first ``num_samples`` windows of ``seq_len`` tokens."""

    source: str | None = None  # None: held-out model-generated text (different seed from calibration)
    num_samples: int = 16
    seq_len: int = 512


@dataclass(frozen=True)
class RunConfig:
    target: str
    model: str = DEFAULT_MODEL
    out_dir: Path | None = None
    calib: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    max_prune_ratio: float | None = None  # overrides profile.pruning.max_removed_layer_ratio
    method: str | None = None  # overrides profile.pruning.method
    # the method's knobs (core/methods.py), over the profile's pruning section
    prune_options: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None  # torch threads for pruning/eval (default: all cores)
    force: bool = False
    trust_remote_code: bool = False

    def resolved_out_dir(self, profile: DeviceProfile) -> Path:
        return self.out_dir or Path("artifacts") / profile.name


def profile_prune_config(
    profile: DeviceProfile,
    method: str | None = None,
    max_prune_ratio: float | None = None,
    options: dict[str, Any] | None = None,
) -> MethodConfig:
    """The prune stage's typed method config for ``profile``, with the run's overrides
    (benchmarks/default_method.py uses it too, so it prunes exactly as ``make export`` does). An
    unknown method or knob is a ConfigError listing the valid ones."""
    overrides = dict(options or {})
    if max_prune_ratio is not None:
        overrides["max_removed_layer_ratio"] = max_prune_ratio
    return profile.prune_config(method, **overrides)


def _prune_config(cfg: RunConfig, profile: DeviceProfile) -> MethodConfig:
    return profile_prune_config(profile, cfg.method, cfg.max_prune_ratio, cfg.prune_options)


def _eval_windows(cfg: RunConfig, model: PreTrainedModel, tokenizer: Any, digest: str | None) -> torch.Tensor:
    ev = cfg.eval
    if ev.source is None:
        seed = cfg.calib.seed + 1_000
        return generated_windows(
            model, tokenizer, ev.num_samples, ev.seq_len, seed, digest, cfg.force, "evaluation text"
        )
    return first_windows(read_text(ev.source), tokenizer, ev.num_samples, ev.seq_len, where=ev.source)


class _Laps:
    """Seconds per part of a stage, for the report: where a first run's time goes."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] = round(now - self._t, 1)
        self._t = now


DENSE_PPL = "perplexity (dense)"


def _dense_perplexity(memo: Memo, model: PreTrainedModel, evals: torch.Tensor) -> float:
    """The dense model's perplexity on the evaluation windows (remembered across targets)."""
    ppl = memo.value(DENSE_PPL, evals, lambda: perplexity(model, evals, desc="perplexity (dense)"), batch_size=4)
    log.info("dense perplexity %.2f", ppl)
    return ppl


def _prune_stage(cfg: RunConfig, profile: DeviceProfile, out: Path, key: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    laps = _Laps()
    loaded = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, force=cfg.force)
    laps.lap("load model")
    model, tok = loaded.model, loaded.tokenizer
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and profile.context_length > max_pos:
        raise ConfigError(
            f"Profile '{profile.name}' asks for context_length {profile.context_length}, but {loaded.source} "
            f"supports at most {max_pos} positions. Lower context_length in the profile or pick a model "
            "with a longer context."
        )
    # generated text (pipeline/calib_cache.py) and the dense model's measurements (pipeline/memo.py)
    # are remembered per model content, across targets
    digest = loaded.digest or content_digest(resolve_model_path(cfg.model))
    memo = Memo(digest, force=cfg.force)
    calib = load_calibration(cfg.calib, model, tok, digest, cfg.force, scoring=PPL_WINDOWS)
    evals = _eval_windows(cfg, model, tok, digest)
    tensors_path = out / "calibration.safetensors"

    def save_windows() -> None:  # the calibration windows read so far (all of them only once it pruned)
        with atomic_path(tensors_path) as tmp:
            save_file({"calibration": calib.at_hand.contiguous(), "evaluation": evals.contiguous()}, str(tmp))

    save_windows()
    laps.lap("calibration and evaluation text")
    fit = None
    if profile.precision == "auto":  # choose each runtime's precision first: prune only for what it cannot reach
        held_out = calib.full if calib.rest is not None else None  # generated: its whole set, another seed
        fit = choose_precision(
            model, calib.head, profile, _prune_config(cfg, profile), memo, held_out, generated=calib.generated
        ).to_dict()
        profile = fitted_profile(profile, fit)
        laps.lap("precision choice")
    # The dense perplexity is the gates' reference. When nothing is pruned the model stays dense, and
    # it is measured while ExecuTorch's export runs (``_validator``), off the critical path (~25 s);
    # when something will be, it is measured now, before pruning changes the model.
    prune_cfg = _prune_config(cfg, profile)
    ppl_dense = memo.known(DENSE_PPL, evals, batch_size=4)
    if ppl_dense is None and will_prune(model, profile, prune_cfg):
        ppl_dense = _dense_perplexity(memo, model, evals)
    laps.lap("dense perplexity")
    plan = prune_to_budget(model, calib.full, profile, prune_cfg)
    if any(profile.rounds_by_gptq(rt) for rt in profile.runtimes):
        calib.full()  # GPTQ's Hessians at export read the whole set (saved below), not the 8 scoring windows
    laps.lap("pruning")
    ppl_pruned: float | None
    if plan.steps:
        assert ppl_dense is not None  # measured above: will_prune said so
        ppl_pruned = perplexity(model, evals, desc="perplexity (pruned)")
        log.info("pruned perplexity %.2f (%.2fx)", ppl_pruned, ppl_pruned / ppl_dense)
    else:  # nothing removed: the model is the dense one (the reload check below still holds it to that)
        ppl_pruned = ppl_dense
    model_dir = save_model(model, tok, out / "pruned_model", plan.record)
    check_round_trip(model, model_dir, calib.head[:1, :64])
    if calib.at_hand is not calib.head:  # pruning generated the whole set
        save_windows()
    laps.lap("pruned perplexity (if pruned), save, reload check")
    result = {
        "plan": plan.to_dict(),
        "perplexity": {"dense": ppl_dense, "pruned": ppl_pruned},
        "fit": fit,
        "timings": laps.parts,
    }
    plan_path = atomic_write_json(out / "prune_plan.json", result)
    write_manifest(
        out, "prune", key, [model_dir, plan_path, tensors_path], time.perf_counter() - t0, result["perplexity"]
    )
    return result


def run_pipeline(cfg: RunConfig, profile: DeviceProfile | None = None) -> dict[str, Any]:
    """Run every stage for ``cfg.target``; raise GateError (after writing the report) if a gate fails.
    ``profile``: the target's profile, already loaded (the CLI resolves it once); else loaded here."""
    profile = profile or load_profile(cfg.target)
    if cfg.max_prune_ratio is not None and not 0 < cfg.max_prune_ratio < 1:
        raise ConfigError(f"--max-prune-ratio must be in (0, 1), got {cfg.max_prune_ratio}.")
    prune_cfg = _prune_config(cfg, profile)  # the method and its knobs are valid before any model loads
    for runtime in profile.runtimes:
        check_runtime_available(runtime)
    model_path = resolve_model_path(cfg.model)
    # the budget's floor, from the config alone: an impossible budget fails before any weight is read
    # (precision: auto at its most compressed: what each runtime it may choose holds the least in)
    skel = skeleton(load_config(model_path, trust_remote_code=cfg.trust_remote_code))
    check_feasible(skel, most_compressed(profile, floor_shape(skel, prune_cfg)), prune_cfg)
    if cfg.calib.source is not None:
        read_text(cfg.calib.source)  # fail on a bad calibration file before loading the model
    if cfg.eval.source is not None:
        read_text(cfg.eval.source)
    out = ensure_writable_dir(cfg.resolved_out_dir(profile))
    with exclusive_lock(out):
        stale = remove_stale_temps(out)
        if stale:
            log.info("removed %d temp file(s) left by an interrupted run", len(stale))
        return _run_stages(cfg, profile, out, model_path)


def _source_fingerprint(source: str | None) -> Any:
    """Identity of a text source for cache keys: the file(s) when local, else the spec string."""
    if source is not None and Path(source).expanduser().exists():
        return fingerprint_path(Path(source).expanduser())
    return source


def _run_stages(cfg: RunConfig, profile: DeviceProfile, out: Path, model_path: Path) -> dict[str, Any]:
    # never oversubscribe: an explicit count is capped at the CPUs we have, the default is all of them
    torch.set_num_threads(local_threads(cfg.threads).used if cfg.threads else available_cpus().count)
    atomic_write_text(out / "profile.yaml", _profile_yaml(profile))
    atomic_write_json(out / "run_config.json", {**asdict(cfg), "out_dir": str(out), "model_path": str(model_path)})
    stages: dict[str, dict[str, Any]] = {}

    prune_key = stage_key(
        model=fingerprint_path(model_path),
        calib=asdict(cfg.calib),
        calib_data=_source_fingerprint(cfg.calib.source),
        eval=asdict(cfg.eval),
        eval_data=_source_fingerprint(cfg.eval.source),
        prune=_prune_config(cfg, profile).model_dump(),
        profile=profile.model_dump(),
        # the memory model's calibrated constants decide how much is pruned: a recalibration redoes it
        memory_model={
            **{rt: asdict(spec) for rt, spec in RUNTIME_TABLE.items()},
            **{name: asdict(spec) for name, spec in SCHEME_TABLE.items()},
            **{f"embedding-{name}": asdict(spec) for name, spec in EMBEDDING_TABLE.items()},
        },
        versions=package_versions(),
        code=source_digest("core", "exporters", "pipeline"),  # exporters: the fit simulates their rounding
    )
    t0 = time.perf_counter()
    fresh = None if cfg.force else is_fresh(out, "prune", prune_key)
    if fresh:
        log.info("prune stage up to date (inputs unchanged); reusing %s", out / "pruned_model")
        result = json.loads((out / "prune_plan.json").read_text())
    else:
        result = _prune_stage(cfg, profile, out, prune_key)
    stages["prune"] = {
        "wall_s": time.perf_counter() - t0 if not fresh else fresh["wall_s"],
        "cached": bool(fresh),
        "details": {"parts": result.get("timings", {})},
    }
    if result.get("fit"):  # precision: auto chose the schemes: export and validate with them
        profile = fitted_profile(profile, result["fit"])
        atomic_write_text(out / "profile.yaml", _profile_yaml(profile))

    artifacts: dict[Runtime, Path] = {}
    model = _load_pruned(out)
    profile, format_note = resolve_onnx_format(profile, model)
    if format_note:
        atomic_write_text(out / "profile.yaml", _profile_yaml(profile))
    export_cfg = _export_config(profile)
    export_code = source_digest("core", "exporters")
    jobs: list[tuple[str, ExportConfig]] = []
    keys: dict[str, str] = {}
    for runtime in profile.runtimes:
        exporter = get_exporter(runtime)
        rt_cfg = runtime_export_config(export_cfg, profile, runtime, out)
        keys[runtime] = stage_key(
            prune=prune_key,
            export=asdict(rt_cfg),
            runtime=runtime,
            versions=package_versions(),
            code=export_code,
        )
        artifacts[runtime] = out / exporter.artifact_name(rt_cfg)
        fresh = None if cfg.force else is_fresh(out, f"export-{runtime}", keys[runtime])
        if fresh:
            log.info("export-%s up to date; reusing %s", runtime, artifacts[runtime])
            stages[f"export-{runtime}"] = {"wall_s": fresh["wall_s"], "cached": True, "details": fresh["metrics"]}
        else:
            jobs.append((runtime, rt_cfg))

    formats = {runtime: rt_cfg.onnx_format for runtime, rt_cfg in jobs}

    def exported(runtime: str, art: ExportArtifact, wall: float) -> None:
        """One export finished: its manifest (what makes a rerun reuse it) and its stage entry."""
        details = {**art.details, "export_s": art.export_s, "size_bytes": art.size_bytes}
        if format_note and runtime == "onnxruntime":
            details["format_fallback"] = format_note
        files = artifact_files(art.path)
        filename = get_exporter(runtime).filename
        if formats[runtime] == "genai":  # the folder an app loads: graph, genai_config, tokenizer
            files = sorted(f for f in art.path.parent.iterdir() if f.is_file())
        elif art.path.name != filename:  # model.ort: the .onnx it came from ships too
            files += artifact_files(out / filename)
        write_manifest(out, f"export-{runtime}", keys[runtime], files, wall, details)
        stages[f"export-{runtime}"] = {"wall_s": wall, "cached": False, "details": details}

    validator: Validator | None = None
    overlapped = 0.0

    def idle(exporting: set[str]) -> None:
        """While a child process still exports: the PyTorch references (the dense perplexity if the
        prune stage left it), then validate the artifacts already written."""
        nonlocal overlapped, validator
        t0 = time.perf_counter()
        checker = validator = validator or _validator(out, profile, model, result, model_path, cfg.force)
        for runtime, path in artifacts.items():
            if runtime not in exporting:
                beside = f"the {', '.join(sorted(exporting))} export"
                log.info("validating %s while %s runs", runtime, beside)
                checker.run(runtime, path, beside)
        checker.prepare([rt for rt in artifacts if rt in exporting])  # the references the rest are held to
        overlapped = time.perf_counter() - t0

    run_exports(model, jobs, out, exported, idle)
    stages = {name: stages[name] for name in ["prune", *(f"export-{rt}" for rt in profile.runtimes)]}
    return validate_and_report(
        out, profile, model, artifacts, result, stages, cfg, model_path, validator, overlapped
    )  # fmt: skip


def _export_config(profile: DeviceProfile) -> ExportConfig:
    return ExportConfig(
        seq_len=profile.prefill_tokens,
        max_cache_len=profile.context_length,
        batch_size=profile.batch_size,
        target_arch=profile.cpu.arch,
    )


def runtime_export_config(
    base: ExportConfig, profile: DeviceProfile, runtime: Runtime, out: Path | None = None
) -> ExportConfig:
    """The profile's per-runtime choices: quantization schemes (linear, embedding), the ONNX format
    (GenAI ships the tokenizer saved with the pruned model in ``out``)."""
    onnx_format = profile.onnx_format if runtime == "onnxruntime" else "onnx"
    return replace(
        base,
        quantize=profile.quantize.get(runtime),
        quantize_embedding=profile.quantize_embedding.get(runtime),
        quantize_head=profile.quantize_head.get(runtime),
        onnx_format=onnx_format,
        tokenizer_dir=out / "pruned_model" if onnx_format == "genai" and out is not None else None,
        calibration=out / "calibration.safetensors" if out is not None and profile.rounds_by_gptq(runtime) else None,
    )


def resolve_onnx_format(profile: DeviceProfile, model: PreTrainedModel) -> tuple[DeviceProfile, str | None]:
    """The onnxruntime format this run writes: ``onnx_format: genai`` unless the GenAI format cannot
    represent the pruned ``model`` or its scheme (``exporters.genai.unsupported_reason``). Then, with
    ``onnx_fallback``, the profile with the fallback format and a note saying what and why (the report
    shows it); without, an ExportError before any export starts."""
    if profile.onnx_format != "genai" or "onnxruntime" not in profile.runtimes:
        return profile, None
    from exporters.genai import unsupported_reason

    why = unsupported_reason(model, runtime_export_config(_export_config(profile), profile, "onnxruntime"))
    if why is None:
        return profile, None
    if profile.onnx_fallback is None:
        raise ExportError(
            f"Profile '{profile.name}' asks for onnx_format: genai, which cannot represent {why}. Nothing was "
            "exported. Set onnx_fallback: onnx to write the plain graph instead, or onnx_format: onnx."
        )
    note = f"written as onnx_format: {profile.onnx_fallback}, since the GenAI format cannot represent {why}"
    log.warning("onnxruntime artifact %s (onnx_fallback)", note)
    return profile.model_copy(update={"onnx_format": profile.onnx_fallback, "onnx_fallback": None}), note


def _load_pruned(out: Path) -> PreTrainedModel:
    return load_pruned(out / "pruned_model")


def validate_and_report(
    out: Path,
    profile: DeviceProfile,
    model: PreTrainedModel,
    artifacts: dict[Runtime, Path],
    result: dict[str, Any],
    stages: dict[str, dict[str, Any]],
    cfg: RunConfig,
    model_path: Path | str,
    validator: Validator | None = None,
    overlapped_s: float = 0.0,
) -> dict[str, Any]:
    """Run the artifacts on the profile (those ``validator`` has not run yet, e.g. while another
    exported), write report.json/report.md, then raise if a gate failed."""
    validator = validator or _validator(out, profile, model, result, model_path, cfg.force)
    t0 = time.perf_counter()
    report_obj = validator.run_all(artifacts)
    stages["validate"] = {
        "wall_s": time.perf_counter() - t0 + overlapped_s,
        "cached": False,
        "details": {"overlapped_with_export_s": round(overlapped_s, 1)} if overlapped_s else {},
    }
    report = Report(
        model=str(model_path),
        eval_source=cfg.eval.source or "model-generated text (held-out seed)",
        calib_source=cfg.calib.source or "model-generated text",
        profile=profile.model_dump(),
        prune=result["plan"],
        fit=result.get("fit"),
        validation=report_obj,
        stages=stages,
        versions=package_versions(),
        artifacts={rt: str(p.relative_to(out)) for rt, p in artifacts.items()} | {"pruned_model": "pruned_model"},
    )
    missing = [name for name in report.artifacts.values() if not (out / name).exists()]
    if missing:  # never publish a report that claims files which are not there
        raise ExportError(f"Artifacts {missing} are missing from {out}; rerun with --force.")
    write_report(out, report)
    log.info("report: %s", out / "report.md")
    report_obj.raise_if_failed()
    return report.model_dump()


def validate_existing(out: Path, target: str | None = None) -> dict[str, Any]:
    """Re-validate the artifacts of an earlier run in ``out`` (``prunefit validate``)."""

    run_cfg_path = out / "run_config.json"
    if not (out / "prune_plan.json").is_file() or not run_cfg_path.is_file():
        raise ExportError(f"{out} holds no finished prunefit run (no prune_plan.json); run `prunefit export` first.")
    saved = json.loads(run_cfg_path.read_text())
    result = json.loads((out / "prune_plan.json").read_text())
    profile = fitted_profile(load_profile(target or saved["target"]), result.get("fit"))
    model = _load_pruned(out)
    profile, _ = resolve_onnx_format(profile, model)
    artifacts: dict[Runtime, Path] = {}
    for runtime in profile.runtimes:
        path = out / get_exporter(runtime).artifact_name(
            runtime_export_config(_export_config(profile), profile, runtime, out)
        )
        if not path.is_file():
            raise ExportError(f"{path} is missing; run `prunefit export --target {profile.name}` to create it.")
        artifacts[runtime] = path
    cfg = RunConfig(
        target=profile.name,
        model=saved["model"],
        eval=EvalConfig(**saved["eval"]),
        calib=DataConfig(**saved["calib"]),
    )
    return validate_and_report(out, profile, model, artifacts, result, {}, cfg, saved["model_path"])


def _validator(
    out: Path,
    profile: DeviceProfile,
    model: PreTrainedModel,
    result: dict[str, Any],
    model_path: Path | str,
    force: bool = False,
) -> Validator:
    """The run's validation: the held-out evaluation windows saved by the prune stage, the
    PyTorch perplexities the gates compare with. A prune stage that pruned nothing left the dense
    perplexity to be measured here, on ``model`` (the dense one), and ``result`` gets it."""
    tensors = load_file(str(out / "calibration.safetensors"))
    ppl = result["perplexity"]
    if ppl["dense"] is None:
        memo = Memo(content_digest(Path(model_path)), force=force)
        ppl["dense"] = ppl["pruned"] = _dense_perplexity(memo, model, tensors["evaluation"])
    return Validator(
        profile,
        model,
        _validation_inputs(tensors["evaluation"], profile),
        out / "validation",
        dict(result["perplexity"]),
        eval_windows=tensors["evaluation"],
    )


def _validation_inputs(evals: torch.Tensor, profile: DeviceProfile) -> torch.Tensor:
    """Real held-out tokens shaped (batch, prefill_tokens): what the static-shape artifacts take."""
    flat = evals.reshape(-1)
    need = profile.batch_size * profile.prefill_tokens
    if flat.numel() < need:
        raise CalibrationError(
            f"Evaluation text has {flat.numel()} tokens; validation needs {need} (batch x prefill_tokens)."
        )
    return flat[:need].view(profile.batch_size, profile.prefill_tokens).clone()


def _profile_yaml(profile: DeviceProfile) -> str:
    import yaml

    return "# Resolved profile used for this run (all defaults filled in).\n" + yaml.safe_dump(
        profile.model_dump(mode="json"), sort_keys=False
    )
