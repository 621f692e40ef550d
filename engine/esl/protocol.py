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

import functools
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import unquote

__all__ = [
    "IMPLEMENTATION",
    "MAX_HEADER_ARG_BYTES",
    "NO_SPEEDUPS_ENV",
    "EslParser",
    "Frame",
    "HeaderPicker",
    "ProtocolError",
    "PyEslParser",
    "PyHeaderPicker",
    "check_variable_name",
    "command",
    "decode_value",
    "encode_value",
    "parse_event_body",
    "sendmsg_execute",
    "sendmsg_hangup",
    "set_variable",
    "speedups_status",
]

UNDEF = "_undef_"

# An app argument longer than this goes in a body: old FreeSWITCH releases read a command's
# header block into a fixed 2048-byte buffer (current ones grow it), and a body always works.
MAX_HEADER_ARG_BYTES = 1024

_BLOCK_END = re.compile(rb"\n\r?\n")
_LEADING_BLANKS = re.compile(rb"(?:\r?\n)+")
_CR_LF = (13, 10)  # the bytes a run of blank lines can start with
# FreeSWITCH leaves printable ASCII alone except for SWITCH_URL_UNSAFE; an existing
# upper-case %XX escape is not encoded again (switch_url_encode does not double-encode).
_TO_ENCODE = re.compile(rb"%[0-9A-F]{2}|[^!$'()*,\-./0-9A-Z_a-z~]")
_ESCAPES = {bytes([b]): b"%%%02X" % b for b in range(256)}
_NAME_FORBIDDEN = re.compile(r"[\s:\x00-\x1f\x7f]")
_CAUSE = re.compile(r"[A-Za-z0-9_]+")
_PICKABLE_NAME = re.compile(r"[!-9;-~]{1,255}")  # printable ASCII but ':' and space


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
    """``Name: value`` lines -> dict; the first of two same-named headers wins.

    Fast path for the usual block (no blank or malformed line); anything else is left to
    :func:`_parse_lines_slowly`, which defines the rules and the error messages.
    """
    clean = text
    if "\r" in text:  # each line loses one trailing CR, as _parse_lines_slowly does
        clean = text.replace("\r\n", "\n").removesuffix("\r")
    headers: dict[str, str] = {}
    for line in clean.split("\n"):
        name, sep, value = line.partition(": ")
        if not name or not sep:
            return _parse_lines_slowly(text)
        if name not in headers:
            headers[name] = value
    return headers


def _parse_lines_slowly(text: str) -> dict[str, str]:
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
    if not (value.isdigit() and value.isascii()):  # only 0-9: no sign, space or other digits
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


class PyHeaderPicker:
    """A few named headers of serialized events, found without splitting the whole block.

    ``HeaderPicker(names).pick(body)`` -> ``{name: decoded value}`` for each of ``names``
    present in the header block of ``body`` (a ``text/event-plain`` body), in the order of
    ``names``. A CHANNEL_HANGUP_COMPLETE carries ~280 headers of which a consumer reads a
    few dozen: splitting them all costs ~140 us in Python; this costs a search per name
    (compiled: one pass over the block, objects made only for the names picked).

    The rules, the same as :meth:`Frame.event` for a well-formed body: the header block
    ends at the first blank line (``\n\n`` or ``\n\r\n``); a header is a line
    ``Name: value`` whose name ends at its first ``": "``; a line loses one trailing CR; the
    first of two same-named headers wins; values are decoded by :func:`decode_value`. Lines
    that are not headers are skipped instead of raising: a consumer picking fields (billing)
    wants what is there. A name is 1-255 printable ASCII characters without ':' or space.
    """

    __slots__ = ("_keys", "_prefixes", "names")

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(dict.fromkeys(_check_header_name(name) for name in names))
        self._keys = tuple((name, name.encode()) for name in self.names)
        self._prefixes = tuple(f"{name}: ".encode() for name in self.names)

    def pick(self, body: bytes | bytearray | memoryview) -> dict[str, str]:
        body = bytes(body)
        if len(self._keys) <= _FIND_AT_MOST:
            return self._find_each(body)
        return self._split(body)

    def _find_each(self, body: bytes) -> dict[str, str]:
        """A few names: a ``bytes.find`` each (C), no Python loop over the lines."""
        found: dict[str, str] = {}
        for (name, _key), prefix in zip(self._keys, self._prefixes, strict=True):
            at = body.find(prefix)
            while at > 0 and body[at - 1] != 10:  # inside a line, not at its start
                at = body.find(prefix, at + 1)
            if at < 0 or (at > 0 and _block_ended(body, at)):
                continue
            start = at + len(prefix)
            stop = body.find(b"\n", start)
            found[name] = _decoded(body[start : len(body) if stop < 0 else stop])
        return found

    def _split(self, body: bytes) -> dict[str, str]:
        """Many names: cut the header block once, then a ``bytes.find`` per name in it."""
        end = _BLOCK_END.search(body)
        head = body if end is None else body[: end.start()]
        found: dict[str, str] = {}
        for (name, _key), prefix in zip(self._keys, self._prefixes, strict=True):
            # Measured: finding "Name: " and checking the byte before it costs half as much as
            # finding "\nName: " (a needle led by a newline matches at every line).
            at = head.find(prefix)
            while at > 0 and head[at - 1] != 10:  # inside a line, not at its start
                at = head.find(prefix, at + 1)
            if at < 0:
                continue
            start = at + len(prefix)
            stop = head.find(b"\n", start)
            found[name] = _decoded(head[start : len(head) if stop < 0 else stop])
        return found


# Up to this many names a search per name in the whole body costs less than cutting the
# header block first (a regex pass over the body: callgrind).
_FIND_AT_MOST = 3


def _block_ended(body: bytes, at: int) -> bool:
    """Whether the header block ends before ``at`` (a blank line, ``\n\n`` or ``\n\r\n``)."""
    return body.find(b"\n\n", 0, at) >= 0 or body.find(b"\n\r\n", 0, at) >= 0


def _decoded(raw: bytes) -> str:
    return decode_value(raw.removesuffix(b"\r").decode("utf-8", errors="replace"))


def _check_header_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"header names are str, not {type(name).__name__}")
    if not _PICKABLE_NAME.fullmatch(name):
        raise ValueError(f"invalid header name: {name!r}")
    return name


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Frame:
    """One message from FreeSWITCH: outer headers as received and the raw body."""

    headers: Mapping[str, str]
    body: bytes = b""
    # Read several times per frame by its consumers, so computed once.
    content_type: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "content_type", self.headers.get("Content-Type", ""))

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

        The first occurrence in the header block counts (as in :meth:`event`); None when
        absent. A header line cannot be faked by a value: values are percent-encoded, so
        they hold no newline. ``name`` is a header name :class:`HeaderPicker` accepts.
        """
        if self.content_type != "text/event-plain":
            return None
        return _one_header(name).pick(self.body).get(name)

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


@functools.lru_cache(maxsize=64)  # the few names the session reads, each picker built once
def _one_header(name: str) -> PyHeaderPicker:
    picker: PyHeaderPicker = HeaderPicker((name,))
    return picker


# The parser makes many frames: it fills the slots directly, skipping the frozen dataclass's
# __init__ (object.__setattr__ per field) and __post_init__.
_new_frame = object.__new__
_set_headers = Frame.__dict__["headers"].__set__
_set_body = Frame.__dict__["body"].__set__
_set_content_type = Frame.__dict__["content_type"].__set__


def _frame(headers: Mapping[str, str], body: bytes, content_type: str) -> Frame:
    frame = _new_frame(Frame)
    _set_headers(frame, headers)
    _set_body(frame, body)
    _set_content_type(frame, content_type)
    return frame


def _skip_blank_lines(buf: bytes | bytearray, start: int) -> int:
    blanks = _LEADING_BLANKS.match(buf, start)
    return blanks.end() if blanks else start


class PyEslParser:
    """Incremental frame parser for the FreeSWITCH -> client direction (pure Python).

    The specification of the framer: ``engine/esl/_speedups.c`` is its compiled twin, and
    ``EslParser`` names whichever of the two is active (see the end of this module).

    Bytes that do not complete a frame are kept in one bytearray; the search for the end
    of a header block resumes where the previous ``feed()`` stopped, so buffering is linear
    in the input size. When nothing is buffered, frames are cut straight from the bytes fed.
    Text is decoded only once a frame is complete, so a UTF-8 character split across two
    reads decodes correctly.
    """

    def __init__(self, max_header_bytes: int = 256 * 1024, max_body_bytes: int = 1024 * 1024) -> None:
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._buf = bytearray()
        self._scan = 0  # where to resume looking for the end of the header block
        self._headers: Mapping[str, str] | None = None  # parsed block waiting for its body
        self._content_type = ""
        self._body_start = 0
        self._body_len = 0
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame (0 at a frame boundary)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._error is not None:
            raise ProtocolError(f"parser unusable after an earlier error: {self._error}")
        frames: list[Frame] = []
        try:
            if self._buf:
                self._buf += data
                self._cut_frames(self._buf, frames)
            else:  # bodies are sliced from ``data``: it must be immutable
                self._cut_frames(data if type(data) is bytes else bytes(data), frames)
        except ProtocolError as exc:
            exc.frames = frames
            self._error = exc
            raise
        return frames

    def _cut_frames(self, buf: bytes | bytearray, frames: list[Frame]) -> None:
        """Append the frames complete in ``buf`` to ``frames``; keep the rest buffered.

        ``buf`` is the internal buffer or, when that was empty, the bytes just fed. Here
        ``self._scan`` and ``self._body_start`` are positions in ``buf``; between calls they
        are relative to the start of the internal buffer (both start at 0).
        """
        start = 0  # where the unfinished frame begins
        try:
            while True:
                if self._headers is None:
                    if start < len(buf) and buf[start] in _CR_LF:
                        start = _skip_blank_lines(buf, start)
                    if not self._read_header_block(buf, start):
                        return
                end = self._body_start + self._body_len
                if len(buf) < end:
                    return
                assert self._headers is not None
                body = bytes(buf[self._body_start : end]) if self._body_len else b""
                frames.append(_frame(self._headers, body, self._content_type))
                self._headers = None
                start = end
        finally:
            self._keep(buf, start)

    def _read_header_block(self, buf: bytes | bytearray, start: int) -> bool:
        # Measured: this search is faster than bytes.find(b"\n\n") (3 vs 5 us on a connect
        # reply) and finds a CRLF terminator in the same pass.
        end = _BLOCK_END.search(buf, self._scan if self._scan > start else start)
        if end is None:
            if len(buf) - start > self._max_header_bytes:
                raise ProtocolError(f"header block exceeds {self._max_header_bytes} bytes")
            self._scan = max(start, len(buf) - 2)  # the terminator may straddle two reads
            return False
        block_end, body_start = end.span()
        if body_start - start > self._max_header_bytes:
            raise ProtocolError(f"header block exceeds {self._max_header_bytes} bytes")
        headers = _parse_lines(buf[start:block_end].decode("utf-8", errors="replace"))
        length = headers.get("Content-Length")
        self._body_len = 0 if length is None else _content_length(length, self._max_body_bytes)
        self._headers = MappingProxyType(headers)
        self._content_type = headers.get("Content-Type", "")
        self._body_start = body_start
        self._scan = 0
        return True

    def _keep(self, buf: bytes | bytearray, start: int) -> None:
        """Leave ``buf[start:]`` (the unfinished frame) in the internal buffer."""
        if buf is self._buf:
            del self._buf[:start]
        else:
            self._buf += buf[start:]
        if self._headers is None:
            self._scan = max(0, self._scan - start)
        else:
            self._body_start -= start


# --------------------------------------------------------------------------- commands


def _check_token(kind: str, value: str) -> None:
    if not value or _NAME_FORBIDDEN.search(value):
        raise ValueError(f"invalid {kind}: {value!r} (empty, or has ':', whitespace or a control char)")


def command(line: str) -> bytes:
    """A one-line command such as ``connect``, ``myevents``, ``linger 30`` or ``exit``."""
    if not line or "\n" in line or "\r" in line or "\x00" in line:
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


# "sendmsg ... execute-app-arg: " of each app name that passed _check_token (sendmsg_execute).
_EXECUTE_HEADS: dict[str, bytes] = {}


def sendmsg_execute(app: str, arg: str = "", *, uuid: str | None = None, event_lock: bool = False) -> bytes:
    """``sendmsg`` running dialplan app ``app`` with ``arg`` on the channel.

    An argument that cannot travel as an ``execute-app-arg`` header line (newline, CR,
    leading blank, longer than ``MAX_HEADER_ARG_BYTES``) is sent as a ``text/plain``
    body, which FreeSWITCH uses as the argument when the header is absent.
    """
    if uuid is None and not event_lock and arg:
        # The usual message (every call sends two): its head, for an app seen before, and
        # the argument as a header line; the same bytes as below, without building them.
        head = _EXECUTE_HEADS.get(app)
        if (
            head is not None
            and "\x00" not in arg
            and "\n" not in arg
            and "\r" not in arg
            and arg[0] not in " \t"
        ):
            encoded = arg.encode()
            if len(encoded) <= MAX_HEADER_ARG_BYTES:
                return head + encoded + b"\n\n"
    _check_token("app name", app)
    if "\x00" in arg:
        raise ValueError("app argument contains NUL")
    if app.isascii() and len(_EXECUTE_HEADS) < 64:  # bounded: app names are literals in the code
        _EXECUTE_HEADS[app] = (
            f"sendmsg\ncall-command: execute\nexecute-app-name: {app}\nexecute-app-arg: ".encode()
        )
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


# Names already checked: a call's variables come from a small fixed vocabulary, checked once.
_GOOD_NAMES: set[str] = set()


def check_variable_name(name: str) -> None:
    """ValueError unless ``name`` can be the left side of ``set``/``multiset``'s ``name=value``."""
    if name in _GOOD_NAMES:
        return
    _check_token("variable name", name)
    if "=" in name:
        raise ValueError(f"invalid variable name: {name!r} (contains '=')")
    if len(_GOOD_NAMES) < 1024:  # bounded: names built from data would otherwise grow it
        _GOOD_NAMES.add(name)


def set_variable(name: str, value: str, *, uuid: str | None = None, event_lock: bool = False) -> bytes:
    """``sendmsg`` executing ``set name=value`` on the channel."""
    check_variable_name(name)
    return sendmsg_execute("set", f"{name}={value}", uuid=uuid, event_lock=event_lock)


# --------------------------------------------------------------------------- compiled twin

# Set to any non-empty value other than "0" to run on the pure-Python parser even when the
# extension is built (CI runs the whole suite once that way: scripts/test.sh).
NO_SPEEDUPS_ENV = "CALLGATE_NO_SPEEDUPS"


def _load_speedups() -> tuple[str, str]:
    """Which implementation is active, and why: ("compiled"|"python", reason).

    A built extension is always set up (the differential tests compare it with the Python
    parser even when the Python one is forced); it replaces the Python names unless forced off.
    """
    try:
        from engine.esl import _speedups
    except ImportError as exc:
        return "python", f"engine.esl._speedups is not built ({exc}); run: bash scripts/venv.sh"
    _speedups.setup(_frame, ProtocolError, _bad_line, _content_length, _py_decode_value)
    if os.environ.get(NO_SPEEDUPS_ENV, "") not in ("", "0"):
        return "python", f"forced by {NO_SPEEDUPS_ENV}={os.environ[NO_SPEEDUPS_ENV]}"
    global EslParser, HeaderPicker, decode_value
    EslParser = _speedups.EslParser  # type: ignore[assignment]
    HeaderPicker = _speedups.HeaderPicker  # type: ignore[assignment]
    decode_value = _speedups.decode_value
    return "compiled", "engine.esl._speedups loaded"


_py_decode_value = decode_value
EslParser = PyEslParser
HeaderPicker = PyHeaderPicker
IMPLEMENTATION, _REASON = _load_speedups()


def speedups_status() -> dict[str, str]:
    """The active framer, header picker and value decoder ("compiled" or "python") and why."""
    return {"implementation": IMPLEMENTATION, "reason": _REASON}


if __name__ == "__main__":  # python -m engine.esl.protocol: which parser this install runs
    print(speedups_status())
