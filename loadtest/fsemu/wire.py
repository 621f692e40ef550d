"""FreeSWITCH-side framing of the event socket.

Everything FreeSWITCH 1.10 writes on an event socket (command replies, the
CHANNEL_DATA block answering ``connect``, ``text/event-plain`` frames, api
responses, disconnect notices, the inbound ``auth/request``) is built here, and
the commands a client sends are parsed here.

The parser is written independently of the engine's own ESL parser on purpose,
so that the two check each other.  It follows what ``read_packet()`` in
``mod_event_socket.c`` does: bytes are read until two newlines in a row (a
``\\r`` does not break the run), leading blank lines are skipped, the first line
is the command, the other lines are ``Name: value`` headers (split at the first
``:``, spaces after it skipped), and a ``Content-Length`` header makes it read
that many body bytes right after the blank line.

Header values of serialised events are percent-encoded like
``switch_url_encode()``: every byte outside ``' '..'~'`` and every byte of
``SWITCH_URL_UNSAFE`` becomes ``%XX`` (upper-case hex); an empty value is
written ``_undef_``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote, unquote

__all__ = [
    "GOODBYE",
    "URL_UNSAFE",
    "Command",
    "CommandParser",
    "api_response",
    "auth_request",
    "command_reply",
    "disconnect_notice",
    "event_json_frame",
    "event_plain_frame",
    "fs_urldecode",
    "fs_urlencode",
    "linger_notice",
    "parse_frames",
    "rude_rejection",
    "serialize_event",
]

#: ``SWITCH_URL_UNSAFE`` from ``switch_utils.h``.
URL_UNSAFE = '\r\n #%&+:;<=>?@[\\]^`{|}"'
_UNSAFE_BYTES = frozenset(URL_UNSAFE.encode("ascii"))
_HEX = "0123456789ABCDEF"

#: Text FreeSWITCH sends after the ``Content-Disposition: disconnect`` notice when
#: it closes an outbound socket (``listener_run()``).
GOODBYE = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"


def _byte_needs_escape(b: int) -> bool:
    return b < 0x20 or b > 0x7E or b in _UNSAFE_BYTES


_ENCODE_TABLE = [("%" + _HEX[b >> 4] + _HEX[b & 15]) if _byte_needs_escape(b) else chr(b) for b in range(256)]
#: Printable ASCII that FreeSWITCH leaves alone besides letters, digits and "_.-~".
_SAFE_EXTRA = "".join(
    chr(b)
    for b in range(0x20, 0x7F)
    if not _byte_needs_escape(b) and not chr(b).isalnum() and chr(b) not in "_.-~"
)
_NEEDS_ESCAPE = re.compile("[^" + re.escape(_SAFE_EXTRA) + "A-Za-z0-9_.~-]")


@lru_cache(maxsize=1 << 16)  # header values repeat from event to event
def fs_urlencode(value: str) -> str:
    """Percent-encode ``value`` the way ``switch_url_encode()`` does (UTF-8 bytes,
    upper-case hex)."""
    if _NEEDS_ESCAPE.search(value) is None:
        return value
    return quote(value, safe=_SAFE_EXTRA)


@lru_cache(maxsize=1 << 16)
def fs_urldecode(value: str) -> str:
    """Inverse of :func:`fs_urlencode` (``%XX`` sequences only; ``+`` stays ``+``)."""
    if "%" not in value:
        return value
    return unquote(value, errors="replace")


# ---------------------------------------------------------------------------
# FreeSWITCH -> client frames
# ---------------------------------------------------------------------------


def serialize_event(headers: Iterable[tuple[str, str]], body: str | bytes | None = None) -> bytes:
    """``switch_event_serialize(event, &str, SWITCH_TRUE)``: encoded header lines, then a
    blank line, or ``Content-Length`` and the body when the event has one."""
    parts = []
    for name, value in headers:
        parts.append(f"{name}: {fs_urlencode(value) if value != '' else '_undef_'}\n")
    out = "".join(parts).encode("utf-8")
    if body:
        raw = body.encode("utf-8") if isinstance(body, str) else body
        return out + b"Content-Length: %d\n\n" % len(raw) + raw
    return out + b"\n"


def event_plain_frame(headers: Iterable[tuple[str, str]], body: str | bytes | None = None) -> bytes:
    """An event as the socket carries it with ``myevents``/``event plain``."""
    payload = serialize_event(headers, body)
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(payload) + payload


def event_json_frame(headers: Iterable[tuple[str, str]], body: str | None = None) -> bytes:
    """``event json``: one JSON object of (unencoded) header values."""
    obj: dict[str, str] = {}
    for name, value in headers:
        obj.setdefault(name, value)
    if body:
        obj["_body"] = body
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"Content-Length: %d\nContent-Type: text/event-json\n\n" % len(payload) + payload


def command_reply(reply_text: str) -> bytes:
    """``Content-Type: command/reply`` with ``Reply-Text`` (not encoded, like FS)."""
    return f"Content-Type: command/reply\nReply-Text: {reply_text}\n\n".encode()


def api_response(body: str) -> bytes:
    raw = body.encode("utf-8")
    return b"Content-Type: api/response\nContent-Length: %d\n\n" % len(raw) + raw


def auth_request() -> bytes:
    return b"Content-Type: auth/request\n\n"


def rude_rejection(message: str = "Access Denied, go away.\n") -> bytes:
    raw = message.encode()
    return b"Content-Type: text/rude-rejection\nContent-Length: %d\n\n" % len(raw) + raw


def disconnect_notice(session_uuid: str | None, message: str = GOODBYE) -> bytes:
    """``send_disconnect()``: the notice FreeSWITCH writes right before it closes."""
    raw = message.encode()
    if session_uuid:
        head = (
            "Content-Type: text/disconnect-notice\n"
            f"Controlled-Session-UUID: {session_uuid}\n"
            "Content-Disposition: disconnect\n"
            f"Content-Length: {len(raw)}\n\n"
        )
    else:
        head = f"Content-Type: text/disconnect-notice\nContent-Length: {len(raw)}\n\n"
    return head.encode() + raw


def linger_notice(session_uuid: str, channel_name: str, linger_time: int) -> bytes:
    """The notice sent when a lingering socket's channel hangs up (values not encoded)."""
    return (
        "Content-Type: text/disconnect-notice\n"
        f"Controlled-Session-UUID: {session_uuid}\n"
        "Content-Disposition: linger\n"
        f"Channel-Name: {channel_name}\n"
        f"Linger-Time: {linger_time}\n"
        "Content-Length: 0\n\n"
    ).encode()


# ---------------------------------------------------------------------------
# client -> FreeSWITCH commands
# ---------------------------------------------------------------------------


@dataclass
class Command:
    """One command as FreeSWITCH's ``read_packet()`` cuts it."""

    line: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    raw: bytes = b""

    @property
    def name(self) -> str:
        """The command word, lower-cased (``sendmsg``, ``linger``...)."""
        return self.line.split(" ", 1)[0].strip().lower()

    @property
    def arg(self) -> str:
        """What follows the command word on the first line (stripped)."""
        parts = self.line.split(" ", 1)
        return parts[1].strip() if len(parts) > 1 else ""

    def header(self, name: str, default: str | None = None) -> str | None:
        """First header of that name (case-insensitive), like ``switch_event_get_header``."""
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return default

    def body_text(self) -> str:
        return (self.body or b"").decode("utf-8", errors="replace")


class CommandParser:
    """Incremental parser for what a client writes to FreeSWITCH.

    ``feed(data)`` returns every command completed by ``data``; incomplete input is
    kept for the next call.  A command whose ``Content-Length`` body has not fully
    arrived yet is also kept.
    """

    def __init__(self, max_len: int = 10 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._max_len = max_len

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)

    def has_partial(self) -> bool:
        return bool(self._buf)

    def feed(self, data: bytes) -> list[Command]:
        self._buf += data
        out: list[Command] = []
        while True:
            cmd = self._next()
            if cmd is None:
                return out
            out.append(cmd)

    def _next(self) -> Command | None:
        buf = self._buf
        # "bah": FreeSWITCH drops CR/LF bytes that arrive before a command starts.
        start = 0
        while start < len(buf) and buf[start] in (0x0D, 0x0A):
            start += 1
        if start:
            del buf[:start]
        if not buf:
            return None
        # Find the end of the header block: two LF with only CRs in between.
        end = None
        newlines = 0
        for i in range(len(buf)):
            c = buf[i]
            if c == 0x0A:
                newlines += 1
                if newlines == 2:
                    end = i + 1
                    break
            elif c != 0x0D:
                newlines = 0
        if end is None:
            if len(buf) >= self._max_len:
                end = len(buf)
            else:
                return None
        block = bytes(buf[:end])
        text = block.decode("utf-8", errors="replace")
        lines = [ln.rstrip("\r") for ln in text.split("\n")]
        first = lines[0]
        headers: list[tuple[str, str]] = []
        clen = 0
        for ln in lines[1:]:
            if not ln:
                continue
            if ":" not in ln:
                continue
            k, v = ln.split(":", 1)
            v = v.lstrip(" ")
            headers.append((k, v))
            if k.lower() == "content-length":
                try:
                    clen = int(v.strip() or "0")
                except ValueError:
                    clen = 0
        body = None
        consumed = end
        if clen > 0:
            if len(buf) < end + clen:
                return None
            body = bytes(buf[end : end + clen])
            consumed = end + clen
        raw = bytes(buf[:consumed])
        del buf[:consumed]
        return Command(line=first.rstrip("\r"), headers=headers, body=body, raw=raw)


# ---------------------------------------------------------------------------
# helpers for clients of the emulator (tests, the CLI): read FS-side frames
# ---------------------------------------------------------------------------


@dataclass
class Frame:
    """One frame as FreeSWITCH sends it: outer headers and optional body."""

    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return default

    @property
    def content_type(self) -> str:
        return self.header("Content-Type", "") or ""

    def event_headers(self) -> list[tuple[str, str]]:
        """Decoded headers of a ``text/event-plain`` body, or of a header-only block
        (the ``connect`` reply), split at ``": "`` before decoding."""
        src = self.body.decode("utf-8") if self.body else None
        if src is None:
            return [(k, fs_urldecode(v)) for k, v in self.headers]
        out = []
        for ln in src.split("\n"):
            if not ln:
                break
            k, _, v = ln.partition(": ")
            out.append((k, fs_urldecode(v)))
        return out


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Split FreeSWITCH output into frames; returns (frames, unconsumed rest)."""
    frames: list[Frame] = []
    pos = 0
    while True:
        idx = data.find(b"\n\n", pos)
        if idx < 0:
            return frames, data[pos:]
        block = data[pos:idx].decode("utf-8", errors="replace")
        headers: list[tuple[str, str]] = []
        for ln in block.split("\n"):
            k, _, v = ln.partition(": ")
            headers.append((k, v))
        clen = 0
        for k, v in headers:
            if k.lower() == "content-length":
                clen = int(v)
        end = idx + 2
        if len(data) < end + clen:
            return frames, data[pos:]
        frames.append(Frame(headers=headers, body=data[end : end + clen]))
        pos = end + clen


def header_names(headers: Sequence[tuple[str, str]]) -> list[str]:
    return [k for k, _ in headers]
