"""Run an exported artifact on the target's instruction set, under qemu-user (aarch64).

Profiles for phones, Pis and Jetsons declare ``cpu.arch: aarch64``; the local validation runs the
x86-64 build of the runtime. This mode proves the artifact also loads and computes the same thing on
the target ISA: the same ``targets/runner.py`` the device scripts ship runs under
``qemu-aarch64`` with Debian's arm64 Python and the aarch64 onnxruntime/numpy wheels from PyPI (the
versions the lock file pins). The emulated CPU follows the profile's features (no dotprod:
Cortex-A72, so onnxruntime picks the same kernels as on a Pi 4; dotprod: Cortex-A76), and the
files the runtime reads to identify the CPU (``/proc/cpuinfo``, ``/sys/devices/system/cpu/*``) are
served from the arm64 root, which qemu's ``-L`` prefix puts first.

The run's tokens and logits are compared with the local run of the same artifact on the same prompt
(``validation/<runtime>_generation.npz``) and held to the profile's gates: fp32 gives identical
greedy tokens and logits within ``parity_atol``; quantized artifacts (whose integer kernels differ
by ISA) keep top-1 agreement >= ``quantized_min_top1``. The result joins ``report.json`` under
``device_runs`` with ``emulated`` set. Timings and memory under emulation are the emulator's, not a
device's, and are labelled so.

Only onnxruntime: ExecuTorch's Python runtime imports torch, and PyPI's aarch64 torch wheel for the
pinned 2.13.0 is a CUDA build that needs several GB of NVIDIA libraries to import (the CPU-only
aarch64 builds are on download.pytorch.org, which this machine does not reach).

``python -m targets.emulate OUT_DIR [--runtime onnxruntime] [--root DIR]``; ``make validate-emulated``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.cpus import local_threads
from core.errors import ConfigError, EmulationSkippedError, GateError, PrunefitError, RuntimeMissingError
from targets.device import compare_with_local, merge
from targets.gates import Gate, emulated_gates
from targets.profile import DeviceProfile, load_profile

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock.txt"
SUITE = "bookworm"  # Debian 12: python3.11, the same minor version as the host (cp311 wheels)
PYTHON = "python3.11"
WHEELS = ("onnxruntime", "numpy")  # what targets/runner.py imports, pinned from the lock file
QEMU = ("qemu-aarch64-static", "qemu-aarch64")
EMULATED_RUNTIMES = ("onnxruntime",)


class EmulationUnavailable(RuntimeMissingError):
    """qemu-user (or what builds the arm64 root) is not installed: the emulated run is skipped."""


@dataclass(frozen=True)
class Core:
    """A CPU core as qemu models it and as /proc/cpuinfo on that core reads (Arm's MIDR fields)."""

    qemu_cpu: str
    part: int
    variant: int
    features: str  # the kernel's HWCAP names, as /proc/cpuinfo lists them


CORES = {
    # ARMv8.0-A (Raspberry Pi 4's BCM2711 has no crypto extension): no dotprod, no fp16 arithmetic
    "cortex-a72": Core("cortex-a72", 0xD08, 0x0, "fp asimd evtstrm crc32 cpuid"),
    # ARMv8.2-A with dotprod and fp16 arithmetic (Pi 5, phones' big/mid cores, Jetson Orin's A78AE)
    "cortex-a76": Core(
        "cortex-a76",
        0xD0B,
        0x4,
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
    ),
}


def core_for(profile: DeviceProfile) -> str:
    """The emulated core with the profile's ISA features (what the runtime's kernel dispatch sees)."""
    if profile.cpu.arch != "aarch64":
        raise ConfigError(
            f"Profile '{profile.name}' declares cpu.arch {profile.cpu.arch}: emulation is for aarch64 targets "
            "(run `prunefit validate` for this one)."
        )
    feats = set(profile.cpu.features)
    return "cortex-a76" if {"dotprod", "fp16"} & feats else "cortex-a72"


def find_qemu() -> str:
    for name in QEMU:
        path = shutil.which(name)
        if path:
            return path
    raise EmulationUnavailable(
        "qemu-user for aarch64 is not installed (looked for qemu-aarch64-static, qemu-aarch64): "
        "`apt-get install qemu-user-static` installs it."
    )


def _pins() -> dict[str, str]:
    text = LOCK.read_text()
    pins = {}
    for name in WHEELS:
        m = re.search(rf"^{name}==(\S+)", text, re.M)
        if not m:
            raise ConfigError(f"{LOCK} pins no version of {name}; the emulated root installs the pinned one.")
        pins[name] = m.group(1)
    return pins


@dataclass(frozen=True)
class EmulatedRoot:
    """An arm64 Debian userland with Python and the runtime: what qemu's ``-L`` prefix points at."""

    path: Path

    @property
    def python(self) -> Path:
        return self.path / "usr" / "bin" / PYTHON

    @property
    def site(self) -> Path:
        return self.path / "opt" / "prunefit-site"

    @property
    def stamp(self) -> Path:
        return self.path / ".prunefit-root.json"


def default_root_dir() -> Path:
    env = os.environ.get("PRUNEFIT_EMULATION_ROOT")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "prunefit" / f"aarch64-{SUITE}-{PYTHON}"


def _run(cmd: list[str], what: str, **kw: Any) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise EmulationUnavailable(f"{what} failed (exit {proc.returncode}): {tail.strip()}")


def ensure_root(path: Path | None = None, mirror: str | None = None) -> EmulatedRoot:
    """Build the arm64 root once (debootstrap's first stage, unpacked; pip wheels for aarch64).

    Rebuilt only when its recipe changes (suite, Python, pinned wheels). Built in a temporary
    directory beside it and renamed into place, so an interrupted build leaves nothing half-made.
    The second stage of debootstrap (maintainer scripts, run inside the root) is not needed to run
    one interpreter: the packages are unpacked with dpkg-deb, which runs nothing.
    """
    root = EmulatedRoot(path or default_root_dir())
    pins = _pins()
    recipe = {"suite": SUITE, "python": PYTHON, "wheels": pins}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    if root.stamp.is_file() and json.loads(root.stamp.read_text()).get("key") == key and root.python.is_file():
        return root
    for tool, pkg in (("debootstrap", "debootstrap"), ("dpkg-deb", "dpkg")):
        if not shutil.which(tool):
            raise EmulationUnavailable(f"{tool} is not installed: `apt-get install {pkg}` (it builds the arm64 root).")
    if os.geteuid() != 0:
        raise EmulationUnavailable(
            f"Building the arm64 root with debootstrap needs root; build it once as root or point "
            f"PRUNEFIT_EMULATION_ROOT at a root built elsewhere ({root.path})."
        )
    mirror = mirror or os.environ.get("PRUNEFIT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    root.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.path.name}.", dir=root.path.parent))
    try:
        t = time.perf_counter()
        log.info("building the arm64 root in %s (debootstrap %s from %s, %s)", root.path, SUITE, mirror, pins)
        _run(
            ["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", f"--include={PYTHON}",
             SUITE, str(tmp), mirror],
            "debootstrap (arm64 first stage)",
        )  # fmt: skip
        archives = tmp / "var" / "cache" / "apt" / "archives"
        for deb in sorted(archives.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
            deb.unlink()
        version = PYTHON.removeprefix("python")
        _run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
             "--target", str(tmp / "opt" / "prunefit-site"), "--only-binary=:all:", "--implementation", "cp",
             "--python-version", version, "--abi", "cp" + version.replace(".", ""),
             "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
             *(f"{n}=={v}" for n, v in pins.items())],
            "pip install of the aarch64 wheels",
        )  # fmt: skip
        (tmp / ".prunefit-root.json").write_text(json.dumps({"key": key, **recipe}, indent=1))
        if root.path.exists():
            shutil.rmtree(root.path)
        os.replace(tmp, root.path)
        log.info("arm64 root ready in %.0f s", time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _cpu_files(root: EmulatedRoot, core: Core, cores: int) -> None:
    """What the runtime reads to identify the CPU: without these it reads the host's x86 cpuinfo
    (qemu passes /proc/cpuinfo through) and onnxruntime's cpuinfo crashes at import."""
    blocks = [
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {core.features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: {core.variant:#x}\nCPU part\t: {core.part:#x}\nCPU revision\t: 1\n"
        for i in range(cores)
    ]
    (root.path / "proc").mkdir(exist_ok=True)
    (root.path / "proc" / "cpuinfo").write_text("\n".join(blocks))
    sysdir = root.path / "sys" / "devices" / "system" / "cpu"
    sysdir.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (sysdir / name).write_text(f"0-{cores - 1}\n" if cores > 1 else "0\n")


@dataclass(frozen=True)
class EmulationConfig:
    """One emulated validation of the artifacts in ``out_dir``."""

    out_dir: Path
    runtime: str = "onnxruntime"
    target: str | None = None  # profile name or YAML; default: the one the artifacts were made for
    root_dir: Path | None = None
    timeout_s: float = 3600.0


@dataclass
class EmulationResult:
    label: str
    core: str
    measured: dict[str, Any]
    comparison: dict[str, Any]
    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def _onnx_artifact(out_dir: Path) -> Path:
    for name in ("model.ort", "model.onnx"):
        if (out_dir / name).is_file():
            return out_dir / name
    raise ConfigError(f"No ONNX artifact in {out_dir}: run `make export` for it first.")


def run(cfg: EmulationConfig) -> EmulationResult:
    """Run the artifact under qemu-aarch64, compare with the local run, merge into the report."""
    if cfg.runtime not in EMULATED_RUNTIMES:
        raise EmulationUnavailable(
            f"No aarch64 {cfg.runtime} runtime installs here: ExecuTorch's Python runtime imports torch, and "
            "PyPI's aarch64 torch 2.13.0 is a CUDA build (CPU aarch64 wheels are on download.pytorch.org). "
            "Use scripts/validate_ssh.sh on the device for the .pte."
        )
    out = cfg.out_dir
    profile = load_profile(cfg.target) if cfg.target else load_profile(out / "profile.yaml", check_stem=False)
    core = core_for(profile)
    qemu = find_qemu()
    inputs = out / "validation" / f"{cfg.runtime}_inputs.npy"
    if not inputs.is_file():
        raise ConfigError(f"{inputs} is missing: run `prunefit validate --out {out}` first.")
    artifact = _onnx_artifact(out)
    root = ensure_root(cfg.root_dir)
    _cpu_files(root, CORES[core], profile.cpu.cores)
    label = f"qemu-aarch64 {core} (emulated)"
    threads = local_threads(profile.threads).used  # qemu-user runs each guest thread on a host thread
    with tempfile.TemporaryDirectory(prefix="prunefit-emu-") as tmp:
        gen = Path(tmp) / "generation.npz"
        cmd = [
            qemu, "-cpu", CORES[core].qemu_cpu, "-L", str(root.path), str(root.python),
            str(ROOT / "targets" / "runner.py"), "--runtime", cfg.runtime, "--artifact", str(artifact.resolve()),
            "--inputs", str(inputs.resolve()), "--logits-out", str(gen), "--threads", str(threads),
            "--chunk", str(profile.prefill_tokens), "--new-tokens", str(profile.decode_tokens), "--repeats", "1",
        ]  # fmt: skip
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": f"{root.site}:{ROOT}",  # ROOT: the runner imports core.measure
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        log.info("running %s under qemu-aarch64 -cpu %s (%d threads): timings are the emulator's", artifact.name,
                 core, threads)  # fmt: skip
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=cfg.timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise GateError(f"The emulated run did not finish in {cfg.timeout_s:.0f} s ({label}).") from exc
        wall = time.perf_counter() - t
        result_path = Path(tmp) / "result.json"
        result_path.write_text(proc.stdout)
        if proc.returncode != 0:
            raise GateError(
                f"The runner failed under emulation ({label}, exit {proc.returncode}): {proc.stderr[-2000:].strip()}"
            )
        cmp = compare_with_local(out, cfg.runtime, gen)
        if not cmp:
            raise ConfigError(
                f"{out}/validation/{cfg.runtime}_generation.npz is missing: run `prunefit validate` first."
            )
        quantized = profile.quantized(cfg.runtime) is not None
        gates = emulated_gates(profile, cfg.runtime, quantized, cmp)
        emulated = {"qemu": Path(qemu).name, "cpu": core, "features": CORES[core].features, "wall_s": wall,
                    "note": "timings and memory are qemu's, not a device's"}  # fmt: skip
        entry = merge(
            out, cfg.runtime, label, result_path, gen,
            extra={"emulated": emulated, "gates": [asdict(g) for g in gates]},
        )  # fmt: skip
    return EmulationResult(label, core, entry["measured"], cmp, gates)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m targets.emulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="artifacts directory of an earlier `prunefit export`")
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "executorch"])
    ap.add_argument("--target", default=None, help="profile (default: the one the artifacts were made for)")
    ap.add_argument("--root", type=Path, default=None, help="arm64 root (default: ~/.cache/prunefit/...)")
    ap.add_argument(
        "--allow-skip",
        action="store_true",
        help="exit 0 when emulation cannot run (qemu-user missing); without it, a skip exits 11: nothing was checked",
    )
    ap.add_argument("--require", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = run(EmulationConfig(args.out_dir, args.runtime, args.target, args.root))
    except EmulationUnavailable as exc:
        if args.allow_skip and not args.require:
            print(f"SKIPPED emulated validation (--allow-skip): {exc}", file=sys.stderr)
            return 0
        print(
            f"error: emulated validation was skipped, so nothing was checked: {exc}\n"
            "Install it with `make setup-emulated`, or pass --allow-skip to accept the skip.",
            file=sys.stderr,
        )
        return EmulationSkippedError.exit_code
    except PrunefitError as exc:
        print(f"error ({type(exc).__name__}): {exc}", file=sys.stderr)
        return exc.exit_code
    m = res.measured
    for g in res.gates:
        print(f"{'PASS' if g.passed else 'FAIL'} {g.name}: {g.detail}")
    print(
        f"{res.label}: decode {m.get('decode_tokens_per_s', float('nan')):.2f} tok/s, "
        f"prefill {m.get('prefill_s', float('nan')):.2f} s (emulated timings)"
    )
    if not res.passed:
        print(f"error: the emulated run failed {sum(not g.passed for g in res.gates)} gate(s)", file=sys.stderr)
        return GateError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
