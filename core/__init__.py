"""prunefit's core: what every other package needs and that needs none of them.

errors, atomic file I/O, architecture specs, the runtime and quantization-scheme tables, and
measurement (RSS, perplexity). ``pipeline``, ``exporters`` and ``targets`` import from here;
nothing here imports them (``tests/test_layering.py`` checks it). Kept import-light: the
runtime runner (``targets.runner``) imports ``core.measure`` before its baseline is taken.
"""
