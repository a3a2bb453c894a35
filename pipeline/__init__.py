"""prunefit pipeline: calibrate -> prune -> rewrite shapes -> export -> validate on a device profile."""

__version__ = "0.1.0"
