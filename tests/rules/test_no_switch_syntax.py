"""The rules know nothing of FreeSWITCH syntax: engine.call.render writes it (issue 12 item 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RULES = sorted((Path(__file__).parents[2] / "engine" / "rules").glob("*.py"))
# Fragments of dial strings, channel variables and dialplan applications.
SWITCH_SYNTAX = (
    "sofia/",
    "user/",
    "leg_timeout=",
    "absolute_codec_string",
    "origination_caller_id",
    "effective_caller_id",
    "sched_hangup",
    "execute_on_answer",
    "callgate_",
    "${",
)


# Configured values the rules pass through untouched: the directory domain's default is a
# FreeSWITCH variable reference (rules.local_domain, see docs/call-session.md).
ALLOWED = {
    ("config.py", "${domain_name}"),
    ("config.py", "local_domain must be a host name or one ${variable}, got "),
}


@pytest.mark.parametrize("path", RULES, ids=lambda path: path.name)
def test_no_string_in_the_rules_is_freeswitch_syntax(path: Path) -> None:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and (path.name, node.value) not in ALLOWED
        ):
            found = [fragment for fragment in SWITCH_SYNTAX if fragment in node.value]
            assert not found, (path.name, node.lineno, node.value)
