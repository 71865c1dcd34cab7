"""House rules the code can be held to mechanically, read from the source with `ast` (nothing is imported).

- No function in sfn_train/ is over 80 lines (decorators and docstring included), so that each reads top to bottom
  in one screen; a plain table (a literal a function returns) may be longer, by name in TABLES.
- Tests import their shared helpers from tests/helpers.py; conftest.py holds fixtures only.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

MAX_LINES = 80

# Functions that are a plain table or list and may be longer: none today. An entry names "module:function".
TABLES: set[str] = set()

# Over the limit today and being shortened by their owners' pending work (issue 24): each entry must leave this list
# once its function is under the limit (test_pending_entries_are_still_over_the_limit says when).
PENDING: set[str] = set()


def function_lengths(root: Path = REPO) -> dict[str, int]:
    """"module:qualified.name" -> lines, for every function and method under root/sfn_train."""
    lengths = {}
    for path in sorted((root / "sfn_train").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")

        def visit(node, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                        lengths[f"{module}:{name}"] = child.end_lineno - start + 1
                    visit(child, f"{name}.")

        visit(ast.parse(path.read_text(), str(path)), "")
    return lengths


def test_no_function_is_over_80_lines():
    long = {name: n for name, n in function_lengths().items() if n > MAX_LINES and name not in TABLES | PENDING}
    assert long == {}, f"functions over {MAX_LINES} lines (split them, or list a plain table in TABLES): {long}"


def test_pending_entries_are_still_over_the_limit():
    lengths = function_lengths()
    done = sorted(name for name in TABLES | PENDING if lengths.get(name, 0) <= MAX_LINES)
    assert done == [], f"remove from TABLES/PENDING (gone or now short enough): {done}"


def test_the_measure_sees_methods_and_nested_functions(tmp_path):
    package = tmp_path / "sfn_train"
    package.mkdir()
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    (package / "m.py").write_text(f"class C:\n    def method(self):\n{body}\n\n\ndef short():\n    def inner():\n"
                                  "        return 1\n    return inner\n")
    assert function_lengths(tmp_path) == {"sfn_train.m:C.method": MAX_LINES + 1, "sfn_train.m:short": 4,
                                          "sfn_train.m:short.inner": 2}


def test_tests_import_helpers_not_conftest():
    importing = sorted(p.name for p in (REPO / "tests").glob("*.py")
                       if any(isinstance(n, ast.ImportFrom) and n.module == "conftest"
                              for n in ast.walk(ast.parse(p.read_text()))))
    assert importing == [], f"import shared helpers from tests/helpers.py, not conftest: {importing}"
