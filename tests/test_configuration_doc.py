"""docs/configuration.md and config/callgate.toml name every key of the settings model, with its default.

A key added to engine/config.py and forgotten in either fails here (the Sentinel keys once were)."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.config import Config

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
SAMPLE = ROOT / "config" / "callgate.toml"

SECTIONS = [section.name for section in dataclasses.fields(Config)]


def toml_literal(value: Any) -> str:
    """A default as the page writes it: TOML syntax (an empty table for the mapping keys)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{}"
    raise TypeError(f"no TOML form for {value!r}")


def defaults(section: str) -> dict[str, Any]:
    settings = getattr(Config(), section)
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def documented_rows() -> dict[str, dict[str, str]]:
    """section -> key -> the default column, from the page's `### `[section]`` tables."""
    rows: dict[str, dict[str, str]] = {}
    current = None
    for line in PAGE.read_text().splitlines():
        heading = re.match(r"### `\[(\w+)\]`", line)
        if heading:
            current = rows.setdefault(heading.group(1), {})
            continue
        row = re.match(r"\| `(\w+)` \| `(.*?)` \|", line)
        if row and current is not None:
            current[row.group(1)] = row.group(2)
    return rows


def test_the_literal_form_of_defaults() -> None:
    assert toml_literal(True) == "true" and toml_literal(0.25) == "0.25" and toml_literal(64) == "64"
    assert toml_literal("callgate:") == '"callgate:"'
    assert toml_literal(("127.0.0.1/32", "::1/128")) == '["127.0.0.1/32", "::1/128"]'
    assert toml_literal(()) == "[]" and toml_literal({}) == "{}"


def test_the_page_has_a_table_for_each_section_and_nothing_else() -> None:
    assert list(documented_rows()) == SECTIONS


@pytest.mark.parametrize("section", SECTIONS)
def test_every_key_is_documented_with_its_default(section: str) -> None:
    rows = documented_rows().get(section, {})
    expected = {key: toml_literal(value) for key, value in defaults(section).items()}
    missing = sorted(set(expected) - set(rows))
    stale = sorted(set(rows) - set(expected))
    assert not missing, f"docs/configuration.md [{section}] lacks {missing}"
    assert not stale, f"docs/configuration.md [{section}] documents keys the model does not have: {stale}"
    wrong = {key: (rows[key], expected[key]) for key in expected if rows[key] != expected[key]}
    assert not wrong, f"[{section}] defaults differ (page, model): {wrong}"


@pytest.mark.parametrize("section", SECTIONS)
def test_the_sample_file_lists_every_key_at_its_default(section: str) -> None:
    sample = tomllib.loads(SAMPLE.read_text()).get(section, {})
    for key, value in defaults(section).items():
        assert key in sample, f"config/callgate.toml [{section}] lacks {key}"
        written = sample[key]
        if isinstance(value, tuple):
            written = tuple(written)
        if isinstance(value, Mapping):
            assert isinstance(written, dict)  # a table; its examples may stay commented out
            continue
        assert written == value, f"config/callgate.toml [{section}] {key} = {written!r}, default {value!r}"
