"""The tree's layering, read from the source: inference never reaches up into measurement, evaluation or
training; no two modules import each other, directly or around a loop; the model's methods are its own."""

from __future__ import annotations

import ast
from pathlib import Path

import tridlm

SRC = Path(tridlm.__file__).parent
# what serving a request runs: it may use only itself and the layers below
INFERENCE = ("model", "cache", "masks", "config", "fusion", "native", "kernels", "lora", "tokenizer", "checkpoint",
             "loader", "numerics", "machine", "default_model", "generate", "edit", "rows", "decoding", "engine")
ABOVE_INFERENCE = ("bench", "eval", "training", "commands", "server", "cli")


def module_name(path: Path) -> str:
    parts = ["tridlm", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imported(name: str, tree: ast.AST) -> set[str]:
    """tridlm modules a module imports at run time, anywhere in its body (`if TYPE_CHECKING:` aside)."""
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(block.test) for n in ast.walk(block)}
    package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != name:
                found.add(t)
    return found


GRAPH = {name: imported(name, ast.parse(path.read_text())) for name, path in MODULES.items()}


def layer(name: str) -> str:
    return name.split(".")[1] if "." in name else ""


def test_inference_imports_nothing_from_measurement_evaluation_or_training():
    upward = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if layer(m) in INFERENCE
                    for t in targets if layer(t) in ABOVE_INFERENCE)
    assert not upward, upward


def test_no_import_cycles():
    """Tarjan's strongly connected components over every run-time import (function-level ones too)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_models_methods_are_defined_on_its_class():
    patched = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            patched += [f"{name}: {ast.unparse(t)}" for t in targets
                        if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "TriModeLM"]
    assert not patched, patched
    for method in ("generate", "infill", "revise", "save"):
        assert method in tridlm.TriModeLM.__dict__
