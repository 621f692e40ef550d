"""HeaderPicker: a few named headers out of a serialized event, the Python and compiled twins.

Both are checked against a line-by-line reference (the rules in PyHeaderPicker's docstring)
and against each other: on every event of FreeSWITCH's captures, on every truncation of
their CHANNEL_HANGUP_COMPLETE bodies, and on seeded random bodies built to hit the edges
(duplicates, names that are prefixes or suffixes of others, CRs, blank-line terminators,
percent-escapes, invalid UTF-8, lines that are not headers).
"""

from __future__ import annotations

import random
import re

import pytest

from engine.billing.hangup import HANGUP_HEADERS
from engine.esl import protocol
from engine.esl.protocol import PyHeaderPicker, decode_value
from tests.billing.captures import CAPTURES, frames
from tests.test_esl_protocol import CAPTURES as PROTOCOL_CAPTURES
from tests.test_esl_protocol import fs_stream

try:
    from engine.esl import _speedups

    # the compiled twin is not a subclass, but has the same interface
    COMPILED: type[PyHeaderPicker] | None = _speedups.HeaderPicker  # type: ignore[assignment]
except ImportError:
    COMPILED = None

PICKERS: list[type[PyHeaderPicker]] = [PyHeaderPicker] + ([COMPILED] if COMPILED else [])
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="engine.esl._speedups is not built")
_BLOCK_END = re.compile(rb"\n\r?\n")
# What the call session reads from single events (engine/call/session.py).
SESSION_READS = (
    "Event-Name",
    "Application",
    "Answer-State",
    "Hangup-Cause",
    "variable_originate_disposition",
)


def reference_pick(body: bytes, names: tuple[str, ...]) -> dict[str, str]:
    """The specification, line by line: what the two twins must both return."""
    end = _BLOCK_END.search(body)
    head = body if end is None else body[: end.start()]
    wanted = {name.encode(): name for name in names}
    found: dict[str, str] = {}
    for line in head.split(b"\n"):
        name, sep, value = line.partition(b": ")
        if not sep or name not in wanted or wanted[name] in found:
            continue
        found[wanted[name]] = decode_value(value.removesuffix(b"\r").decode("utf-8", errors="replace"))
    return {name: found[name] for name in names if name in found}  # in the order of names


def same_picks(body: bytes, names: tuple[str, ...]) -> None:
    expected = reference_pick(body, names)
    for picker in PICKERS:
        got = picker(names).pick(body)
        assert list(got.items()) == list(expected.items()), (picker, body[:200], names)


def capture_events() -> list[bytes]:
    """Every event FreeSWITCH sent in the billing captures and the protocol tests' captures."""
    found = [frame for capture in sorted(CAPTURES.glob("*_wire.txt")) for frame in frames(capture.name)]
    for name in PROTOCOL_CAPTURES:
        found += protocol.PyEslParser().feed(fs_stream(name))
    return [frame.body for frame in found if frame.content_type == "text/event-plain"]


def test_every_header_of_every_captured_event_as_a_full_decode_reads_it() -> None:
    bodies = capture_events()
    assert len(bodies) >= 40
    for body in bodies:
        event = protocol.parse_event_body(body)
        event.pop("_body", None)
        names = (*event, "No-Such-Header", "variable_no_such_variable")
        for picker in PICKERS:
            assert picker(names).pick(body) == event
            for name in SESSION_READS:  # one name at a time, as Frame.event_header asks
                assert picker((name,)).pick(body) == ({name: event[name]} if name in event else {})


@pytest.mark.slow
def test_twins_agree_on_every_truncation_of_the_captured_hangups() -> None:
    names = (*HANGUP_HEADERS, "Event-Name", "Content-Length", "variable_sip_gateway_name", "Core-UUID")
    hangups = [body for body in capture_events() if body.startswith(b"Event-Name: CHANNEL_HANGUP_COMPLETE")]
    assert len(hangups) >= 3
    for body in hangups:
        for cut in range(len(body) + 1):
            same_picks(body[:cut], names)
            # a few names: found one by one (the Python twin's other strategy)
            same_picks(body[:cut], ("Hangup-Cause", "variable_billsec", "Unique-ID"))


# Pieces chosen to collide: names that are prefixes, suffixes and case variants of each other.
_NAMES = ["A", "AA", "xA", "A-B", "a", "Unique-ID", "Other-Leg-Unique-ID", "B_c", "Z"]
_PIECES = [
    *(name.encode() for name in _NAMES),
    b": ",
    b": ",
    b":",
    b"::",
    b" ",
    b"\n",
    b"\n",
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n",
    b"\n\r\n",
    b"%41",
    b"%0A",
    b"%zz",
    b"%",
    b"_undef_",
    b"\xc3\xa9",
    b"\xff",
    b"\xe2\x82",
    b"value",
    b"sip:1@2",
]


def random_body(rng: random.Random) -> bytes:
    lines = []
    for _ in range(rng.randint(0, 12)):
        if rng.random() < 0.7:  # a well-formed header, possibly odd inside
            value = b"".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 3))).replace(b"\n", b"")
            lines.append(rng.choice(_NAMES).encode() + b": " + value + rng.choice([b"", b"", b"\r"]))
        else:
            lines.append(b"".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 5))))
    return b"\n".join(lines) + rng.choice([b"", b"\n", b"\n\n", b"\n\r\nA: after", b"\n\nZ: body"])


@pytest.mark.parametrize("seed", range(300))
def test_twins_agree_with_the_reference_on_random_bodies(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        names = tuple(rng.sample(_NAMES, rng.randint(0, len(_NAMES))))
        same_picks(random_body(rng), names)


@pytest.mark.parametrize("picker", PICKERS)
def test_names_are_checked_and_kept_in_order_without_duplicates(picker: type[PyHeaderPicker]) -> None:
    assert picker(["B", "A", "B"]).names == ("B", "A")
    assert picker(iter(["x"])).names == ("x",)
    assert picker([]).pick(b"A: b\n\n") == {}
    for bad in ["", "a b", "a:b", "a\n", "\u00e9", "x" * 256]:
        with pytest.raises(ValueError, match=re.escape(f"invalid header name: {bad!r}")):
            picker([bad])
    with pytest.raises(TypeError, match="header names are str, not bytes"):
        picker([b"A"])  # type: ignore[list-item]
    assert picker(["x" * 255]).pick(b"x" * 255 + b": v") == {"x" * 255: "v"}


@pytest.mark.parametrize("picker", PICKERS)
def test_a_value_is_decoded_and_its_line_loses_one_cr(picker: type[PyHeaderPicker]) -> None:
    body = b"Event-Name: X\nA: 1%3A2%0A3\r\nB: _undef_\nC: \r\r\nOther-Unique-ID: no\nUnique-ID: u\n\nA: body"
    assert picker(["Unique-ID", "A", "B", "C", "D"]).pick(body) == {
        "Unique-ID": "u",
        "A": "1:2\n3",
        "B": "",
        "C": "\r",
    }
    # any bytes-like body (PyHeaderPicker.pick is annotated bytes, narrower than what it takes)
    assert picker(["A"]).pick(bytearray(b"A: b")) == {"A": "b"}


def test_the_active_picker_follows_the_active_parser() -> None:
    expected = COMPILED if protocol.IMPLEMENTATION == "compiled" else PyHeaderPicker
    assert protocol.HeaderPicker is expected
