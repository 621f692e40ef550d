"""Frame parsing: the bytes FreeSWITCH sends for one call, through the engine's codec."""

from __future__ import annotations

import pytest

from engine.billing.hangup import HANGUP_HEADERS, parse_hangup
from engine.call.channel import call_request
from engine.esl.protocol import EslParser, Frame, PyEslParser, PyHeaderPicker, parse_event_body
from loadtest.driver import _Call, split_frames

MYEVENTS = _Call.MYEVENTS

try:
    from engine.esl._speedups import EslParser as CompiledParser
except ImportError:
    CompiledParser = None  # type: ignore[assignment,misc]
# Both implementations side by side (round 2: the compiled framer against its Python twin).
PARSERS = pytest.mark.parametrize(
    "parser_class",
    [pytest.param(PyEslParser, id="python")]
    + ([pytest.param(CompiledParser, id="compiled")] if CompiledParser is not None else []),
)

pytestmark = pytest.mark.benchmark(group="esl")


def _connect_reply(fs_library) -> bytes:
    from loadtest.dataset import CallPlan

    plan = CallPlan("accept", "441234567890", sip_auth_username="u1000020", network_ip="192.0.2.10")
    return fs_library.connect_reply(plan, "0b9f2c1e-7d7a-4c3e-9a55-1f0e0c9d8b7a")


def _accepted_call_events(fs_library) -> bytes:
    """What FreeSWITCH writes after callgate's decision for an accepted call (9 sets + bridge)."""
    replies = b"Content-Type: command/reply\nReply-Text: +OK\n\n" * 11
    return (
        replies
        + fs_library.burst("park", MYEVENTS)
        + fs_library.burst("execute_pair", MYEVENTS) * 9
        + fs_library.burst("bridge_start", MYEVENTS)
        + fs_library.burst("bridge_end", MYEVENTS)
    )


@PARSERS
def test_parse_connect_reply_frame(benchmark, fs_library, parser_class) -> None:
    """CHANNEL_DATA (~6 KiB, 165 headers) -> one Frame (outer headers split, not decoded)."""
    data = _connect_reply(fs_library)
    frames = benchmark(lambda: parser_class().feed(data))
    assert len(frames) == 1


@PARSERS
def test_connect_reply_to_call_request(benchmark, fs_library, parser_class) -> None:
    """What the engine does with it: frame, then CallRequest (only the headers used decoded)."""
    data = _connect_reply(fs_library)
    request = benchmark(lambda: call_request(parser_class().feed(data)[0].headers))
    assert request.sip_auth_username == "u1000020"


def test_channel_data_to_call_request(benchmark, fs_library) -> None:
    """Frame -> decoded channel data (every value unquoted) -> CallRequest."""
    frame = EslParser().feed(_connect_reply(fs_library))[0]
    request = benchmark(lambda: call_request(frame.channel_data()))
    assert request.sip_auth_username == "u1000020"


@PARSERS
def test_frame_accepted_call_event_stream(benchmark, fs_library, parser_class) -> None:
    """Cut ~200 KiB of replies and events (one accepted call) into frames, 64 KiB reads."""
    data = _accepted_call_events(fs_library)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]

    def run() -> int:
        parser = parser_class()
        return sum(len(parser.feed(chunk)) for chunk in chunks)

    assert benchmark(run) == 11 + 1 + 18 + 4 + 9


def test_event_name_peek(benchmark, fs_library) -> None:
    frame = EslParser().feed(fs_library.burst("execute_pair", MYEVENTS))[1]
    assert benchmark(lambda: frame.event_name) == "CHANNEL_EXECUTE_COMPLETE"


def test_decode_execute_complete_event(benchmark, fs_library) -> None:
    """Full decode of one CHANNEL_EXECUTE_COMPLETE (~150 headers): what the engine does
    today for every `set` it sent, although it only needs the bridge's."""
    frame = EslParser().feed(fs_library.burst("execute_pair", MYEVENTS))[1]
    event = benchmark(lambda: parse_event_body(frame.body))
    assert event["Application"] == "set"


def test_application_peek_without_decoding(benchmark, fs_library) -> None:
    """The alternative: find the Application header in the raw body, decode nothing."""
    frame = EslParser().feed(fs_library.burst("execute_pair", MYEVENTS))[1]

    def peek() -> bytes:
        body = frame.body
        at = body.find(b"\nApplication: ")
        return body[at + 14 : body.find(b"\n", at + 14)]

    assert benchmark(peek) == b"set"


def test_driver_split_frames_reference(benchmark, fs_library) -> None:
    """Reference: the floor server's/driver's minimal framing of the same stream."""
    data = _accepted_call_events(fs_library)
    frames, rest = benchmark(lambda: split_frames(data))
    assert len(frames) == 43 and rest == b""


# Round 3: the hangup side. Billing reads ~25 of CHANNEL_HANGUP_COMPLETE's ~280 headers.

try:
    from engine.esl._speedups import HeaderPicker as CompiledPicker
except ImportError:
    CompiledPicker = None  # type: ignore[assignment,misc]
PICKERS = pytest.mark.parametrize(
    "picker_class",
    [pytest.param(PyHeaderPicker, id="python")]
    + ([pytest.param(CompiledPicker, id="compiled")] if CompiledPicker is not None else []),
)


def _hangup_complete(fs_library) -> Frame:
    for frame in EslParser().feed(fs_library.burst("bridge_end", MYEVENTS)):
        if frame.event_name == "CHANNEL_HANGUP_COMPLETE":
            return frame
    raise AssertionError("no CHANNEL_HANGUP_COMPLETE in the recorded bridge end")


def test_hangup_split_every_header_reference(benchmark, fs_library) -> None:
    """Before round 3: every header line split into a dict (what the driver did per call)."""
    body = _hangup_complete(fs_library).body

    def split() -> dict[str, str]:
        head = body[: body.find(b"\n\n")].decode("utf-8", errors="replace")
        raw: dict[str, str] = {}
        for line in head.split("\n"):
            name, _sep, value = line.partition(": ")
            if name not in raw:
                raw[name] = value.removesuffix("\r")
        return raw

    assert len(benchmark(split)) > 200


@PICKERS
def test_hangup_pick_billing_headers(benchmark, fs_library, picker_class) -> None:
    """Round 3: only the headers billing reads, picked and decoded."""
    body = _hangup_complete(fs_library).body
    picker = picker_class(HANGUP_HEADERS)
    picked = benchmark(lambda: picker.pick(body))
    assert parse_hangup(picked).uuid


@PICKERS
def test_hangup_pick_and_parse(benchmark, fs_library, picker_class) -> None:
    """Picked headers -> CallEnd (the billing facts), what each accepted call's hangup costs
    before rating."""
    body = _hangup_complete(fs_library).body
    picker = picker_class(HANGUP_HEADERS)
    assert benchmark(lambda: parse_hangup(picker.pick(body))).uuid


def test_event_header_on_execute_complete(benchmark, fs_library) -> None:
    """The session's reads of a CHANNEL_EXECUTE_COMPLETE: Application, then Answer-State."""
    frame = EslParser().feed(fs_library.burst("execute_pair", MYEVENTS))[1]
    got = benchmark(lambda: (frame.event_header("Application"), frame.event_header("Answer-State")))
    assert got[0] == "set"
