"""Caller-supplied text in logs: escaped and cut in the plain and the JSON format (issue 15.7)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from engine.config import LoggingSettings
from engine.logs import MAX_MESSAGE_CHARS, MAX_VALUE_CHARS, Every, escape_control, setup_logging

# The decision line as engine/authorize.py writes it.
DECISION = "uuid=%s result=%s reason=%s account=%s destination=%s latency_ms=%.3f"
FORGED = "4420\n2026-01-01 00:00:00,000 INFO callgate.decision[1] uuid=x result=accept reason=- account=1"


@pytest.fixture(params=["plain", "json"])
def output(request: pytest.FixtureRequest) -> Iterator[tuple[str, io.StringIO]]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    setup_logging(LoggingSettings(json=request.param == "json", level="DEBUG"), stream=stream)
    try:
        yield request.param, stream
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def _message(kind: str, line: str) -> str:
    return json.loads(line)["message"] if kind == "json" else line


def test_a_newline_in_a_destination_cannot_forge_a_decision_line(output):
    kind, stream = output
    logging.getLogger("callgate.decision").info(DECISION, "u-1", "reject", "NO_ROUTE", "-", FORGED, 1.5)
    lines = _lines(stream)
    assert len(lines) == 1, lines
    message = _message(kind, lines[0])
    assert "destination=4420\\n2026-01-01" in message
    assert "result=reject" in message


def test_every_control_character_and_lone_surrogate_is_escaped(output):
    kind, stream = output
    hostile = "a\rb\x1b[31mc\x00d\u2028e\ud800f\tg"
    logging.getLogger("callgate.test").warning("value=%s", hostile, extra={"field": hostile})
    lines = _lines(stream)
    assert len(lines) == 1
    message = _message(kind, lines[0])
    assert "value=a\\rb\\x1b[31mc\\x00d\\u2028e\\ud800f\\tg" in message
    raw = lines[0]
    assert not any(c in raw for c in "\r\x1b\x00\u2028\ud800\t")
    if kind == "json":
        assert json.loads(raw)["field"] == "a\\rb\\x1b[31mc\\x00d\\u2028e\\ud800f\\tg"


def test_a_200_kB_value_gives_a_bounded_line_with_a_marker(output):
    kind, stream = output
    huge = "9" * 200_000
    logging.getLogger("callgate.decision").info(
        DECISION, "u-2", "reject", "NO_ROUTE", "-", huge, 1.0, extra={"destination": huge}
    )
    line = _lines(stream)[0]
    assert len(line) < 2 * MAX_VALUE_CHARS + 1000
    assert f"…[{200_000 - MAX_VALUE_CHARS} more chars]" in _message(kind, line)
    if kind == "json":
        assert json.loads(line)["destination"].endswith(f"…[{200_000 - MAX_VALUE_CHARS} more chars]")


def test_a_huge_message_without_arguments_is_cut_too(output):
    kind, stream = output
    logging.getLogger("callgate.test").info("x" * (MAX_MESSAGE_CHARS * 3) + "\nforged")
    lines = _lines(stream)
    assert len(lines) == 1
    assert len(_message(kind, lines[0])) < MAX_MESSAGE_CHARS + 200


def test_plain_tracebacks_are_indented_so_no_line_starts_a_record(output):
    kind, stream = output
    try:
        raise ValueError("bad destination\n2026-01-01 00:00:00,000 INFO forged")
    except ValueError:
        logging.getLogger("callgate.test").exception("failed for %s", "x\ny")
    lines = _lines(stream)
    if kind == "json":
        assert len(lines) == 1
        assert "forged" in json.loads(lines[0])["exception"]
    else:
        assert "failed for x\\ny" in lines[0]
        assert len(lines) > 2 and all(line.startswith("  ") for line in lines[1:]), lines


def test_numbers_keep_their_format_and_clean_text_is_unchanged(output):
    kind, stream = output
    logging.getLogger("callgate.test").info("n=%d f=%.2f s=%s", 7, 1.234, "plain text")
    assert _message(kind, _lines(stream)[0]).endswith("n=7 f=1.23 s=plain text")
    assert escape_control("clean") == "clean"


class _Record(logging.LogRecord):
    """A record factory's own class: copied with copy.copy, as before."""


@pytest.mark.parametrize("record_class", [logging.LogRecord, _Record])
def test_the_plain_formatter_writes_what_a_copy_copy_of_the_record_gave_and_leaves_it_alone(
    record_class: type[logging.LogRecord],
) -> None:
    import copy

    from engine.logs import PLAIN_FORMAT, MaskingFormatter, mask_secrets, safe_message

    def before(record: logging.LogRecord) -> str:  # MaskingFormatter.format before round 5
        safe = copy.copy(record)
        safe.msg, safe.args = safe_message(record), None
        return mask_secrets(logging.Formatter.format(formatter, safe))

    formatter = MaskingFormatter(PLAIN_FORMAT)
    args = ("8d3c-1", "accept", "-", "1000\nforged", "4420", 1.23456)
    record = record_class("callgate.decision", logging.INFO, __file__, 1, DECISION, args, None)
    record.uuid = "8d3c-1"  # an extra= field
    saved = dict(vars(record))
    assert formatter.format(record) == before(record)
    assert vars(record) == saved  # the caller's record is not the one rewritten


def test_every_writes_at_most_one_line_per_interval_and_counts_the_rest() -> None:
    now = [100.0]
    every = Every(10.0, clock=lambda: now[0])
    assert every.due() == 0  # the first line is written at once
    assert every.due() is None
    assert every.due() is None
    now[0] += 9.999
    assert every.due() is None
    now[0] += 0.001
    assert every.due() == 3  # held back since the last line
    now[0] += 60
    assert every.due() == 0
