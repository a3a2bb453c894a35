"""The package layering holds: core imports nothing of the project, imports only flow up
(core <- exporters <- targets <- pipeline), and no module imports itself through others.

Every import counts, the ones inside functions too: a lazy import that closes a circle is still a
circle (it only moves the failure from import time to call time)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A package may import those below it, never those above: the core knows no stage, exporters
# know no device, targets (profiles, the memory model, validation) know no pruning, and the
# pipeline (orchestration and pruning) sits on top.
LAYERS = ("core", "exporters", "targets", "pipeline")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in LAYERS for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` resolved to ``pkg.mod``)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a function or class: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def test_graph_is_read() -> None:
    g = _graph()
    assert "core.errors" in g["core.fsio"]  # the walker sees real edges
    assert "core.measure" in g["targets.runner"]  # including ones inside try blocks


def test_core_imports_nothing_else_and_imports_flow_up() -> None:
    bad = []
    for mod, deps in _graph().items():
        rank = LAYERS.index(mod.split(".")[0])
        for dep in deps:
            if LAYERS.index(dep.split(".")[0]) > rank:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layering (core <- exporters <- targets <- pipeline):\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    g = _graph()
    # package __init__ modules are entered on any submodule import; an edge *to* a package is an
    # import of its __init__, which is what the graph records
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d) :], d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", ["targets.emulate", "targets.profile", "targets.budget", "pipeline.methods"])
def test_light_modules_do_not_load_transformers(module: str) -> None:
    """Profile checks, the memory model's tables and emulation never pay for transformers."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('transformers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == "False", module
