"""Sans-I/O codec for FreeSWITCH's event socket (ESL).

``EslParser.feed(bytes) -> list[Frame]`` turns the byte stream FreeSWITCH sends into frames;
the module-level serializers turn commands into bytes. Nothing here touches a socket, a
clock or a thread, so the gevent server and the FreeSWITCH emulator can both drive it.

Wire shape (FreeSWITCH -> client): a header block of ``Name: value`` lines closed by an
empty line, then, when the block has a ``Content-Length``, exactly that many body bytes.
Outer header values are sent as they are, except in the reply to ``connect``, which is a
whole serialized CHANNEL_DATA event and therefore percent-encoded. Event bodies
(``text/event-plain``) are serialized events too: percent-encoded values, ``_undef_`` for
empty values, and an optional inner ``Content-Length`` + blank line + event body.

Choices not dictated by FreeSWITCH: ``\\r\\n`` line endings are accepted (FreeSWITCH sends
bare ``\\n``, but its own command reader accepts both); empty lines between frames are
skipped (FreeSWITCH's reader does the same); the first of two same-named headers wins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import unquote

__all__ = [
    "MAX_HEADER_ARG_BYTES",
    "EslParser",
    "Frame",
    "ProtocolError",
    "command",
    "decode_value",
    "encode_value",
    "parse_event_body",
    "sendmsg_execute",
    "sendmsg_hangup",
    "set_variable",
]

UNDEF = "_undef_"

# An app argument longer than this goes in a body: old FreeSWITCH releases read a command's
# header block into a fixed 2048-byte buffer (current ones grow it), and a body always works.
MAX_HEADER_ARG_BYTES = 1024

_BLOCK_END = re.compile(rb"\n\r?\n")
_LEADING_BLANKS = re.compile(rb"(?:\r?\n)+")
_DIGITS = re.compile(r"[0-9]+")
# FreeSWITCH leaves printable ASCII alone except for SWITCH_URL_UNSAFE; an existing
# upper-case %XX escape is not encoded again (switch_url_encode does not double-encode).
_TO_ENCODE = re.compile(rb"%[0-9A-F]{2}|[^!$'()*,\-./0-9A-Z_a-z~]")
_ESCAPES = {bytes([b]): b"%%%02X" % b for b in range(256)}
_NAME_FORBIDDEN = re.compile(r"[\s:\x00-\x1f\x7f]")
_CAUSE = re.compile(r"[A-Za-z0-9_]+")


class ProtocolError(Exception):
    """The peer sent bytes that are not valid ESL.

    ``frames`` holds the frames completed in the same ``feed()`` call before the error,
    so that no frame is lost whatever the chunking.
    """

    def __init__(self, message: str, frames: list[Frame] | None = None) -> None:
        super().__init__(message)
        self.frames: list[Frame] = frames if frames is not None else []


# --------------------------------------------------------------------------- values


def decode_value(raw: str) -> str:
    """Undo FreeSWITCH's percent-encoding of one header value (``_undef_`` means empty).

    ``+`` stays ``+``: FreeSWITCH encodes a plus sign as ``%2B``, never a space as ``+``.
    """
    if raw == UNDEF:
        return ""
    if "%" not in raw:
        return raw
    return unquote(raw, encoding="utf-8", errors="replace")


def _escape(match: re.Match[bytes]) -> bytes:
    text = match.group()
    return text if len(text) == 3 else _ESCAPES[text]


def encode_value(value: str) -> str:
    """Percent-encode a header value the way FreeSWITCH serializes events."""
    if value == "":
        return UNDEF
    return _TO_ENCODE.sub(_escape, value.encode("utf-8")).decode("ascii")


def _bad_line(line: str) -> ProtocolError:
    problem = "an empty name" if line.startswith(": ") else "no ': '"
    return ProtocolError(f"header line with {problem}: {line[:80]!r}")


def _parse_lines(text: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in text.split("\n"):
        name, sep, value = line.partition(": ")
        if not sep or not name:
            if line in ("", "\r"):
                continue
            raise _bad_line(line)
        if value.endswith("\r"):
            value = value[:-1]
        if name not in headers:
            headers[name] = value
    return headers


def _content_length(value: str, limit: int) -> int:
    if not _DIGITS.fullmatch(value):
        raise ProtocolError(f"bad Content-Length: {value[:40]!r}")
    try:
        length = int(value)
    except ValueError:  # more digits than int() accepts
        raise ProtocolError(f"bad Content-Length: {value[:40]!r}...") from None
    if length > limit:
        raise ProtocolError(f"Content-Length {length} exceeds the limit of {limit} bytes")
    return length


def parse_event_body(body: bytes) -> dict[str, str]:
    """Parse a ``text/event-plain`` body into decoded headers.

    Lines are split first and each value is decoded afterwards, so an encoded ``%0A``
    stays inside its value. The event's own body, if any, is returned under ``_body``.
    """
    end = _BLOCK_END.search(body)
    head, rest = (body[: end.start()], body[end.end() :]) if end else (body, b"")
    raw = _parse_lines(head.decode("utf-8", errors="replace"))
    event = {name: decode_value(value) for name, value in raw.items()}
    if "Content-Length" in raw:
        length = _content_length(raw["Content-Length"], len(body))
        if length > len(rest):
            raise ProtocolError(f"event body has {len(rest)} bytes, its Content-Length says {length}")
        event["_body"] = rest[:length].decode("utf-8", errors="replace")
    return event


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Frame:
    """One message from FreeSWITCH: outer headers as received and the raw body."""

    headers: Mapping[str, str]
    body: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def reply_text(self) -> str:
        """``Reply-Text``, decoded when the frame is the (encoded) reply to ``connect``."""
        text = self.headers.get("Reply-Text", "")
        return decode_value(text) if "Event-Name" in self.headers else text

    @property
    def event_name(self) -> str:
        """``Event-Name`` of an event frame, read without parsing the whole body.

        FreeSWITCH serializes ``Event-Name`` first, so filtering on it is cheap; "" for
        frames that are not events.
        """
        if self.content_type != "text/event-plain":
            return ""
        if self.body.startswith(b"Event-Name: "):
            end = self.body.find(b"\n")
            line = self.body[12 : end if end >= 0 else len(self.body)].decode("utf-8", errors="replace")
            return decode_value(line.removesuffix("\r"))
        return self.event().get("Event-Name", "")

    def event_header(self, name: str) -> str | None:
        """One decoded header of an event frame, found without parsing the whole body.

        The first occurrence counts (as in :meth:`event`); None when absent. A header line
        cannot be faked by a value: values are percent-encoded, so they hold no newline.
        """
        if self.content_type != "text/event-plain":
            return None
        body = self.body
        needle = name.encode() + b": "
        if body.startswith(needle):
            start = len(needle)
        else:
            found = body.find(b"\n" + needle)
            if found < 0:
                return None
            start = found + 1 + len(needle)
        headers_end = body.find(b"\n\n")
        if 0 <= headers_end < start:
            return None  # past the headers: inside the event's own body
        end = body.find(b"\n", start)
        raw = body[start : end if end >= 0 else len(body)].decode("utf-8", errors="replace")
        return decode_value(raw.removesuffix("\r"))

    def reply_ok(self) -> bool:
        return self.content_type == "command/reply" and self.reply_text.startswith("+OK")

    def event(self) -> dict[str, str]:
        """The decoded event carried by a ``text/event-plain`` frame (parsed on each call)."""
        if self.content_type != "text/event-plain":
            raise ValueError(f"not an event frame: Content-Type {self.content_type!r}")
        return parse_event_body(self.body)

    def channel_data(self) -> dict[str, str]:
        """The outer headers with each value decoded: the channel data of a connect reply."""
        return {name: decode_value(value) for name, value in self.headers.items()}


class EslParser:
    """Incremental frame parser for the FreeSWITCH -> client direction.

    Bytes are kept in one bytearray; the search for the end of a header block resumes
    where the previous ``feed()`` stopped, so buffering is linear in the input size.
    Text is decoded only once a frame is complete, so a UTF-8 character split across
    two reads decodes correctly.
    """

    def __init__(self, max_header_bytes: int = 256 * 1024, max_body_bytes: int = 1024 * 1024) -> None:
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._buf = bytearray()
        self._scan = 0  # where to resume looking for the end of the header block
        self._headers: Mapping[str, str] | None = None  # parsed block waiting for its body
        self._body_start = 0
        self._body_len = 0
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame (0 at a frame boundary)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise ProtocolError(f"parser unusable after an earlier error: {self._error}")
        self._buf += data
        frames: list[Frame] = []
        try:
            while (frame := self._next_frame()) is not None:
                frames.append(frame)
        except ProtocolError as exc:
            exc.frames = frames
            self._error = exc
            raise
        return frames

    def _next_frame(self) -> Frame | None:
        if self._headers is None and not self._read_header_block():
            return None
        return self._read_body()

    def _read_header_block(self) -> bool:
        buf = self._buf
        blanks = _LEADING_BLANKS.match(buf)
        if blanks:
            del buf[: blanks.end()]
            self._scan = max(0, self._scan - blanks.end())
        end = _BLOCK_END.search(buf, self._scan)
        if end is None:
            if len(buf) > self._max_header_bytes:
                raise ProtocolError(f"header block exceeds {self._max_header_bytes} bytes")
            self._scan = max(0, len(buf) - 2)  # the terminator may straddle two reads
            return False
        if end.end() > self._max_header_bytes:
            raise ProtocolError(f"header block exceeds {self._max_header_bytes} bytes")
        headers = _parse_lines(buf[: end.start()].decode("utf-8", errors="replace"))
        length = headers.get("Content-Length")
        self._body_len = 0 if length is None else _content_length(length, self._max_body_bytes)
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


# --------------------------------------------------------------------------- commands


def _check_token(kind: str, value: str) -> None:
    if not value or _NAME_FORBIDDEN.search(value):
        raise ValueError(f"invalid {kind}: {value!r} (empty, or has ':', whitespace or a control char)")


def command(line: str) -> bytes:
    """A one-line command such as ``connect``, ``myevents``, ``linger 30`` or ``exit``."""
    if not line or any(c in line for c in "\r\n\x00"):
        raise ValueError(f"invalid command line: {line!r}")
    return f"{line}\n\n".encode()


def _sendmsg(uuid: str | None, fields: list[tuple[str, str]], body: bytes = b"") -> bytes:
    if uuid is not None:
        _check_token("uuid", uuid)
    first = f"sendmsg {uuid}" if uuid is not None else "sendmsg"
    lines = [first, *(f"{name}: {value}" for name, value in fields)]
    return ("\n".join(lines) + "\n\n").encode() + body


def _fits_in_header(arg: str, encoded: bytes) -> bool:
    # FreeSWITCH splits lines at \r or \n and strips the spaces after "name:".
    return (
        len(encoded) <= MAX_HEADER_ARG_BYTES
        and "\n" not in arg
        and "\r" not in arg
        and not arg.startswith((" ", "\t"))
    )


def sendmsg_execute(app: str, arg: str = "", *, uuid: str | None = None, event_lock: bool = False) -> bytes:
    """``sendmsg`` running dialplan app ``app`` with ``arg`` on the channel.

    An argument that cannot travel as an ``execute-app-arg`` header line (newline, CR,
    leading blank, longer than ``MAX_HEADER_ARG_BYTES``) is sent as a ``text/plain``
    body, which FreeSWITCH uses as the argument when the header is absent.
    """
    _check_token("app name", app)
    if "\x00" in arg:
        raise ValueError("app argument contains NUL")
    fields = [("call-command", "execute"), ("execute-app-name", app)]
    encoded = arg.encode()
    in_header = _fits_in_header(arg, encoded)
    if arg and in_header:
        fields.append(("execute-app-arg", arg))
    if event_lock:
        fields.append(("event-lock", "true"))
    if arg and not in_header:
        fields += [("Content-Type", "text/plain"), ("Content-Length", str(len(encoded)))]
        return _sendmsg(uuid, fields, encoded)
    return _sendmsg(uuid, fields)


def sendmsg_hangup(cause: str, *, uuid: str | None = None) -> bytes:
    """``sendmsg`` hanging the channel up with a cause name (or Q.850 number)."""
    if not _CAUSE.fullmatch(cause):
        raise ValueError(f"invalid hangup cause: {cause!r}")
    return _sendmsg(uuid, [("call-command", "hangup"), ("hangup-cause", cause)])


def set_variable(name: str, value: str, *, uuid: str | None = None, event_lock: bool = False) -> bytes:
    """``sendmsg`` executing ``set name=value`` on the channel."""
    _check_token("variable name", name)
    if "=" in name:
        raise ValueError(f"invalid variable name: {name!r} (contains '=')")
    return sendmsg_execute("set", f"{name}={value}", uuid=uuid, event_lock=event_lock)
