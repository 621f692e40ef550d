"""mod_event_socket's ``filter`` in the emulators (loadtest.fsemu.filters), against the real
switch's recordings (tests/fixtures/esl_filter/) and the rules of ``mod_event_socket.c``
(``parse_command``'s ``filter``, ``event_handler``), and the engine's filters through the
emulator and the load driver's model."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.call.render import EVENT_FILTERS, bridge_batch
from engine.esl.protocol import Frame, PyEslParser
from loadtest import driver
from loadtest.fsemu.filters import EventFilters, UnsupportedFilter, header_lookup
from loadtest.fsemu.wire import CommandParser

CAPTURES = Path(__file__).parent / "fixtures" / "esl_filter"


def passes(filters: EventFilters, **headers: str) -> bool:
    return filters.passes(header_lookup([(k.replace("_", "-"), v) for k, v in headers.items()]))


def with_filters(*lines: str) -> EventFilters:
    filters = EventFilters()
    for line in lines:
        filters.command(line)
    return filters


def engine_filter_lines() -> list[str]:
    return [
        c.line for c in CommandParser().feed(bridge_batch([("a", "b")], "x").payload) if c.name == "filter"
    ]


# --------------------------------------------------------------------------- the real switch


def test_the_replies_are_the_real_switch_s_bytes() -> None:
    frames = PyEslParser().feed((CAPTURES / "filtered-bridged.raw").read_bytes())
    recorded = [f.reply_text for f in frames if f.reply_text.startswith("+OK filter")]
    filters = EventFilters()
    assert [filters.command(line) for line in engine_filter_lines()] == recorded


def _events(name: str) -> list[Frame]:
    frames = PyEslParser().feed((CAPTURES / f"{name}.raw").read_bytes())
    return [f for f in frames[1:] if f.content_type == "text/event-plain"]


def _label(frame: Frame) -> str:
    return f"{frame.event_name}/{frame.event_header('Application') or ''}"


@pytest.mark.parametrize("outcome", ["bridged", "failed"])
def test_the_engine_s_filters_leave_of_the_plain_call_what_the_switch_sent_with_them(outcome: str) -> None:
    """The events of the unfiltered recording that pass the engine's filters are the events
    FreeSWITCH sent on the filtered call (CHANNEL_PARK in plain-failed fired before nixevent
    took effect; no filter matches it)."""
    filters = with_filters(*engine_filter_lines())
    kept = [
        _label(f)
        for f in _events(f"plain-{outcome}")
        if filters.passes(header_lookup(list(f.event().items())))
    ]
    assert kept == [_label(f) for f in _events(f"filtered-{outcome}")]
    assert kept == ["CHANNEL_EXECUTE_COMPLETE/bridge", "CHANNEL_HANGUP_COMPLETE/"]


def test_the_engine_s_filters_are_what_render_writes() -> None:
    assert engine_filter_lines() == [f"filter {n} {v}" for n, v in EVENT_FILTERS]


# --------------------------------------------------------------------------- parse_command


@pytest.mark.parametrize(
    ("line", "reply", "entries"),
    [
        (
            "filter Event-Name CHANNEL_HANGUP_COMPLETE",
            "+OK filter added. [Event-Name]=[CHANNEL_HANGUP_COMPLETE]",
            [("Event-Name", "CHANNEL_HANGUP_COMPLETE")],
        ),
        (
            "filter   Application bridge",
            "+OK filter added. [Application]=[bridge]",
            [("Application", "bridge")],
        ),
        (
            "filter Caller-Caller-ID-Name Alice Smith ",
            "+OK filter added. [Caller-Caller-ID-Name]=[Alice Smith ]",
            [("Caller-Caller-ID-Name", "Alice Smith ")],
        ),
        ("filter add Unique-ID abc", "+OK filter added. [Unique-ID]=[abc]", [("Unique-ID", "abc")]),
        ("filter ADD Unique-ID", "+OK filter added. [Unique-ID]=[(null)]", []),
        ("filter Event-Name", "-ERR invalid syntax", []),
        ("filter ", "-ERR invalid syntax", []),
        ("filter Event-Name X\r\nignored: y", "+OK filter added. [Event-Name]=[X]", [("Event-Name", "X")]),
        ("filter delete Event-Name", "+OK filter deleted. [Event-Name][]", []),
        ("filter delete", "-ERR invalid syntax", []),
    ],
)
def test_the_command(line: str, reply: str, entries: list[tuple[str, str]]) -> None:
    filters = EventFilters()
    assert filters.command(line) == reply
    assert filters.entries == entries


def test_delete_by_name_by_value_and_all() -> None:
    filters = with_filters("filter A 1", "filter a 2", "filter B 1", "filter A 3")
    assert filters.entries == [("A", "1"), ("a", "2"), ("B", "1"), ("A", "3")]  # duplicates kept
    assert filters.command("filter delete a 3") == "+OK filter deleted. [a][3]"
    assert filters.entries == [("A", "1"), ("a", "2"), ("B", "1")]
    assert filters.command("filter delete A 2x") == "+OK filter deleted. [A][2x]"  # value: exact
    assert filters.command("filter delete A") == "+OK filter deleted. [A][]"
    assert filters.entries == [("B", "1")]
    assert filters.command("filter delete all") == "+OK filter deleted. [all][]"
    assert filters.entries == []


def test_an_empty_value_removes_the_name_s_filters() -> None:
    filters = with_filters("filter A 1", "filter B 1", "filter a 2")
    assert filters.command("filter A ") == "+OK filter added. [A]=[]"
    assert filters.entries == [("B", "1")]


def test_arrays_are_refused_rather_than_pretended() -> None:
    with pytest.raises(UnsupportedFilter):
        EventFilters().command("filter A[1] x")
    with pytest.raises(UnsupportedFilter):
        EventFilters().command("filter A ARRAY::x|:y")


# --------------------------------------------------------------------------- event_handler


def test_no_filter_passes_everything() -> None:
    assert passes(EventFilters(), Event_Name="CHANNEL_PARK")


def test_positive_filters_are_ored_names_and_values_case_insensitive() -> None:
    filters = with_filters("filter event-name channel_hangup_complete", "filter Application bridge")
    assert passes(filters, Event_Name="CHANNEL_HANGUP_COMPLETE")
    assert passes(filters, Event_Name="CHANNEL_EXECUTE_COMPLETE", Application="BRIDGE")
    assert not passes(filters, Event_Name="CHANNEL_EXECUTE_COMPLETE", Application="multiset")
    assert not passes(filters, Event_Name="CHANNEL_EXECUTE_COMPLETE")  # no Application header
    assert not passes(filters, Event_Name="CHANNEL_HANGUP_COMPLETE2")  # whole value


def test_negative_filters_veto_and_alone_pass_nothing() -> None:
    filters = with_filters("filter Event-Name CHANNEL_EXECUTE_COMPLETE", "filter Application -multiset")
    assert passes(filters, Event_Name="CHANNEL_EXECUTE_COMPLETE", Application="bridge")
    assert not passes(filters, Event_Name="CHANNEL_EXECUTE_COMPLETE", Application="multiset")
    veto_first = with_filters("filter Application -multiset", "filter Event-Name CHANNEL_EXECUTE_COMPLETE")
    assert not passes(veto_first, Event_Name="CHANNEL_EXECUTE_COMPLETE", Application="multiset")
    only_negative = with_filters("filter Application -multiset")
    assert not passes(only_negative, Event_Name="CHANNEL_EXECUTE_COMPLETE", Application="bridge")


def test_signs_spaces_and_the_last_sign_wins() -> None:
    assert passes(with_filters("filter A + -+x"), A="x")
    assert not passes(with_filters("filter A +-x", "filter B y"), A="x", B="y")


def test_regular_expressions() -> None:
    filters = with_filters("filter Application /^(bridge|respond)$/")
    assert passes(filters, Application="respond")
    assert not passes(filters, Application="Bridge")  # case-sensitive unless /i
    assert passes(with_filters("filter Application /^BRIDGE$/i"), Application="bridge")
    assert passes(with_filters("filter A /b.c/s"), A="ab\nc")
    assert not passes(with_filters("filter A /unclosed"), A="/unclosed")
    assert not passes(with_filters("filter A /(/"), A="(")
    # the sign comes first: the value no longer starts with '/', so it compares as text
    assert passes(with_filters("filter A +/x/"), A="/x/")


# --------------------------------------------------------------------------- the emulators


def test_the_emulator_sends_only_what_the_engine_s_filters_let_through() -> None:
    from tests.test_loadtest import _emulated_call, floor_server

    with floor_server() as port:
        result = _emulated_call(port)
    assert result.error is None, result.error
    assert result.events == ["CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP_COMPLETE"]
    assert [r for r in result.replies if "filter" in r] == [
        f"+OK filter added. [{name}]=[{value}]" for name, value in EVENT_FILTERS
    ]


def test_the_driver_model_filters_like_the_switch() -> None:
    library = driver.record_library()
    plain = bridge_batch([("a", "b")], "sofia/gateway/g/1").payload
    filtered = plain
    for name, value in EVENT_FILTERS:
        plain = plain.replace(f"filter {name} {value}\n\n".encode(), b"")
    outputs = {}
    for label, batch in (("plain", plain), ("filtered", filtered)):
        call = driver._Call(library, b"b" * 36)
        out = call.feed(driver.CommandSplitter().feed(batch)) + call.hangup()
        frames = driver.split_frames(out)[0]
        outputs[label] = [driver._event_name(f) for f in frames if b"command/reply" not in f[:40]]
        if label == "filtered":
            replies = [f for f in frames if f.startswith(b"Content-Type: command/reply")]
            assert b"Reply-Text: +OK filter added. [Application]=[bridge]\n" in b"".join(replies)
    assert "CHANNEL_EXECUTE_COMPLETE:set" in outputs["plain"]
    assert [n for n in outputs["filtered"] if n.startswith("CHANNEL_")] == [
        "CHANNEL_EXECUTE_COMPLETE:bridge",
        "CHANNEL_HANGUP_COMPLETE",
    ]
