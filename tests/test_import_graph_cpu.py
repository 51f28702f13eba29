"""The import graph of vidrial/ (read from the AST, function-local imports included): no cycles among the
pipeline modules (issue 14: imports point one way, public -> autograd -> pipeline -> kernels)."""
from __future__ import annotations

import ast
from pathlib import Path

import vidrial

ROOT = Path(vidrial.__file__).resolve().parent


def _module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("vidrial",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """module -> the vidrial modules it imports anywhere in its source (top level or inside functions).
    `from a import b` points at a.b when that is a module, else at a; parent packages are not added (a lazy
    package __getattr__ would otherwise make every module a cycle). Edges into the root package are dropped:
    importing `vidrial` runs only its top level, which imports nothing (test_root_package_imports_nothing).
    Imports under `if TYPE_CHECKING:` are annotations only, never executed: not edges."""
    mods = _module_names()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            graph[name].update(t for t in targets if t in mods and t not in (name, "vidrial"))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_root_package_imports_nothing_at_import_time():
    """`import vidrial` stays light: its only vidrial imports sit inside the lazy __getattr__."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [ast.unparse(n) for n in top if "vidrial" in ast.unparse(n)]


def test_no_import_cycles_in_vidrial():
    assert cycles(import_graph()) == []


def test_pipeline_imports_point_one_way():
    """public (ops, inference, nn) -> autograd -> pipeline -> kernels: no module imports one above it."""
    graph = import_graph()
    above = {"vidrial.autograd": {"vidrial.ops", "vidrial.inference", "vidrial.nn"}}
    above["vidrial.pipeline"] = above["vidrial.autograd"] | {"vidrial.autograd"}
    above["vidrial.kernels"] = above["vidrial.pipeline"] | {"vidrial.pipeline"}
    bad = []
    for mod, deps in graph.items():
        for layer, banned in above.items():
            if mod == layer or mod.startswith(layer + "."):
                bad += [f"{mod} -> {d}" for d in deps if any(d == b or d.startswith(b + ".") for b in banned)]
    assert not bad, bad


def test_the_graph_sees_function_local_imports():
    graph = import_graph()
    assert "vidrial.autograd" in graph["vidrial.ops"]  # imported inside power_retention only
    assert "vidrial.kernels.power_retention.update_state" in graph["vidrial.pipeline.forward"]


if __name__ == "__main__":
    for c in cycles(import_graph()):
        print(c)
