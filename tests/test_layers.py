"""The package's import graph: layers point down, and there are no import circles.

Layers, top to bottom (docs/design.md): cli / demo -> r1, serve, plan -> train, inference -> parallel ->
hf, fp8 -> model -> config -> files, errors. `data` (tokenizer, shards, loader) and `cost` sit beside `model`. Every import counts, function-level ones
too: deferring an import is allowed for a heavy optional dependency, never to hide a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanoseek"

# layer -> packages it must never import
ABOVE_MODEL = ("hf", "pretrained", "fp8", "parallel", "train", "inference", "serve", "r1", "plan", "cli", "demo")
FORBIDDEN = {
    "nanoseek.errors": ("config", "files", "device", "model", "data", "cost", *ABOVE_MODEL),
    "nanoseek.files": ("config", "model", "data", "cost", *ABOVE_MODEL),
    "nanoseek.config": ("model", "data", "cost", *ABOVE_MODEL),
    "nanoseek.model": ("data", "cost", *ABOVE_MODEL),
    "nanoseek.data": ("model", "cost", *ABOVE_MODEL),
    "nanoseek.cost": ("train", "inference", "serve", "r1", "plan", "parallel", "fp8", "cli", "demo"),
    "nanoseek.hf": ("pretrained", "parallel", "train", "inference", "serve", "r1", "plan", "cli", "demo"),
    "nanoseek.fp8": ("hf", "pretrained", "parallel", "train", "inference", "serve", "r1", "plan", "cli", "demo"),
    "nanoseek.parallel": ("train", "inference", "serve", "r1", "plan", "cli", "demo"),
    "nanoseek.inference": ("train", "serve", "r1", "plan", "cli", "demo"),
    "nanoseek.serve": ("train", "r1", "plan", "cli", "demo"),
    "nanoseek.train": ("serve", "r1", "plan", "cli", "demo"),
    "nanoseek.plan": ("inference", "serve", "r1", "cli", "demo"),  # plan.calibrate runs a real train step
    "nanoseek.r1": ("serve", "plan", "cli", "demo"),
}


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file, function bodies included)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                stem = node.module or ""
                if node.level:
                    stem = ".".join(base[: len(base) - node.level + 1] + ([stem] if stem else []))
                names = [stem] + [f"{stem}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:  # `from pkg import symbol` -> pkg
                    name = name.rpartition(".")[0]
                if name and name != mod and name != package.name:
                    targets.add(name)
        graph[mod] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_circles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_down(layer):
    upward = sorted(
        f"{mod} -> {target}"
        for mod, targets in import_graph().items() if in_package(mod, layer)
        for target in targets
        if any(in_package(target, f"nanoseek.{banned}") for banned in FORBIDDEN[layer])
    )
    assert upward == []


def test_checker_sees_function_level_and_relative_import_circles(tmp_path):
    """The checker itself: a circle closed by a function-level relative import is found."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from toy.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import toy.a\n")
    (pkg / "d.py").write_text("from toy import a\n")
    graph = import_graph(pkg)
    assert graph["toy.sub.b"] == {"toy.c"}
    assert cycles(graph) == [["toy.a", "toy.c", "toy.sub.b"]]
