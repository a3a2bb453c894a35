"""One exception tree for every user-facing failure.

The CLI maps each class to its own exit code and prints the message without a traceback, so every
message must name the offending file/key/layer *and* the fix.
"""

from __future__ import annotations


class PrunefitError(Exception):
    """Root of all errors prunefit raises on purpose."""

    exit_code = 1


class ConfigError(PrunefitError):
    """A CLI option or stage config is invalid."""

    exit_code = 2


class ProfileError(ConfigError):
    """A device profile YAML is missing, malformed, or has a bad key/value."""

    exit_code = 3


class ModelLoadError(PrunefitError):
    """The model path is missing, not a causal LM, or of an unsupported architecture."""

    exit_code = 4


class CalibrationError(PrunefitError):
    """Calibration or evaluation text is missing, empty, or too short."""

    exit_code = 5


class BudgetError(PrunefitError):
    """The memory budget cannot be met within the allowed pruning."""

    exit_code = 6


class ExportError(PrunefitError):
    """An exporter failed to produce or load an artifact."""

    exit_code = 7


class RuntimeMissingError(PrunefitError):
    """A runtime the profile asks for is not installed."""

    exit_code = 8


class GateError(PrunefitError):
    """A validation gate (parity, memory, size, quality) failed."""

    exit_code = 9


class OutputError(PrunefitError):
    """An artifact could not be written (disk full, I/O error); nothing half-written is left."""

    exit_code = 10


class EmulationSkippedError(PrunefitError):
    """Emulated validation was asked for but could not run (no qemu-user / arm64 root): nothing was
    checked, which must not read as a pass."""

    exit_code = 11
