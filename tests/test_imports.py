"""The package's import graph, read from the source with `ast`: no import circle, and no import up the layers.

Layers, bottom to top: the top-level modules `sfn_train/*.py` (the trainer and what everything shares: checkpoints,
shards, plugins, manifests, roles), then the gadgets and the evaluation (independent of each other), then the lab
and the study, which drive them all. Every import counts, also one inside a function and `importlib.import_module("sfn_train...")`
with a literal name: a lazy import still ties the modules together. (`sfn_train/cli.py` dispatches through a table of
module names and imports none of them by name.)
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

LAYERS = {"gadgets": 1, "evaluation": 1, "study": 2, "lab": 3}  # sub-package -> layer; top-level modules are layer 0
# (the lab runs the study machinery: `sfn lab --seeds` is a shipped study over the lab's data and base)

# Edges allowed to break the rules: none. The evaluation finds the packaged task files by path (never by importing the
# lab), and the lab report reads a plain record of the run (`lab_run.json`) instead of the pipeline. An edge added here must
# still close a circle or point up (test_known_exceptions_are_still_needed).
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the sfn_train modules it imports, for every .py file under root/sfn_train."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in sorted((root / "sfn_train").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # `from sfn_train.x import function` -> sfn_train.x
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (base, node.module or "") if p)
                found = [f"{module}.{alias.name}" for alias in node.names]  # a submodule, else resolved to module
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                  and isinstance(node.args[0].value, str)):
                found = [node.args[0].value]
            targets.update(t for t in map(resolve, (f for f in found if f.startswith("sfn_train"))) if t)
        graph[name] = targets - {name}
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges into a higher layer, or across to the other package of the same layer (gadgets <-> evaluation)."""
    bad = []
    for source, targets in graph.items():
        for target in targets:
            across = layer(source) == layer(target) > 0 and source.split(".")[1] != target.split(".")[1]
            if layer(target) > layer(source) or across:
                bad.append((source, target))
    return sorted(bad)


def without_known_exceptions(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {source: {t for t in targets if (source, t) not in KNOWN_EXCEPTIONS} for source, targets in graph.items()}


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "sfn_train.outputs" in graph["sfn_train.train"]  # from .outputs import ... (module level)
    assert "sfn_train.quantize" in graph["sfn_train.startup"]  # from .quantize import ... (inside a function)
    assert "sfn_train.gadgets" in graph["sfn_train.lab.pipeline"]  # from .. import gadgets
    assert "sfn_train.shards" in graph["sfn_train.gadgets.merge"]  # from ..shards import ...
    assert {"sfn_train.gadgets", "sfn_train.evaluation", "sfn_train.lab"} <= set(graph)


def test_no_import_circles():
    circles = import_circles(without_known_exceptions(import_graph()))
    assert circles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_upward_imports():
    bad = upward_imports(without_known_exceptions(import_graph()))
    assert bad == [], "imports up the layers: " + ", ".join(f"{s} -> {t}" for s, t in bad)


def test_known_exceptions_are_still_needed():
    """Each listed edge still exists and, alone, still breaks a rule; otherwise it must leave the list."""
    graph = import_graph()
    for source, target in sorted(KNOWN_EXCEPTIONS):
        assert target in graph.get(source, set()), f"remove {source} -> {target} from KNOWN_EXCEPTIONS: it is gone"
        others = KNOWN_EXCEPTIONS - {(source, target)}
        alone = {s: {t for t in ts if (s, t) not in others} for s, ts in graph.items()}
        in_circle = any(source in c and target in c for c in import_circles(alone))
        assert in_circle or (source, target) in upward_imports(alone), \
            f"remove {source} -> {target} from KNOWN_EXCEPTIONS: it no longer closes a circle or points up"
