"""engine/esl is a generic event-socket library: it imports nothing of callgate (issue 12)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ESL = sorted((ROOT / "engine" / "esl").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", ESL, ids=lambda path: path.name)
def test_esl_modules_import_only_the_library_itself(path: Path) -> None:
    for name in imported_modules(path):
        assert not name.startswith("."), (path.name, name)  # absolute imports only
        if name == "engine" or name.startswith("engine."):
            assert name.startswith("engine.esl"), (path.name, name)


def test_importing_the_library_loads_no_callgate_module() -> None:
    code = (
        "import sys, engine.esl.protocol, engine.esl.commands, engine.esl.connection, "
        "engine.esl.server, engine.esl.inbound\n"
        "print(sorted(m for m in sys.modules if m.startswith('engine')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = eval(out.stdout)  # a printed list of module names
    assert [m for m in loaded if m != "engine" and not m.startswith("engine.esl")] == []
