"""Logging as prunefit's processes set it up: one format, a log file beside the outputs, third-party
noise silenced. In ``core`` because the CLI and the export child process (pipeline/exporting.py) both
call it, and the child must not import the CLI (pipeline.cli imports the pipeline that spawns it)."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path


def configure_logging(level: int, log_file: Path | None = None) -> None:
    """Log to stderr and ``log_file`` at ``level``, third-party noise silenced. The CLI calls it, and
    so does a child process working for the run (pipeline/exporting.py), with the parent's settings."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(log_file))
        except OSError:
            pass  # an unwritable --out is reported by the pipeline with its own message
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    # Third-party import noise (torchao CUDA kernels, pytree enum notices) says nothing about the run.
    for noisy in ("torchao", "torch.utils._pytree", "onnx_ir", "onnxscript", "torch.onnx", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for h in handlers:  # ExecuTorch logs lowering chatter on the root logger at INFO
        h.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
