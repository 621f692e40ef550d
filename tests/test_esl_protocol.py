"""Tests for engine.esl.protocol: real FreeSWITCH captures, chunking, framing attacks, serializers.

No sockets: everything is bytes in, frames out.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType

import pytest

from engine.esl import protocol
from engine.esl.protocol import (
    MAX_HEADER_ARG_BYTES,
    EslParser,
    Frame,
    ProtocolError,
    PyEslParser,
    command,
    decode_value,
    encode_value,
    parse_event_body,
    sendmsg_execute,
    sendmsg_hangup,
    set_variable,
)

FIXTURES = Path(__file__).parent / "fixtures"
UUID = "18de0cbf-f510-4eca-83b5-35ad4384bf5e"
SECTION = re.compile(rb"^----- (>>|<<) -----\n", re.MULTILINE)


# --------------------------------------------------------------------------- helpers


def wire_sections(name: str) -> list[tuple[str, bytes]]:
    """Split a ``*_wire.txt`` transcript into (direction, bytes); each section ends with one extra newline."""
    parts = SECTION.split((FIXTURES / name).read_bytes())
    assert parts[0] == b""
    sections = []
    for direction, content in zip(parts[1::2], parts[2::2], strict=True):
        assert content.endswith(b"\n")
        sections.append((direction.decode(), content[:-1]))
    return sections


def fs_stream(name: str) -> bytes:
    return b"".join(data for direction, data in wire_sections(name) if direction == "<<")


def server_writes(name: str) -> list[bytes]:
    return [data for direction, data in wire_sections(name) if direction == ">>"]


def command_replies() -> dict[str, bytes]:
    """command_replies.txt as frames; its ``<body>: `` line only marks the (empty) body."""
    text = (FIXTURES / "command_replies.txt").read_bytes()
    parts = re.split(rb"^===== reply to (.+) =====\n", text, flags=re.MULTILINE)
    return {
        title.decode(): block.replace(b"<body>: \n", b"")
        for title, block in zip(parts[1::2], parts[2::2], strict=True)
    }


def feed_in_chunks(data: bytes, sizes: Iterable[int], parser: EslParser | None = None) -> list[Frame]:
    parser = parser or EslParser()
    frames: list[Frame] = []
    pos = 0
    for size in sizes:
        if pos >= len(data):
            break
        frames += parser.feed(data[pos : pos + size])
        pos += size
    frames += parser.feed(data[pos:])
    assert parser.buffered == 0
    return frames


def random_sizes(seed: int, low: int = 1, high: int = 700) -> Iterable[int]:
    rng = random.Random(seed)
    while True:
        yield rng.randint(low, high)


def parse_all(data: bytes, **limits: int) -> list[Frame]:
    parser = EslParser(**limits)
    frames = parser.feed(data)
    assert parser.buffered == 0
    return frames


def event_frame(body: bytes) -> bytes:
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(body) + body


def fs_read_command(data: bytes) -> tuple[str, dict[str, str], bytes, bytes]:
    """What mod_event_socket's read_packet makes of a client command (a test oracle).

    Leading CR/LF are skipped; the block ends at a newline followed by optional CRs and a
    newline; each line is cut at its first CR; header names are case-insensitive, the
    value starts after the first ':' and its leading spaces; Content-Length bytes follow.
    """
    data = data.lstrip(b"\r\n")
    end = re.search(rb"\n\r*\n", data)
    assert end is not None, "incomplete command"
    lines = [line.split(b"\r")[0].decode() for line in data[: end.start()].split(b"\n")]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        assert sep, f"FreeSWITCH would drop line {line!r}"
        headers[name.lower()] = value.lstrip(" ")
    length = int(headers.get("content-length", "0"))
    rest = data[end.end() :]
    return lines[0], headers, rest[:length], rest[length:]


def fs_app_arg(headers: dict[str, str], body: bytes) -> str:
    """switch_ivr_parse_event: the header, else a text/plain body."""
    if headers.get("execute-app-arg"):
        return headers["execute-app-arg"]
    if headers.get("content-type", "").lower() == "text/plain":
        return body.decode()
    return ""


CAPTURES = ["connect_reply_raw.txt", "bridged_call_wire.txt", "respond_403_wire.txt"]
BRIDGED_EVENTS = [
    "CHANNEL_PARK",
    "CHANNEL_EXECUTE",
    "CHANNEL_PROGRESS",
    "CHANNEL_ANSWER",
    "CHANNEL_BRIDGE",
    "CHANNEL_HANGUP",
    "CHANNEL_UNBRIDGE",
    "CHANNEL_EXECUTE_COMPLETE",
    "CHANNEL_UNPARK",
    "CHANNEL_EXECUTE_COMPLETE",
    "CHANNEL_STATE",
    "CHANNEL_STATE",
    "CHANNEL_HANGUP_COMPLETE",
]


def kinds(frames: list[Frame]) -> list[str]:
    out = []
    for frame in frames:
        if frame.content_type == "text/event-plain":
            out.append(frame.event()["Event-Name"])
        elif frame.content_type == "command/reply":
            out.append(f"reply {frame.reply_text!r}")
        else:
            out.append(frame.content_type)
    return out


# --------------------------------------------------------------------------- the captures


def test_transcript_helper_splits_both_directions() -> None:
    sections = wire_sections("bridged_call_wire.txt")
    assert [d for d, _ in sections[:5]] == [">>", "<<", ">>", "<<", ">>"]
    assert sections[0] == (">>", b"connect\n\n")
    assert sections[-1][1].startswith(b"Content-Type: text/disconnect-notice\n")
    assert len(sections) == 22


def test_connect_reply() -> None:
    [frame] = parse_all(fs_stream("connect_reply_raw.txt"))
    assert frame.content_type == "command/reply"
    assert frame.body == b""
    assert frame.headers["Reply-Text"] == "%2BOK%0A"  # outer headers stay as received
    assert frame.reply_text == "+OK\n"
    assert frame.reply_ok()
    assert len(frame.headers) == 165
    assert list(frame.headers)[-4:] == ["Content-Type", "Reply-Text", "Socket-Mode", "Control"]

    data = frame.channel_data()
    assert data["Reply-Text"] == "+OK\n"
    assert data["Event-Name"] == "CHANNEL_DATA"
    assert data["Unique-ID"] == UUID
    assert data["Channel-Name"] == "sofia/internal/sipp@127.0.0.1:5070"
    assert data["variable_sip_full_via"] == "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-31365-1-0"
    assert data["variable_sip_full_from"] == "sipp <sip:sipp@127.0.0.1:5070>;tag=31365SIPpTag001"
    assert data["variable_sip_req_user"] == "4412345678"
    assert data["variable_sip_network_ip"] == "127.0.0.1"
    assert data["variable_DP_MATCH"] == "ARRAY::4412345678|:4412345678"
    assert data["FreeSWITCH-IPv6"] == "fd00::2"
    assert data["Event-Date-GMT"] == "Wed, 25 Nov 2026 20:22:46 GMT"
    assert data["Socket-Mode"] == "async"
    assert data["Control"] == "full"
    sdp = data["variable_switch_r_sdp"]
    assert sdp.startswith("v=0\r\no=user1 ") and sdp.endswith("a=rtpmap:0 PCMU/8000\r\n")


def test_bridged_call_frames() -> None:
    frames = parse_all(fs_stream("bridged_call_wire.txt"))
    assert len(frames) == 18
    assert kinds(frames) == [
        "reply '+OK\\n'",
        "reply '+OK Events Enabled'",
        "reply '+OK will linger'",
        "reply '+OK'",
        *BRIDGED_EVENTS,
        "text/disconnect-notice",
    ]
    assert all(f.reply_ok() for f in frames[:4])
    assert not any(f.reply_ok() for f in frames[4:])
    events = [f.event() for f in frames[4:-1]]
    assert all(e["Unique-ID"] == UUID for e in events)
    assert all(f.headers["Content-Length"] == str(len(f.body)) for f in frames[4:-1])
    execute = events[1]
    assert execute["Application"] == "bridge"
    assert execute["Application-Data"] == "sofia/internal/4412345678@127.0.0.1:5090"
    bridge = events[4]
    assert bridge["Other-Leg-Unique-ID"] == "9c7a5567-9d01-486e-bcc9-0fc3302b0e6c"


def test_hangup_complete_carries_hangup_cause_twice() -> None:
    frames = parse_all(fs_stream("bridged_call_wire.txt"))
    complete = frames[-2]
    assert complete.body.count(b"\nHangup-Cause: NORMAL_CLEARING\n") == 2
    event = complete.event()
    assert event["Event-Name"] == "CHANNEL_HANGUP_COMPLETE"
    assert event["Hangup-Cause"] == "NORMAL_CLEARING"
    assert event["variable_sip_full_via"].startswith("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-")
    assert "_body" not in event


def test_linger_disconnect_notice() -> None:
    notice = parse_all(fs_stream("bridged_call_wire.txt"))[-1]
    assert notice.content_type == "text/disconnect-notice"
    assert notice.headers["Content-Disposition"] == "linger"
    assert notice.headers["Linger-Time"] == "-1"
    assert notice.headers["Controlled-Session-UUID"] == UUID
    assert notice.headers["Channel-Name"] == "sofia/internal/sipp@127.0.0.1:5070"  # not encoded
    assert notice.body == b""
    assert not notice.reply_ok()
    with pytest.raises(ValueError, match="not an event frame"):
        notice.event()


def test_respond_403_frames() -> None:
    frames = parse_all(fs_stream("respond_403_wire.txt"))
    assert len(frames) == 14
    assert kinds(frames)[4:] == [
        "CHANNEL_PARK",
        "CHANNEL_EXECUTE",
        "text/disconnect-notice",
        "CHANNEL_HANGUP",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_UNPARK",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_STATE",
        "CHANNEL_STATE",
        "CHANNEL_HANGUP_COMPLETE",
    ]
    assert frames[5].event()["Application-Data"] == "403 Forbidden"
    complete = frames[-1].event()
    assert complete["Hangup-Cause"] == "CALL_REJECTED"
    assert complete["Event-Name"] == "CHANNEL_HANGUP_COMPLETE"


def test_command_replies_file() -> None:
    replies = command_replies()
    assert set(replies) == {"myevents", "linger", "sendmsg", "disconnect-notice"}
    stream = b"".join(replies.values())
    frames = parse_all(stream)
    assert [f.reply_text for f in frames[:3]] == ["+OK Events Enabled", "+OK will linger", "+OK"]
    assert all(f.reply_ok() for f in frames[:3])
    assert frames[3].headers["Content-Disposition"] == "linger"
    assert frames[3].headers["Content-Length"] == "0"


@pytest.mark.parametrize("name", CAPTURES)
def test_one_byte_at_a_time_gives_the_same_frames(name: str) -> None:
    data = fs_stream(name)
    whole = parse_all(data)
    parser = EslParser()
    frames = []
    for i in range(len(data)):
        frames += parser.feed(data[i : i + 1])
    assert frames == whole
    assert parser.buffered == 0


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("name", CAPTURES)
def test_random_chunks_give_the_same_frames(name: str, seed: int) -> None:
    data = fs_stream(name)
    assert feed_in_chunks(data, random_sizes(seed)) == parse_all(data)


def test_every_split_point_of_a_small_stream() -> None:
    data = b"".join(command_replies().values()) + event_frame(b"Event-Name: CUSTOM\nA: %E2%82%AC\n\n")
    whole = parse_all(data)
    for cut in range(len(data) + 1):
        parser = EslParser()
        assert parser.feed(data[:cut]) + parser.feed(data[cut:]) == whole


def test_all_captures_back_to_back_in_one_feed() -> None:
    data = b"".join(fs_stream(name) for name in CAPTURES)
    assert len(parse_all(data)) == 1 + 18 + 14


def test_encoder_reproduces_freeswitch_byte_for_byte() -> None:
    """decode then encode gives back every serialized value FreeSWITCH sent."""
    frames = parse_all(fs_stream("bridged_call_wire.txt") + fs_stream("respond_403_wire.txt"))
    values = [v for f in frames if "Event-Name" in f.headers for v in f.headers.values()]
    for frame in frames:
        if frame.content_type == "text/event-plain":
            values += [line.split(": ", 1)[1] for line in frame.body.decode().split("\n") if line]
    assert len(values) > 2000
    assert any("%" in v for v in values)
    for raw in values:
        assert encode_value(decode_value(raw)) == raw


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("%2BOK%0A", "+OK\n"),
        ("_undef_", ""),
        ("plain", "plain"),
        ("a+b", "a+b"),  # no form-decoding: '+' is not a space
        ("100%", "100%"),
        ("%zz%4", "%zz%4"),
        ("%e2%82%ac", "€"),
        ("%E2%82%AC", "€"),
        ("caf%C3%A9", "café"),
        ("%FF", "\ufffd"),
        ("sofia/internal/sipp%40127.0.0.1%3A5070", "sofia/internal/sipp@127.0.0.1:5070"),
        ("%5F%5Fundef%5F", "__undef_"),
        ("", ""),
    ],
)
def test_decode_value(raw: str, decoded: str) -> None:
    assert decode_value(raw) == decoded


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("", "_undef_"),
        ("+OK\n", "%2BOK%0A"),
        ("sofia/internal/sipp@127.0.0.1:5070", "sofia/internal/sipp%40127.0.0.1%3A5070"),
        ("a b", "a%20b"),
        ("café", "caf%C3%A9"),
        ("\x7f\x01\t", "%7F%01%09"),
        ("!$'()*,-./09AZ_az~", "!$'()*,-./09AZ_az~"),
        ("%41", "%41"),  # FreeSWITCH does not re-encode an upper-case %XX escape
        ("%4a", "%254a"),
        ("100%", "100%25"),
        ("%%41", "%25%41"),
    ],
)
def test_encode_value(value: str, encoded: str) -> None:
    assert encode_value(value) == encoded


def test_encode_value_covers_freeswitch_unsafe_set() -> None:
    for char in '\r\n #%&+:;<=>?@[\\]^`{|}"':
        assert encode_value(char) == f"%{ord(char):02X}"
    for code in range(0x21, 0x7F):
        char = chr(code)
        if char not in '#%&+:;<=>?@[\\]^`{|}"':
            assert encode_value(char) == char


@pytest.mark.parametrize("seed", range(5))
def test_encode_decode_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab:; \n\r\t+=&?@/%_-é€\U0001f600\x00~"
    for _ in range(200):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        if re.search(r"%[0-9A-F]{2}", value):
            continue  # FreeSWITCH keeps those literally, so they decode lossy
        assert decode_value(encode_value(value)) == value


# --------------------------------------------------------------------------- event bodies


def test_encoded_newline_stays_inside_its_value() -> None:
    body = b"Event-Name: CUSTOM\nEvil: x%0AInjected: yes%0A%0AContent-Length: 3\nAfter: ok\n\n"
    event = parse_all(event_frame(body))[0].event()
    assert event["Evil"] == "x\nInjected: yes\n\nContent-Length: 3"
    assert "Injected" not in event
    assert "Content-Length" not in event
    assert event["After"] == "ok"


def test_undef_value_is_empty() -> None:
    event = parse_event_body(b"Event-Name: CUSTOM\nvariable_empty: _undef_\nOther: _undef_x\n\n")
    assert event["variable_empty"] == ""
    assert event["Other"] == "_undef_x"


def test_event_with_inner_body() -> None:
    inner = "+OK job done\nSecond-Line: not a header\n\nnext €".encode()
    body = b"Event-Name: BACKGROUND_JOB\nJob-UUID: 7f4d\nContent-Length: %d\n\n" % len(inner) + inner
    [frame] = parse_all(event_frame(body))
    event = frame.event()
    assert event["_body"] == "+OK job done\nSecond-Line: not a header\n\nnext €"
    assert event["Job-UUID"] == "7f4d"
    assert event["Content-Length"] == str(len(inner))
    assert "Second-Line" not in event


def test_event_inner_body_truncated_or_bad() -> None:
    with pytest.raises(ProtocolError, match="Content-Length"):
        parse_event_body(b"Event-Name: X\nContent-Length: 10\n\nshort")
    with pytest.raises(ProtocolError, match="bad Content-Length"):
        parse_event_body(b"Event-Name: X\nContent-Length: ten\n\nshort")


def test_event_empty_inner_body() -> None:
    assert parse_event_body(b"Event-Name: X\nContent-Length: 0\n\n")["_body"] == ""


def test_event_duplicate_headers_keep_first() -> None:
    event = parse_event_body(b"Event-Name: X\nHangup-Cause: FIRST\nHangup-Cause: SECOND\n\n")
    assert event["Hangup-Cause"] == "FIRST"


def test_event_line_without_separator_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="no ': '"):
        parse_event_body(b"Event-Name: X\ngarbage\n\n")


def test_event_body_accepts_crlf() -> None:
    assert parse_event_body(b"Event-Name: X\r\nA: %41\r\n\r\n") == {"Event-Name": "X", "A": "A"}


def test_event_body_without_final_blank_line() -> None:
    assert parse_event_body(b"Event-Name: X\nA: b\n") == {"Event-Name": "X", "A": "b"}
    assert parse_event_body(b"") == {}


def test_event_names_are_not_decoded() -> None:
    assert parse_event_body(b"variable_a%20b: c%20d\n\n") == {"variable_a%20b": "c d"}


# --------------------------------------------------------------------------- utf-8 and chunking


def test_multibyte_character_split_across_feeds() -> None:
    name = "sofia/internal/José€@127.0.0.1".encode()
    frame = b"Content-Type: text/disconnect-notice\nChannel-Name: " + name + b"\nContent-Length: 0\n\n"
    api_body = "Grüße €\n".encode()
    api = b"Content-Type: api/response\nContent-Length: %d\n\n" % len(api_body) + api_body
    event = event_frame("Event-Name: CUSTOM\nRaw: naïve\nEnc: %E2%82%AC\n\n".encode())
    data = frame + api + event
    for cut in [i for i, b in enumerate(data) if b >= 0x80]:  # cut inside every multibyte char
        parser = EslParser()
        frames = parser.feed(data[:cut]) + parser.feed(data[cut:])
        assert frames[0].headers["Channel-Name"] == "sofia/internal/José€@127.0.0.1"
        assert frames[1].body.decode() == "Grüße €\n"
        assert frames[2].event() == {"Event-Name": "CUSTOM", "Raw": "naïve", "Enc": "€"}


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    [frame] = parse_all(b"Content-Type: command/reply\nReply-Text: -ERR \xff\xfe\n\n")
    assert frame.reply_text == "-ERR \ufffd\ufffd"
    assert parse_event_body(b"A: \xffb%FF\n\n") == {"A": "\ufffdb\ufffd"}


def test_pipelined_replies_in_one_chunk() -> None:
    reply = b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    frames = parse_all(reply * 7)
    assert len(frames) == 7
    assert all(f.reply_ok() for f in frames)


def test_body_bytes_are_not_parsed_as_frames() -> None:
    body = b"Content-Type: command/reply\nReply-Text: +OK\n\n\n\nnot: a frame\n"
    data = b"Content-Type: api/response\nContent-Length: %d\n\n" % len(body) + body
    frames = parse_all(data + data)
    assert [f.body for f in frames] == [body, body]
    assert [f.content_type for f in frames] == ["api/response", "api/response"]


def test_disconnect_notice_with_text_body() -> None:
    text = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
    data = (
        b"Content-Type: text/disconnect-notice\nControlled-Session-UUID: %s\n"
        b"Content-Disposition: disconnect\nContent-Length: %d\n\n" % (UUID.encode(), len(text))
    ) + text
    [frame] = parse_all(data)
    assert frame.headers["Content-Disposition"] == "disconnect"
    assert frame.body == text


def test_api_response_and_zero_length() -> None:
    frames = parse_all(
        b"Content-Type: api/response\nContent-Length: 4\n\n+OK\n"
        b"Content-Type: api/response\nContent-Length: 0\n\n"
        b"Content-Type: api/response\nContent-Length: 007\n\n1234567"
    )
    assert [f.body for f in frames] == [b"+OK\n", b"", b"1234567"]
    assert not frames[0].reply_ok()


@pytest.mark.parametrize("name", ["bridged_call_wire.txt", "respond_403_wire.txt"])
def test_event_name_without_full_parse(name: str) -> None:
    frames = parse_all(fs_stream(name))
    for frame in frames:
        expected = frame.event()["Event-Name"] if frame.content_type == "text/event-plain" else ""
        assert frame.event_name == expected


def test_event_name_edge_cases() -> None:
    def frame(body: bytes) -> Frame:
        return Frame({"Content-Type": "text/event-plain"}, body)

    assert frame(b"Event-Name: CUSTOM").event_name == "CUSTOM"
    assert frame(b"Event-Name: A%20B\r\nX: y\r\n\r\n").event_name == "A B"
    assert frame(b"Core-UUID: x\nEvent-Name: LATE\n\n").event_name == "LATE"
    assert frame(b"Core-UUID: x\n\n").event_name == ""


def test_reply_ok_variants() -> None:
    def reply(text: bytes) -> Frame:
        return parse_all(b"Content-Type: command/reply\nReply-Text: " + text + b"\n\n")[0]

    assert reply(b"+OK accepted").reply_ok()
    assert not reply(b"-ERR command not found").reply_ok()
    assert not reply(b"-ERR invalid session id [x]").reply_ok()
    assert reply(b"%2BOK%0A").reply_text == "%2BOK%0A"  # only the connect reply is encoded
    assert not parse_all(b"Content-Type: api/response\nReply-Text: +OK\n\n")[0].reply_ok()
    assert Frame({}).content_type == ""
    assert not Frame({}).reply_ok()


def test_outer_duplicate_headers_keep_first() -> None:
    [frame] = parse_all(b"Content-Type: command/reply\nReply-Text: +OK\nReply-Text: -ERR\n\n")
    assert frame.headers["Reply-Text"] == "+OK"


def test_duplicate_content_length_uses_first() -> None:
    [frame] = parse_all(b"Content-Type: api/response\nContent-Length: 2\nContent-Length: 5\n\nok")
    assert frame.body == b"ok"


def test_outer_value_keeps_colons_and_spaces() -> None:
    [frame] = parse_all(b"Content-Type: command/reply\nReply-Text: -ERR a: b  \n\n")
    assert frame.headers["Reply-Text"] == "-ERR a: b  "
    [frame] = parse_all(b"Content-Type: command/reply\nReply-Text: \n\n")
    assert frame.headers["Reply-Text"] == ""


def test_crlf_line_endings_are_accepted() -> None:
    lf = (
        b"Content-Type: api/response\nContent-Length: 3\n\nabc"
        b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    )
    crlf = (
        b"Content-Type: api/response\r\nContent-Length: 3\r\n\r\nabc"
        b"Content-Type: command/reply\r\nReply-Text: +OK\r\n\r\n"
    )
    expected = parse_all(lf)
    assert parse_all(crlf) == expected
    assert feed_in_chunks(crlf, [1] * len(crlf)) == expected


def test_bare_cr_inside_a_value_is_data() -> None:
    [frame] = parse_all(b"Content-Type: command/reply\nReply-Text: a\rb\n\n")
    assert frame.headers["Reply-Text"] == "a\rb"


def test_blank_lines_between_frames_are_skipped() -> None:
    reply = b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    data = b"\n\r\n" + reply + b"\n\n\n" + reply + b"\r\n"
    assert parse_all(data) == parse_all(reply * 2)
    assert feed_in_chunks(data, [1] * len(data)) == parse_all(reply * 2)


def test_buffered_counts_bytes_of_the_unfinished_frame() -> None:
    parser = EslParser()
    assert parser.feed(b"") == []
    assert parser.buffered == 0
    assert parser.feed(b"Content-Type: api/response\nContent-Length: 5\n") == []
    assert parser.buffered == 45
    assert parser.feed(b"\nab") == []  # headers complete, body pending
    assert parser.buffered == 48
    [frame] = parser.feed(b"cdeContent-Type: x")
    assert frame.body == b"abcde"
    assert parser.buffered == len(b"Content-Type: x")


def test_header_search_resumes_where_it_stopped() -> None:
    """White box: the terminator search does not restart from the beginning on each feed."""
    parser = EslParser()
    parser.feed(b"Content-Type: command/reply\nReply-Text: +OK")
    assert parser._scan == parser.buffered - 2
    parser.feed(b" more text")
    assert parser._scan == parser.buffered - 2
    assert len(parser.feed(b"\n\n")) == 1
    assert parser._scan == 0


def test_large_frames_in_small_chunks() -> None:
    big_value = "x" * 200_000
    body = b"Event-Name: CUSTOM\nBig: %s\n\n" % big_value.encode()
    data = event_frame(body) + b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    frames = feed_in_chunks(data, random_sizes(1, 1, 3000))
    assert frames[0].event()["Big"] == big_value
    assert frames[1].reply_ok()


def test_frame_is_immutable() -> None:
    [frame] = parse_all(b"Content-Type: command/reply\nReply-Text: +OK\n\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.body = b"x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        frame.headers["Reply-Text"] = "-ERR"  # type: ignore[index]


# --------------------------------------------------------------------------- malformed input


GARBAGE = {
    "no colon": b"Content-Type command/reply\n\n",
    "colon without space": b"Content-Type:command/reply\n\n",
    "empty name": b": value\n\n",
    "empty name and value": b"Content-Type: x\n: \n\n",
    "second line bad": b"Content-Type: command/reply\nReply-Text\n\n",
    "content-length abc": b"Content-Type: api/response\nContent-Length: abc\n\n",
    "content-length -1": b"Content-Type: api/response\nContent-Length: -1\n\n",
    "content-length +5": b"Content-Type: api/response\nContent-Length: +5\n\nhello",
    "content-length space": b"Content-Type: api/response\nContent-Length:  5\n\nhello",
    "content-length 1.5": b"Content-Type: api/response\nContent-Length: 1.5\n\n",
    "content-length empty": b"Content-Type: api/response\nContent-Length: \n\n",
    "content-length unicode digit": "Content-Length: \u0663\n\n".encode(),
    "content-length underscore": b"Content-Length: 1_0\n\n0123456789",
    "content-length huge": b"Content-Length: " + b"9" * 5000 + b"\n\n",
    "content-length over limit": b"Content-Length: 1048577\n\n",
    "stray carriage returns": b"\r\r\n\n",
}


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_raises(name: str) -> None:
    with pytest.raises(ProtocolError):
        EslParser().feed(GARBAGE[name])


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_raises_whatever_the_chunking(name: str) -> None:
    parser = EslParser()
    with pytest.raises(ProtocolError):
        for byte in GARBAGE[name]:
            parser.feed(bytes([byte]))


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_raise(seed: int) -> None:
    rng = random.Random(seed)
    junk = bytes(b for b in rng.randbytes(rng.randint(1, 500)) if b not in b":\n")
    with pytest.raises(ProtocolError):
        EslParser().feed(b"x" + junk + b"\n\n")


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_never_crash_otherwise(seed: int) -> None:
    """Any input either yields frames, waits for more, or raises ProtocolError."""
    rng = random.Random(seed)
    pieces = [b"Content-Length: 3\n", b"\n", b": ", b"A", b"\r", b"\xe2\x82", b"Content-Type: x\n", b"9"]
    data = b"".join(rng.choice(pieces) for _ in range(200))
    parser = EslParser(max_header_bytes=300, max_body_bytes=50)
    try:
        for size in random_sizes(seed, 1, 40):
            if not data:
                break
            chunk, data = data[:size], data[size:]
            for frame in parser.feed(chunk):
                assert isinstance(frame.body, bytes)
    except ProtocolError:
        pass


def test_error_messages_say_what_was_wrong() -> None:
    with pytest.raises(ProtocolError, match="empty name"):
        EslParser().feed(b": value\n\n")
    with pytest.raises(ProtocolError, match=r"no ': '.*'Reply-Text'"):
        EslParser().feed(b"Content-Type: command/reply\nReply-Text\n\n")
    with pytest.raises(ProtocolError, match="bad Content-Length: '-1'"):
        EslParser().feed(b"Content-Length: -1\n\n")


def test_unterminated_header_block_over_limit() -> None:
    parser = EslParser(max_header_bytes=100)
    parser.feed(b"A: " + b"x" * 97)  # exactly 100 bytes, still waiting
    with pytest.raises(ProtocolError, match="header block exceeds 100"):
        parser.feed(b"x")


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_header_limit_is_exact_whatever_the_chunking(chunk: int) -> None:
    block = b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    assert feed_in_chunks(block, [chunk] * len(block), EslParser(max_header_bytes=len(block)))
    parser = EslParser(max_header_bytes=len(block) - 1)
    with pytest.raises(ProtocolError, match="header block exceeds"):
        feed_in_chunks(block, [chunk] * len(block), parser)


def test_body_limit_checked_before_the_body_arrives() -> None:
    head = b"Content-Type: api/response\nContent-Length: 11\n\n"
    assert parse_all(head + b"hello world", max_body_bytes=11)[0].body == b"hello world"
    with pytest.raises(ProtocolError, match="exceeds the limit of 10"):
        EslParser(max_body_bytes=10).feed(head)


def test_parser_is_unusable_after_an_error() -> None:
    parser = EslParser()
    with pytest.raises(ProtocolError):
        parser.feed(b"bad line\n\n")
    with pytest.raises(ProtocolError, match="earlier error"):
        parser.feed(b"")
    with pytest.raises(ProtocolError, match="earlier error"):
        parser.feed(b"Content-Type: command/reply\nReply-Text: +OK\n\n")


def test_error_keeps_frames_completed_in_the_same_feed() -> None:
    good = b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    with pytest.raises(ProtocolError) as info:
        EslParser().feed(good * 2 + b"bad\n\n")
    assert len(info.value.frames) == 2
    assert info.value.frames == parse_all(good * 2)


# --------------------------------------------------------------------------- serializers


def test_serializers_match_what_the_server_sent() -> None:
    bridged = server_writes("bridged_call_wire.txt")
    assert bridged == [
        command("connect"),
        command("myevents"),
        command("linger"),
        sendmsg_execute("bridge", "sofia/internal/4412345678@127.0.0.1:5090"),
    ]
    respond = server_writes("respond_403_wire.txt")
    assert respond[3] == sendmsg_execute("respond", "403 Forbidden")
    assert respond[:3] == bridged[:3]


def test_exact_command_bytes() -> None:
    assert command("connect") == b"connect\n\n"
    assert command("myevents") == b"myevents\n\n"
    assert command("linger 30") == b"linger 30\n\n"
    assert command("exit") == b"exit\n\n"
    assert sendmsg_execute("answer") == b"sendmsg\ncall-command: execute\nexecute-app-name: answer\n\n"
    assert sendmsg_hangup("CALL_REJECTED") == (
        b"sendmsg\ncall-command: hangup\nhangup-cause: CALL_REJECTED\n\n"
    )
    assert sendmsg_hangup("NORMAL_CLEARING") == (
        b"sendmsg\ncall-command: hangup\nhangup-cause: NORMAL_CLEARING\n\n"
    )
    assert sendmsg_hangup("21", uuid=UUID) == (
        b"sendmsg " + UUID.encode() + b"\ncall-command: hangup\nhangup-cause: 21\n\n"
    )


def test_sendmsg_execute_options() -> None:
    assert sendmsg_execute("respond", "402 Payment Required", uuid=UUID, event_lock=True) == (
        b"sendmsg " + UUID.encode() + b"\ncall-command: execute\nexecute-app-name: respond\n"
        b"execute-app-arg: 402 Payment Required\nevent-lock: true\n\n"
    )
    assert sendmsg_execute("answer", event_lock=True) == (
        b"sendmsg\ncall-command: execute\nexecute-app-name: answer\nevent-lock: true\n\n"
    )


def test_set_variable() -> None:
    assert set_variable("callgate_reason", "blocked prefix") == (
        b"sendmsg\ncall-command: execute\nexecute-app-name: set\n"
        b"execute-app-arg: callgate_reason=blocked prefix\n\n"
    )
    assert set_variable("auth_result", "", uuid=UUID) == (
        b"sendmsg " + UUID.encode() + b"\ncall-command: execute\nexecute-app-name: set\n"
        b"execute-app-arg: auth_result=\n\n"
    )
    assert set_variable("sip_h_X-Route", "a=b:c").endswith(b"execute-app-arg: sip_h_X-Route=a=b:c\n\n")


def test_argument_with_newline_goes_in_a_body() -> None:
    arg = "line one\nContent-Length: 0\n\nexit"
    assert sendmsg_execute("log", arg) == (
        b"sendmsg\ncall-command: execute\nexecute-app-name: log\n"
        b"Content-Type: text/plain\nContent-Length: 32\n\n" + arg.encode()
    )
    assert len(arg.encode()) == 32
    assert sendmsg_execute("log", arg, uuid=UUID, event_lock=True) == (
        b"sendmsg " + UUID.encode() + b"\ncall-command: execute\nexecute-app-name: log\n"
        b"event-lock: true\nContent-Type: text/plain\nContent-Length: 32\n\n" + arg.encode()
    )


@pytest.mark.parametrize(
    "arg",
    [
        "a\nb",
        "a\rb",
        " leading space",
        "\tleading tab",
        "é" * (MAX_HEADER_ARG_BYTES // 2 + 1),
        "x" * (MAX_HEADER_ARG_BYTES + 1),
    ],
)
def test_arguments_that_cannot_be_a_header_line(arg: str) -> None:
    data = sendmsg_execute("log", arg)
    assert b"execute-app-arg" not in data
    assert b"\nContent-Length: %d\n\n" % len(arg.encode()) in data
    assert data.endswith(arg.encode())


def test_argument_at_the_header_limit_stays_a_header() -> None:
    arg = "x" * MAX_HEADER_ARG_BYTES
    assert sendmsg_execute("log", arg).endswith(b"execute-app-arg: " + arg.encode() + b"\n\n")


def test_set_variable_with_newline_uses_body() -> None:
    data = set_variable("note", "two\nlines")
    assert data.endswith(b"Content-Type: text/plain\nContent-Length: 14\n\nnote=two\nlines")


@pytest.mark.parametrize("seed", range(10))
def test_no_argument_can_break_the_framing(seed: int) -> None:
    """Read back the way FreeSWITCH does: one command, the same argument, nothing left over."""
    rng = random.Random(seed)
    pieces = ["a", " ", ":", ": ", "\n", "\r", "\r\n", "\n\n", "%0A", "é", "€", "=", "\t"]
    pieces.append("Content-Length: 5")
    for _ in range(200):
        arg = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        if rng.random() < 0.05:
            arg += "y" * MAX_HEADER_ARG_BYTES
        uuid = UUID if rng.random() < 0.5 else None
        data = sendmsg_execute("log", arg, uuid=uuid, event_lock=rng.random() < 0.5)
        line, headers, body, rest = fs_read_command(data + command("exit"))
        assert line == (f"sendmsg {uuid}" if uuid else "sendmsg")
        assert headers["execute-app-name"] == "log"
        assert fs_app_arg(headers, body) == arg
        assert rest == b"exit\n\n"


@pytest.mark.parametrize("bad", ["", "a\nb", "a\rb", "nul\x00"])
def test_command_refuses_bad_lines(bad: str) -> None:
    with pytest.raises(ValueError):
        command(bad)


@pytest.mark.parametrize("app", ["", "a:b", "a\nb", "a b", "tab\t", "ctl\x01"])
def test_invalid_app_names(app: str) -> None:
    with pytest.raises(ValueError, match="app name"):
        sendmsg_execute(app, "x")


@pytest.mark.parametrize("uuid", ["", "a b", "a\nb", "x:y"])
def test_invalid_uuids(uuid: str) -> None:
    with pytest.raises(ValueError, match="uuid"):
        sendmsg_execute("answer", uuid=uuid)
    with pytest.raises(ValueError, match="uuid"):
        sendmsg_hangup("NORMAL_CLEARING", uuid=uuid)


@pytest.mark.parametrize("cause", ["", "NORMAL CLEARING", "X\nY", "A:B", "-1"])
def test_invalid_hangup_causes(cause: str) -> None:
    with pytest.raises(ValueError, match="hangup cause"):
        sendmsg_hangup(cause)


@pytest.mark.parametrize("name", ["", "a:b", "a=b", "a\nb", "a b"])
def test_invalid_variable_names(name: str) -> None:
    with pytest.raises(ValueError, match="variable name"):
        set_variable(name, "v")


def test_nul_in_argument_is_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        sendmsg_execute("log", "a\x00b")
    with pytest.raises(ValueError, match="NUL"):
        set_variable("a", "b\x00")


def test_event_header_reads_one_header_like_event_does() -> None:
    frames = [
        f for f in parse_all(fs_stream("bridged_call_wire.txt")) if f.content_type == "text/event-plain"
    ]
    assert frames
    for frame in frames:
        decoded = frame.event()
        for name in (
            "Event-Name",
            "Application",
            "Answer-State",
            "Hangup-Cause",
            "Unique-ID",
            "Absent-Header",
        ):
            assert frame.event_header(name) == decoded.get(name)


def test_event_header_never_reads_the_inner_body_or_a_value() -> None:
    body = (
        b"Event-Name: CUSTOM\nX-Note: a%0AApplication%3A%20bridge\nContent-Length: 19\n\nApplication: bridge"
    )
    frame = Frame({"Content-Type": "text/event-plain", "Content-Length": str(len(body))}, body)
    assert frame.event_header("Application") is None
    assert frame.event_header("X-Note") == "a\nApplication: bridge"


# --------------------------------------------------------------------------- fast paths vs the reference


class ReferenceParser:
    """Frozen copy of the straightforward EslParser the fast paths replaced (the oracle).

    Regex block search, one partition per line, the whole buffer re-sliced for each frame.
    """

    BLOCK_END = re.compile(rb"\n\r?\n")
    LEADING_BLANKS = re.compile(rb"(?:\r?\n)+")
    DIGITS = re.compile(r"[0-9]+")

    def __init__(self, max_header_bytes: int = 256 * 1024, max_body_bytes: int = 1024 * 1024) -> None:
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._buf = bytearray()
        self._scan = 0
        self._headers: MappingProxyType[str, str] | None = None
        self._body_start = 0
        self._body_len = 0
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @staticmethod
    def parse_lines(text: str) -> dict[str, str]:
        headers: dict[str, str] = {}
        for line in text.split("\n"):
            name, sep, value = line.partition(": ")
            if not sep or not name:
                if line in ("", "\r"):
                    continue
                problem = "an empty name" if line.startswith(": ") else "no ': '"
                raise ProtocolError(f"header line with {problem}: {line[:80]!r}")
            if value.endswith("\r"):
                value = value[:-1]
            if name not in headers:
                headers[name] = value
        return headers

    @classmethod
    def content_length(cls, value: str, limit: int) -> int:
        if not cls.DIGITS.fullmatch(value):
            raise ProtocolError(f"bad Content-Length: {value[:40]!r}")
        try:
            length = int(value)
        except ValueError:
            raise ProtocolError(f"bad Content-Length: {value[:40]!r}...") from None
        if length > limit:
            raise ProtocolError(f"Content-Length {length} exceeds the limit of {limit} bytes")
        return length

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise ProtocolError(f"parser unusable after an earlier error: {self._error}")
        self._buf += data
        frames: list[Frame] = []
        try:
            while (self._headers is not None or self._read_header_block()) and (
                frame := self._read_body()
            ) is not None:
                frames.append(frame)
        except ProtocolError as exc:
            exc.frames = frames
            self._error = exc
            raise
        return frames

    def _read_header_block(self) -> bool:
        buf = self._buf
        blanks = self.LEADING_BLANKS.match(buf)
        if blanks:
            del buf[: blanks.end()]
            self._scan = max(0, self._scan - blanks.end())
        end = self.BLOCK_END.search(buf, self._scan)
        if end is None:
            if len(buf) > self._max_header_bytes:
                raise ProtocolError(f"header block exceeds {self._max_header_bytes} bytes")
            self._scan = max(0, len(buf) - 2)
            return False
        if end.end() > self._max_header_bytes:
            raise ProtocolError(f"header block exceeds {self._max_header_bytes} bytes")
        headers = self.parse_lines(buf[: end.start()].decode("utf-8", errors="replace"))
        length = headers.get("Content-Length")
        self._body_len = 0 if length is None else self.content_length(length, self._max_body_bytes)
        self._headers = MappingProxyType(headers)
        self._body_start = end.end()
        self._scan = 0
        return True

    def _read_body(self) -> Frame | None:
        end = self._body_start + self._body_len
        if len(self._buf) < end:
            return None
        assert self._headers is not None
        frame = Frame(self._headers, bytes(self._buf[self._body_start : end]))
        del self._buf[:end]
        self._headers = None
        return frame


Outcome = tuple[str, list[tuple[list[tuple[str, str]], bytes, str]], int]


try:  # the compiled twin, when built, is compared even when the Python parser is forced
    from engine.esl import _speedups

    COMPILED: type[_speedups.EslParser] | None = _speedups.EslParser
except ImportError:
    COMPILED = None
# Every implementation the differential tests compare with the reference and with each other.
IMPLEMENTATIONS: list[type[PyEslParser] | type[_speedups.EslParser]] = [PyEslParser] + (
    [COMPILED] if COMPILED else []
)


def outcomes(
    parser: PyEslParser | _speedups.EslParser | ReferenceParser, chunks: Iterable[bytes]
) -> list[Outcome]:
    """Per feed: the frames (header items in order, body, content type) or the error, and `buffered`."""
    out: list[Outcome] = []
    for chunk in chunks:
        try:
            frames, error = parser.feed(chunk), ""
        except ProtocolError as exc:
            frames, error = exc.frames, f"ProtocolError: {exc}"
        assert all(isinstance(f.headers, MappingProxyType) and type(f.body) is bytes for f in frames)
        shown = [(list(f.headers.items()), f.body, f.content_type) for f in frames]
        out.append((error, shown, parser.buffered))
        if error:
            break
    return out


def assert_same_as_reference(data: bytes, cuts: Iterable[int], **limits: int) -> None:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    expected = outcomes(ReferenceParser(**limits), chunks)
    for implementation in IMPLEMENTATIONS:  # each against the reference, hence each other
        assert outcomes(implementation(**limits), chunks) == expected, implementation


def random_cuts(rng: random.Random, size: int, count: int) -> list[int]:
    return [rng.randrange(size + 1) for _ in range(count)]


EDGE_STREAMS = {
    "crlf frames": (
        b"Content-Type: api/response\r\nContent-Length: 3\r\n\r\nabc"
        b"Content-Type: command/reply\r\nReply-Text: +OK\r\n\r\n"
    ),
    "crlf value keeps all but one CR": b"Content-Type: command/reply\r\nReply-Text: a\r\r\n\r\n",
    "lf block, crlf terminator": b"Content-Type: command/reply\nReply-Text: +OK\n\r\nX: y\n\n",
    "crlf terminator right before lf one": b"A: b\n\r\n\nC: d\n\n",
    "cr inside values and names": b"A\r: b\rc\nD: \r\n\r\nE: f\r\r\n\n",
    "repeated header, crlf": b"Reply-Text: first\r\nReply-Text: second\r\n\r\n",
    "repeated content-length": b"Content-Length: 2\nContent-Length: 5\n\nok",
    "blank lines everywhere": b"\n\r\n\r\nA: b\n\n\n\r\n\nC: d\r\n\r\n\r\n\n",
    "lone cr before a frame": b"\rA: b\n\n",
    "stray carriage returns": b"\r\r\n\n",
    "colons in names": b"a:b: c\nx:: y\n::z: w\n\n",
    "empty value, last line": b"A: \nB: ",
    "empty name after good lines": b"A: b\nC: d\n: e\n\n",
    "blank block line at end": b"A: b\n\r",
    "utf-8 and junk": "Channel-Name: José€\n".encode() + b"X: \xff\xe2\x82\n\n",
    "unicode digit length": "Content-Length: ²\n\n".encode(),
    "zero and padded lengths": b"Content-Length: 0\n\nContent-Length: 007\n\n1234567",
    "body holding frames": b"Content-Length: 18\n\nA: b\n\n\n\nC: d\n\nE: f\n\n",
}


@pytest.mark.parametrize("name", EDGE_STREAMS)
def test_edge_streams_match_the_reference_at_every_split(name: str) -> None:
    data = EDGE_STREAMS[name]
    assert_same_as_reference(data, [])
    assert_same_as_reference(data, range(len(data)))  # byte by byte
    for cut in range(len(data) + 1):
        assert_same_as_reference(data, [cut])
        for second in range(cut, len(data) + 1, 3):
            assert_same_as_reference(data, [cut, second])


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_matches_the_reference(name: str) -> None:
    data = GARBAGE[name]
    assert_same_as_reference(data, [])
    assert_same_as_reference(data, range(len(data)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", CAPTURES)
def test_captures_match_the_reference_at_random_splits(name: str, seed: int) -> None:
    data = fs_stream(name)
    rng = random.Random(seed)
    assert_same_as_reference(data, random_cuts(rng, len(data), rng.choice([1, 5, 40, 400])))


def test_command_replies_match_the_reference_at_every_split() -> None:
    data = b"".join(command_replies().values())
    for cut in range(len(data) + 1):
        assert_same_as_reference(data, [cut])


@pytest.mark.parametrize("seed", range(300))
def test_random_streams_match_the_reference(seed: int) -> None:
    """Frame-shaped noise: good and bad lines, CR/LF runs, lengths, limits hit or not."""
    rng = random.Random(seed)
    pieces = [
        b"Content-Length: 3\n",
        b"Content-Length: 0\n",
        b"Content-Type: x\n",
        b"Reply-Text: +OK\r\n",
        b"\n",
        b"\r\n",
        b"\r",
        b"\n\r\n",
        b": ",
        b"A",
        b":",
        b" ",
        b"\xe2\x82",
        b"9",
        b"Name: v",
    ]
    data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 120)))
    limits = rng.choice([{}, {"max_header_bytes": 40, "max_body_bytes": 5}])
    assert_same_as_reference(data, [], **limits)
    assert_same_as_reference(data, random_cuts(rng, len(data), rng.randint(1, 30)), **limits)


def test_many_good_lines_then_a_malformed_one() -> None:
    good = b"".join(b"Header-%d: value %d\n" % (i, i) for i in range(300))
    for bad in (b"garbage\n\n", b": empty name\n\n", b"\r\n\n"):
        assert_same_as_reference(good + bad, [])
    with pytest.raises(ProtocolError, match=r"no ': ': 'garbage'"):
        EslParser().feed(good + b"garbage\n\n")
    with pytest.raises(ProtocolError, match=r"empty name: ': empty name'"):
        EslParser().feed(good + b": empty name\nAfter: ok\n\n")


def test_crlf_terminator_straddling_two_feeds() -> None:
    parser = EslParser()
    assert parser.feed(b"Content-Type: command/reply\nReply-Text: +OK\n\r") == []
    [frame] = parser.feed(b"\nContent-Type: x")
    assert frame.headers == {"Content-Type": "command/reply", "Reply-Text": "+OK"}
    assert parser.buffered == len(b"Content-Type: x")
    parser = EslParser()
    assert parser.feed(b"Reply-Text: +OK\r\n") == []
    assert [f.headers["Reply-Text"] for f in parser.feed(b"\r\n")] == ["+OK"]


def test_crlf_header_values_lose_one_cr_and_first_repeat_wins() -> None:
    [frame] = parse_all(b"Reply-Text: a\r\r\nReply-Text: b\r\nX-Empty: \r\n\r\n")
    assert dict(frame.headers) == {"Reply-Text": "a\r", "X-Empty": ""}
    assert parse_event_body(b"A: 1\r\nA: 2\r\nB: %41\r\n\r\n") == {"A": "1", "B": "A"}


def test_blank_lines_before_a_frame_in_separate_feeds() -> None:
    reply = b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    parser = EslParser()
    assert parser.feed(reply + b"\r") == parse_all(reply)
    assert parser.buffered == 1  # a lone CR might start a CRLF
    assert parser.feed(b"\n\r\n") == []
    assert parser.buffered == 0
    assert parser.feed(reply) == parse_all(reply)


def test_feed_accepts_any_bytes_like() -> None:
    data = b"Content-Type: api/response\nContent-Length: 2\n\nok"
    for chunk in (bytearray(data), memoryview(data)):
        [frame] = EslParser().feed(chunk)
        assert type(frame.body) is bytes
        assert frame == parse_all(data)[0]


def test_parsed_frames_equal_constructed_ones() -> None:
    [frame] = parse_all(b"Content-Type: api/response\nContent-Length: 2\n\nok")
    built = Frame({"Content-Type": "api/response", "Content-Length": "2"}, b"ok")
    assert frame == built
    assert frame.content_type == built.content_type == "api/response"
    assert repr(built) == "Frame(headers={'Content-Type': 'api/response', 'Content-Length': '2'}, body=b'ok')"
    assert dataclasses.replace(built, headers={}).content_type == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.content_type = "x"  # type: ignore[misc]


def test_event_bodies_match_the_reference() -> None:
    frames = parse_all(fs_stream("bridged_call_wire.txt") + fs_stream("respond_403_wire.txt"))
    bodies = [f.body for f in frames if f.body]
    bodies += [b.replace(b"\n", b"\r\n") for b in bodies[:3]]
    bodies += [b"A: b\n", b"\r\nA: b", b"A: b\nbad\n\n", b"A: b\nA: c\n\n", b"", b"\n\nA: b"]
    for body in bodies:
        try:
            expected: object = reference_event(body)
        except ProtocolError as exc:
            expected = str(exc)
        try:
            got: object = parse_event_body(body)
        except ProtocolError as exc:
            got = str(exc)
        assert got == expected


def reference_event(body: bytes) -> dict[str, str]:
    end = ReferenceParser.BLOCK_END.search(body)
    head, rest = (body[: end.start()], body[end.end() :]) if end else (body, b"")
    raw = ReferenceParser.parse_lines(head.decode("utf-8", errors="replace"))
    event = {name: decode_value(value) for name, value in raw.items()}
    if "Content-Length" in raw:
        length = ReferenceParser.content_length(raw["Content-Length"], len(body))
        if length > len(rest):
            raise ProtocolError(f"event body has {len(rest)} bytes, its Content-Length says {length}")
        event["_body"] = rest[:length].decode("utf-8", errors="replace")
    return event


# --------------------------------------------------------------------------- compiled vs Python

needs_compiled = pytest.mark.skipif(COMPILED is None, reason="engine.esl._speedups is not built")
FORCED_PYTHON = os.environ.get(protocol.NO_SPEEDUPS_ENV, "") not in ("", "0")


def same_outcomes(data: bytes, chunks_at: Iterable[int], **limits: int) -> None:
    """The compiled and the Python parser agree (frames, errors, `buffered` after each feed)."""
    assert COMPILED is not None
    points = sorted({c for c in chunks_at if 0 < c < len(data)})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert outcomes(COMPILED(**limits), chunks) == outcomes(PyEslParser(**limits), chunks)


@needs_compiled
@pytest.mark.slow
@pytest.mark.skipif(FORCED_PYTHON, reason="deterministic: the default run already compared the two")
@pytest.mark.parametrize("name", CAPTURES)
def test_compiled_matches_python_at_every_split_of_the_captures(name: str) -> None:
    """~150k splits (about 30 s): the captures are FreeSWITCH's real output."""
    data = fs_stream(name)
    for cut in range(len(data) + 1):
        same_outcomes(data, [cut])
    same_outcomes(data, range(len(data)))  # byte by byte


@needs_compiled
def test_compiled_matches_python_at_every_header_and_body_limit() -> None:
    data = fs_stream("bridged_call_wire.txt")
    for limit in [*range(0, 200, 7), *range(6000, 7000, 13)]:
        same_outcomes(data, [], max_header_bytes=limit)
        same_outcomes(data, random_cuts(random.Random(limit), len(data), 20), max_header_bytes=limit)
    for limit in range(0, 2500, 11):
        same_outcomes(data, [], max_body_bytes=limit)
        same_outcomes(data, [1500, 9000], max_body_bytes=limit)


@needs_compiled
@pytest.mark.parametrize("seed", range(300))
def test_compiled_matches_python_on_random_frame_streams(seed: int) -> None:
    """Frame-shaped streams built from real frames, damaged at random, cut at random."""
    rng = random.Random(10_000 + seed)
    frames = [f for f in re.split(rb"(?<=\n\n)", fs_stream("respond_403_wire.txt")) if f]
    parts = [rng.choice(frames) for _ in range(rng.randint(1, 12))]
    data = bytearray(b"".join(parts))
    for _ in range(rng.choice([0, 0, 1, 3])):  # flip, drop or insert a byte
        at = rng.randrange(len(data))
        choice = rng.choice([b"\n", b"\r", b":", b" ", b"\xff", b"9", b""])
        data[at : at + rng.choice([0, 1])] = choice
    tight = {"max_header_bytes": rng.randint(10, 3000), "max_body_bytes": rng.randint(0, 900)}
    limits = rng.choice([{}, tight])
    same_outcomes(bytes(data), [], **limits)
    same_outcomes(bytes(data), random_cuts(rng, len(data), rng.randint(1, 60)), **limits)


@needs_compiled
def test_compiled_keeps_frames_and_the_error_like_python() -> None:
    good = b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    for implementation in IMPLEMENTATIONS:
        parser = implementation()
        with pytest.raises(ProtocolError) as info:
            parser.feed(good + good[:10])
            parser.feed(good[10:] + b"bad\n\n")
        assert info.value.frames == parse_all(good)
        with pytest.raises(ProtocolError, match="unusable after an earlier error: header line"):
            parser.feed(good)


@needs_compiled
def test_compiled_parser_refuses_non_bytes_and_takes_any_buffer() -> None:
    assert COMPILED is not None
    with pytest.raises(TypeError):
        COMPILED().feed("Content-Type: x\n\n")  # type: ignore[arg-type]
    data = b"Content-Type: api/response\nContent-Length: 2\n\nok"
    for chunk in (bytearray(data), memoryview(data), data):
        [frame] = COMPILED().feed(chunk)
        assert type(frame.body) is bytes and frame == parse_all(data)[0]


def random_value(rng: random.Random) -> str:
    pieces = [
        "%",
        "%2",
        "%2B",
        "%2b",
        "%0A",
        "%E2%82%AC",
        "%E2%82",
        "%FF",
        "%zz",
        "%%41",
        "a",
        " ",
        "+",
        "_undef_",
        "€",
        "\u00e9",
        "%C3",
        "%c3%a9",
        "\ud800",
        "%00",
        "x%4",
        "%4x",
        "%",
    ]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))


@needs_compiled
@pytest.mark.parametrize("seed", range(20))
def test_compiled_decode_value_matches_python(seed: int) -> None:
    rng = random.Random(seed)
    values = ["", "_undef_", "_undef_x", "%", "%4", "%41", "a" * 300 + "%41" * 100]
    values += [random_value(rng) for _ in range(500)]
    for value in values:
        assert _speedups.decode_value(value) == protocol._py_decode_value(value), value


def test_active_implementation_is_reported() -> None:
    status = protocol.speedups_status()
    if FORCED_PYTHON:
        assert status["implementation"] == "python" and "forced" in status["reason"]
        assert EslParser is PyEslParser and protocol.decode_value is protocol._py_decode_value
    elif COMPILED is not None:
        assert status["implementation"] == "compiled"
        assert EslParser is COMPILED and protocol.decode_value is _speedups.decode_value
    else:
        assert status["implementation"] == "python" and "not built" in status["reason"]


@needs_compiled
def test_compiled_feed_cannot_be_re_entered_while_it_makes_a_frame() -> None:
    """Python code the parser calls (here the frame factory) must not move its buffer."""
    assert COMPILED is not None
    parser = COMPILED()
    parser.feed(b"Content-Type: api/response\nContent-Length: 4\n\nab")  # 'cd' still due: buffered
    seen: list[str] = []
    original = protocol._frame

    def factory(headers: object, body: bytes, content_type: str) -> Frame:
        try:
            parser.feed(b"more")
        except RuntimeError as exc:
            seen.append(str(exc))
        return original(headers, body, content_type)  # type: ignore[arg-type]

    _speedups.setup(
        factory, ProtocolError, protocol._bad_line, protocol._content_length, protocol._py_decode_value
    )
    try:
        [frame] = parser.feed(b"cd")
    finally:
        _speedups.setup(
            original, ProtocolError, protocol._bad_line, protocol._content_length, protocol._py_decode_value
        )
    assert frame.body == b"abcd" and seen == ["EslParser.feed() re-entered"]
    assert parser.buffered == 0 and parser.feed(b"Content-Type: x\n\n")[0].content_type == "x"
