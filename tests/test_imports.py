"""The package's import graph has no cycles, and every module imports on its own.

The graph counts every import of a helexa module wherever it is written (module level,
inside a function, under ``TYPE_CHECKING``): an import deferred into a function is still
a dependency, and one circle makes the layers impossible to read apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "helexa"


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The helexa modules ``path`` imports (``from a.b import c``: a.b.c where that is a
    module, else a.b), itself and its own packages left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            own_package = name.startswith(target + ".")  # importing it runs its __init__
            if target and target.startswith(PACKAGE) and target != name and not own_package:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycles() -> None:
    names = module_names()
    graph = {name: imports_of(path, name, set(names)) for name, path in names.items()}
    assert sum(len(targets) for targets in graph.values()) > 200  # the graph was read
    assert cycles(graph) == []


def test_cycles_are_found() -> None:  # the check above can fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Packages that talk to the neuron over its HTTP API only: they never import its code.
# (``cortex up`` drives its neuron through /models/stored, /models/pull, /health and
# /models/load, as any client would; the gateway's one way to a neuron is its API.)
NEVER_IMPORTS = {
    "helexa.up": ("helexa.neuron", "helexa.cortex"),
    "helexa.cortex": ("helexa.neuron",),
}


def crossings(graph: dict[str, set[str]], rules: dict[str, tuple[str, ...]]) -> list[str]:
    """``a -> b`` for every import of a module of ``b`` by a module of ``a`` that ``rules``
    forbids (``rules[a]`` lists ``b``)."""

    def within(name: str, package: str) -> bool:
        return name == package or name.startswith(package + ".")

    return sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        for package, forbidden in rules.items()
        if within(name, package)
        for target in targets
        if any(within(target, other) for other in forbidden)
    )


def test_up_and_cortex_import_nothing_of_the_neuron() -> None:
    names = module_names()
    graph = {name: imports_of(path, name, set(names)) for name, path in names.items()}
    assert any(name.startswith("helexa.up.") for name in graph)  # the package was read
    assert crossings(graph, NEVER_IMPORTS) == []


def test_crossings_are_found() -> None:  # the check above can fail
    graph = {
        "helexa.up.run": {"helexa.neuron.model_files", "helexa.core.wire"},
        "helexa.cortex.cli": {"helexa.up.run"},  # allowed: `cortex up` runs helexa.up
        "helexa.cortex.x": {"helexa.neuron"},
        "helexa.neuronish": {"helexa.cortex.x"},
    }
    assert crossings(graph, NEVER_IMPORTS) == [
        "helexa.cortex.x -> helexa.neuron",
        "helexa.up.run -> helexa.neuron.model_files",
    ]


def test_every_module_imports_on_its_own() -> None:
    modules = [n for n in module_names() if not n.endswith("__main__")]
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'helexa' or m.startswith('helexa.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", done.stdout
