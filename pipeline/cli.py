"""``prunefit`` command line: export (the whole pipeline), validate, profiles.

User errors (every :class:`PrunefitError`) print one message and exit with the error's own code;
tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ConfigError, ModelLoadError, PrunefitError
from core.logs import configure_logging
from core.methods import METHODS, method_keys

if TYPE_CHECKING:
    from targets.profile import DeviceProfile


log = logging.getLogger("prunefit")


def _setup_logging(verbosity: int, log_file: Path | None = None) -> None:
    configure_logging({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG), log_file)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prunefit", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="prune to the profile's budget, export, validate (the whole job)")
    ex.add_argument("--target", required=True, help="profile name (see `prunefit profiles`) or path to a profile YAML")
    ex.add_argument(
        "--model", default="default", help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)"
    )
    ex.add_argument("--out", type=Path, default=None, help="output directory (default: artifacts/<target>)")
    ex.add_argument(
        "--calib",
        default=None,
        help="calibration text: file, directory of .txt/.jsonl, or hf:NAME[:CONFIG[:SPLIT]] "
        "(default: seeded model-generated text)",
    )
    ex.add_argument("--num-samples", type=int, default=256, help="calibration windows (comp wants many)")
    ex.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    ex.add_argument(
        "--eval",
        dest="eval_source",
        default=None,
        help="held-out text for perplexity (default: held-out model-generated text)",
    )
    ex.add_argument("--eval-samples", type=int, default=16)
    ex.add_argument("--eval-seq-len", type=int, default=512)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument(
        "--max-prune-ratio",
        type=float,
        default=None,
        help="most decoder blocks that may be removed, as a fraction (overrides the profile)",
    )
    ex.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="pruning method (overrides the profile): depth = whole blocks (Block Influence); width = MLP "
        "channels + KV groups, energy scores, least-squares compensation; comp = layer-wise blocks + "
        "channels + KV groups, condition-aware scores, compensation on the pruned stream; multipruner = "
        "blocks + channels + KV groups in a fixed mix, each step the one that raises calibration perplexity least",
    )
    ex.add_argument(
        "--prune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a knob of the pruning method's config (repeatable; e.g. ridge=0.02 for comp); overrides the "
        "profile's pruning section, and an unknown key is an error listing the method's keys",
    )
    ex.add_argument(
        "--precision",
        choices=("auto", "fp32"),
        default=None,
        help="overrides the profile's precision: auto = each runtime's weights fp32 or quantized, chosen with "
        "the pruning for the least calibration loss that fits; fp32 = fp32 weights (or the profile's quantize "
        "pins) and pruning for the rest",
    )
    ex.add_argument(
        "--runtimes",
        default=None,
        metavar="RT[,RT]",
        help="export for these of the profile's runtimes only (comma-separated; e.g. onnxruntime where "
        "ExecuTorch cannot fit the budget); their pins and overheads are the profile's",
    )
    ex.add_argument(
        "--force",
        action="store_true",
        help="redo every stage even if its inputs did not change, and renew what the user cache keeps for "
        "this model (generated text, the converted GGUF, the dense model's measurements)",
    )
    ex.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    _add_common(ex)

    va = sub.add_parser("validate", help="re-run validation on the artifacts of an earlier export")
    va.add_argument("--out", type=Path, required=True, help="artifacts directory of an earlier `prunefit export`")
    va.add_argument("--target", default=None, help="profile to validate against (default: the one exported for)")
    _add_common(va)

    em = sub.add_parser(
        "emulate", help="run an earlier export's ONNX artifact on the profile's aarch64 core under qemu-user"
    )
    em.add_argument("--out", type=Path, required=True, help="artifacts directory of an earlier `prunefit export`")
    em.add_argument("--target", default=None, help="profile (default: the one exported for)")
    em.add_argument(
        "--allow-skip", action="store_true", help="exit 0 when qemu-user is missing (default: exit 11, nothing checked)"
    )
    em.add_argument("--require", action="store_true", help=argparse.SUPPRESS)  # the default now
    _add_common(em)

    rp = sub.add_parser("report", help="re-render report.md from the report.json of an earlier run")
    rp.add_argument("--out", type=Path, required=True, help="artifacts directory of an earlier `prunefit export`")
    _add_common(rp)

    pn = sub.add_parser(
        "prune",
        help="prune a checkpoint directory to a profile's budget (or a ratio) block by block, "
        "never holding the whole model (method comp)",
    )
    pn.add_argument("--model", type=Path, required=True, help="HF model directory (config.json + *.safetensors)")
    pn.add_argument("--target", required=True, help="profile name or YAML (its budget, unless --ratio)")
    pn.add_argument("--ratio", type=float, default=None, help="remove this share of decoder-block parameters")
    pn.add_argument("--calib", required=True, help="calibration text: file or directory of .txt/.jsonl")
    pn.add_argument("--num-samples", type=int, default=256)
    pn.add_argument("--seq-len", type=int, default=128)
    pn.add_argument("--seed", type=int, default=0)
    pn.add_argument("--out", type=Path, required=True, help="output model directory (written atomically)")
    _add_common(pn)

    cp = sub.add_parser("compare", help="several runs side by side (Markdown table)")
    cp.add_argument("dirs", type=Path, nargs="+", help="artifacts directories of earlier runs")
    _add_common(cp)

    pr = sub.add_parser("profiles", help="list the device profiles and their budgets")
    _add_common(pr)
    return ap


def _cmd_profiles() -> int:
    from targets.profile import load_profiles, profiles_dir

    profiles = load_profiles()
    print(f"Device profiles in {profiles_dir()}:")
    print(f"{'name':<20} {'budget MiB':>10} {'RAM MiB':>8} {'context':>8} {'arch':<8} runtimes  device")
    for name, p in profiles.items():
        print(
            f"{name:<20} {p.memory_budget_mib:>10} {p.ram_mib:>8} {p.context_length:>8} {p.cpu.arch:<8} "
            f"{','.join(p.runtimes)}  {p.device}"
        )
    return 0


def _prune_options(pairs: list[str], method: str | None) -> dict[str, object]:
    """``--prune-set KEY=VALUE`` pairs; values are YAML scalars or lists (``0.05``, ``true``, ``[0.5, 0.5, 0]``)."""
    import yaml

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            keys = ", ".join(method_keys(method)) if method else "see the method's keys in core/methods.py"
            raise ConfigError(f"--prune-set takes KEY=VALUE, got '{pair}' (keys: {keys}).")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--prune-set {key}: cannot read value '{value}': {exc}") from None
    return out


def _cmd_export(args: argparse.Namespace, profile: DeviceProfile) -> int:
    from pipeline.data import DataConfig
    from pipeline.run import EvalConfig, RunConfig, run_pipeline

    cfg = RunConfig(
        target=args.target,
        model=args.model,
        out_dir=args.out,
        calib=DataConfig(source=args.calib, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed),
        eval=EvalConfig(source=args.eval_source, num_samples=args.eval_samples, seq_len=args.eval_seq_len),
        max_prune_ratio=args.max_prune_ratio,
        method=args.method,
        prune_options=_prune_options(args.prune_set, args.method),
        force=args.force,
        trust_remote_code=args.trust_remote_code,
    )
    if args.precision is not None:
        profile = profile.model_copy(update={"precision": args.precision})
    if args.runtimes is not None:
        profile = profile.with_runtimes([rt.strip() for rt in args.runtimes.split(",") if rt.strip()])  # type: ignore[misc]
    report = run_pipeline(cfg, profile)
    v = report["validation"]
    log.info(
        "PASS: %d gates passed; report in %s",
        len(v["gates"]),
        (args.out or Path("artifacts") / report["profile"]["name"]) / "report.md",
    )
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    """Streamed pruning of a checkpoint; prints the plan summary (with peak RSS) as JSON."""
    import json
    import time

    from transformers import AutoTokenizer

    from core.measure import peak_rss_bytes
    from pipeline.checkpoint import prune_checkpoint
    from pipeline.data import read_text, tokenize_windows
    from targets.profile import load_profile

    profile = load_profile(args.target)
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"No usable tokenizer in {args.model}: {exc}") from None
    calib = tokenize_windows(read_text(args.calib), tok, args.num_samples, args.seq_len, args.seed, where=args.calib)
    cfg = profile.prune_config(method="comp", target_decoder_ratio=args.ratio)
    plan = prune_checkpoint(args.model, calib, profile, cfg, args.out)
    summary = {
        "out": str(args.out),
        "params_before": plan.params_before,
        "params_after": plan.params_after,
        "removed_layers": plan.removed_layers,
        "after_worst_mib": plan.after["worst_mib"],
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mib": peak_rss_bytes() / 2**20,
    }
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbosity = -1 if args.quiet else (1 if args.verbose else 0)
    log_file = None
    profile: DeviceProfile | None = None
    if args.command == "export":
        from targets.profile import load_profile

        try:  # resolved once, here, and passed on: creating OUT below must not change what a name means
            profile = load_profile(args.target)
            log_file = (args.out or Path("artifacts") / profile.name) / "prunefit.log"
        except PrunefitError:
            log_file = None  # reported below with the proper message
    _setup_logging(verbosity, log_file)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "profiles":
            return _cmd_profiles()
        if args.command == "export":
            if profile is None:
                from targets.profile import load_profile

                profile = load_profile(args.target)  # raises the ProfileError with its message
            return _cmd_export(args, profile)
        if args.command == "prune":
            return _cmd_prune(args)
        if args.command == "compare":
            from targets.compare import compare

            print(compare(args.dirs), end="")
            return 0
        if args.command == "emulate":
            from targets.emulate import main as emulate_main

            argv = [str(args.out), *(["--target", args.target] if args.target else [])]
            return emulate_main(argv + (["--allow-skip"] if args.allow_skip else []))
        if args.command == "report":
            from targets.report import rerender

            print(rerender(args.out))
            return 0
        if args.command == "validate":
            from pipeline.run import validate_existing

            validate_existing(args.out, args.target)
            log.info("PASS: report in %s", args.out / "report.md")
            return 0
    except PrunefitError as exc:
        if args.debug:
            raise
        print(f"prunefit: error ({type(exc).__name__}): {exc}", file=sys.stderr)
        return exc.exit_code
    return 2


if __name__ == "__main__":
    sys.exit(main())
