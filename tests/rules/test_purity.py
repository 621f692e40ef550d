"""The rules stay pure: no I/O modules, no clock reads, no global random."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RULES = sorted((Path(__file__).parents[2] / "engine" / "rules").glob("*.py"))
FORBIDDEN_MODULES = {
    "socket",
    "redis",
    "psycopg",
    "time",
    "os",
    "gevent",
    "subprocess",
    "logging",
    "threading",
}
CLOCK_READS = {"now", "utcnow", "today", "time", "monotonic"}


@pytest.mark.parametrize("path", RULES, ids=lambda path: path.name)
def test_module_is_pure(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]}
            if node.module == "random":
                assert {alias.name for alias in node.names} <= {"Random"}, path.name
        else:
            names = set()
        assert not names & FORBIDDEN_MODULES, (path.name, names)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in CLOCK_READS, (path.name, node.lineno)
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "random":
                assert node.func.attr == "Random", (path.name, node.lineno)
