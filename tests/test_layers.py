"""The import layers the README draws (README.md, "Import layers"), checked on the source.

- `engine.esl` imports nothing of callgate: it is a generic event-socket library.
- `engine.rules` imports only the model (`engine.model`, `engine.decision`).
- Nothing on the call path (esl, call, rules, state) imports `engine.db` or `engine.admin`.
- No import loop between the top-level parts of `engine` (a module, or a package).

Parsed with `ast`, never imported: the test is pure and takes milliseconds. Imports inside
functions count too (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"

# What does not follow the layers yet, each with the change that removes it. An entry that no
# longer applies is reported as a warning, so that it is deleted.
ALLOWED_TODAY: dict[tuple[str, str], str] = {}
LOOPS_TODAY: dict[frozenset[str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ENGINE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every engine module or package `name` imports (absolute, relative, `from x import mod`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            targets = [source, *(f"{source}.{alias.name}" for alias in node.names)]
        else:
            continue
        yield from (target for target in targets if target in known)


@functools.cache
def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imported(name, path, known)) - {name} for name, path in found.items()}


def inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(package: str, allowed: set[str]) -> list[tuple[str, str]]:
    return sorted(
        (name, target)
        for name, targets in graph().items()
        if inside(name, package)
        for target in targets
        if not inside(target, package) and not any(inside(target, ok) for ok in allowed)
    )


def check(package: str, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The violations not allowed today; warn about allowances of `package` that no longer apply."""
    for stale in sorted(pair for pair in ALLOWED_TODAY if inside(pair[0], package) and pair not in found):
        warnings.warn(f"tests/test_layers.py: {stale} is allowed but no longer happens", stacklevel=2)
    return [pair for pair in found if pair not in ALLOWED_TODAY]


def test_esl_imports_nothing_of_callgate() -> None:
    assert check("engine.esl", violations("engine.esl", set())) == []


def test_rules_import_only_the_model() -> None:
    assert check("engine.rules", violations("engine.rules", {"engine.model", "engine.decision"})) == []


# The packages a call goes through (engine.decider until engine/call/ takes it).
CALL_PATH = ("engine.esl", "engine.call", "engine.rules", "engine.state", "engine.decider")


def test_nothing_on_the_call_path_imports_postgresql_code() -> None:
    for package in CALL_PATH:
        found = [pair for pair in violations(package, set()) if top(pair[1]) in {"engine.db", "engine.admin"}]
        assert found == [], f"{package} reaches PostgreSQL code: {found}"


def top(name: str) -> str:
    return ".".join(name.split(".")[:2])


def loops() -> list[frozenset[str]]:
    """Strongly connected groups of two or more top-level parts (Tarjan)."""
    edges: dict[str, set[str]] = {}
    for name, targets in graph().items():
        edges.setdefault(top(name), set()).update(top(t) for t in targets if top(t) != top(name))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(frozenset(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_loop_between_the_parts_of_engine() -> None:
    found = loops()
    for stale in set(LOOPS_TODAY) - set(found):
        warnings.warn(f"tests/test_layers.py: the loop {sorted(stale)} is gone: remove it", stacklevel=2)
    assert [sorted(group) for group in found if group not in LOOPS_TODAY] == []


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The parser finds relative, absolute and `from package import module` imports."""
    package = tmp_path / "engine" / "esl"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from ..model import Account\nimport engine.rules.decide\n")
    (package / "b.py").write_text("from engine import model\n")
    known = {"engine.model", "engine.rules.decide", "engine.esl", "engine.esl.a", "engine.esl.b"}
    assert set(imported("engine.esl.a", package / "a.py", known)) == {"engine.model", "engine.rules.decide"}
    assert set(imported("engine.esl.b", package / "b.py", known)) == {"engine.model"}
