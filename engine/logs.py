"""Logging set-up: plain text or one JSON object per line; secrets never leave the process.

Whatever a message, an exception or a structured field carries, the value of anything
named like a secret (password, secret, token, API key, PIN, the ESL `auth` command) and
the password part of a URL (``redis://:pw@host``, ``postgresql://user:pw@host``) are
replaced by ``***`` before the line is written.

Caller-supplied text cannot forge or flood a line, in either format: control characters
(newline, carriage return, escape...), Unicode line separators and lone surrogates are
backslash-escaped (``\\n``, ``\\x1b``, ``\\ud800``), each ``%``-argument and ``extra`` value
is cut to ``MAX_VALUE_CHARS`` and a whole message to ``MAX_MESSAGE_CHARS``, with a marker
saying how much was cut. In plain text, every line of a traceback is indented, so a line
that starts at the first column is always a record of its own.

The decision log (logger ``callgate.decision``, one line per call at
``logging.decision_level``, shown when that is at or above ``logging.level``) carries the
fields uuid, result, reason, account and latency_ms; in JSON every ``extra=`` field of a
record is a key of its own.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from engine.config import LoggingSettings

MASK = "***"
_SECRET_WORDS = r"password|passwd|pwd|secret|token|api[_-]?key|pin"
# name=value, name: value, "name": "value" (also sip_auth_password=…, X-Api-Key: …).
SECRET_PATTERN = re.compile(rf"(?i)\b([\w.-]*?(?:{_SECRET_WORDS}))([\"']?\s*[=:]\s*[\"']?)([^\s\"',;&]+)")
# SECRET_PATTERN cannot match an ASCII text whose lower case holds none of these pieces of its
# words, and `in` finds them ~100 times faster than SECRET_PATTERN's scan (its lazy name prefix
# retries at every position of every word): ~50 us of every decision-log line
# (docs/performance.md). Non-ASCII text always gets the scan (IGNORECASE folds e.g. U+017F to s).
_SECRET_PIECES = ("passw", "pwd", "secret", "token", "api", "pin")
# scheme://user:password@host
URL_PASSWORD_PATTERN = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)([^@\s/]+)@")
# Authorization: Bearer …/Basic …; the ESL inbound commands `auth <password>` and
# `userauth <user>:<password>` (a line of their own).
AUTH_PATTERN = re.compile(r"(?i)(\bauthorization\s*[=:]\s*(?:bearer\s+|basic\s+)?)(\S+)")
ESL_AUTH_PATTERN = re.compile(r"(?im)^(auth[ \t]+|userauth[ \t]+[^:\s]+:)(\S+)(?=[ \t]*$)")
SECRET_FIELD = re.compile(rf"(?i)(?:{_SECRET_WORDS})$|^auth(?:orization)?$")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


# One caller-supplied value (a %-argument, an `extra` field) and a whole message, in characters.
MAX_VALUE_CHARS = 1024
MAX_MESSAGE_CHARS = 8192
MAX_EXCEPTION_CHARS = 65536
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` with control characters, line separators and lone surrogates backslash-escaped."""
    return _CONTROL.sub(_escape_char, text) if _CONTROL.search(text) else text


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with a marker saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more chars]"


def _clip_argument(value: Any) -> Any:
    if isinstance(value, str):
        return clip(value, MAX_VALUE_CHARS)
    if isinstance(value, bytes | bytearray):
        return clip(repr(bytes(value)), MAX_VALUE_CHARS)
    return value  # numbers keep their %d/%f formatting; other objects are cut with the message


def safe_message(record: logging.LogRecord) -> str:
    """The record's message with every argument cut, then control characters escaped and the whole
    cut: one physical line of bounded length whatever the caller supplied."""
    args = record.args
    message: str
    if args:
        clipped: Any
        if isinstance(args, Mapping):
            clipped = {key: _clip_argument(value) for key, value in args.items()}
        else:
            # A short text (the usual argument) is its own clip: no call for it.
            clipped = tuple(
                [
                    value if type(value) is str and len(value) <= MAX_VALUE_CHARS else _clip_argument(value)
                    for value in args
                ]
            )
        try:
            message = str(record.msg) % clipped
        except (TypeError, ValueError, KeyError):
            message = record.getMessage()
    else:
        message = str(record.msg)
    return escape_control(clip(message, MAX_MESSAGE_CHARS))


def mask_secrets(text: str) -> str:
    # Each scan is skipped only when it cannot match (the _SECRET_PIECES rule above): in ASCII
    # text, URL_PASSWORD_PATTERN needs "://", AUTH_PATTERN and ESL_AUTH_PATTERN need "auth" in
    # some case. A mask only replaces a value by MASK, so it never makes "://" or "auth" appear
    # for a later scan. Every written line (a decision line per call) paid the three scans.
    plain = text.isascii()
    lower = text.lower() if plain else ""
    if not plain or any(piece in lower for piece in _SECRET_PIECES):
        text = SECRET_PATTERN.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    if not plain or "://" in text:
        text = URL_PASSWORD_PATTERN.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    if not plain or "auth" in lower:
        text = AUTH_PATTERN.sub(lambda m: f"{m.group(1)}{MASK}", text)
        text = ESL_AUTH_PATTERN.sub(lambda m: f"{m.group(1)}{MASK}", text)
    return text


def _field_value(name: str, value: Any) -> Any:
    if SECRET_FIELD.search(name):
        return MASK
    if value is None or isinstance(value, bool | int | float):
        return value
    return mask_secrets(
        escape_control(clip(value if isinstance(value, str) else str(value), MAX_VALUE_CHARS))
    )


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a caller passed with ``extra=``, secrets masked."""
    return {
        escape_control(clip(name, 100)): _field_value(name, value)
        for name, value in vars(record).items()
        if name not in _STANDARD_ATTRIBUTES and not name.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, message, the `extra` fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": mask_secrets(safe_message(record)),
        }
        for name, value in extra_fields(record).items():
            entry.setdefault(name, value)
        if record.exc_info:
            entry["exception"] = mask_secrets(
                clip(self.formatException(record.exc_info), MAX_EXCEPTION_CHARS)
            )
        if record.stack_info:
            entry["stack"] = mask_secrets(clip(self.formatStack(record.stack_info), MAX_EXCEPTION_CHARS))
        return json.dumps(entry, separators=(",", ":"), default=str)


def _indented(text: str) -> str:
    """A multi-line block (traceback, stack) cut and indented: no line of it starts a record."""
    lines = clip(text, MAX_EXCEPTION_CHARS).splitlines()
    return "\n".join("  " + escape_control(line) for line in lines)


class MaskingFormatter(logging.Formatter):
    """Plain text: one line per record (caller text escaped and cut), tracebacks indented below it."""

    def format(self, record: logging.LogRecord) -> str:
        if type(record) is logging.LogRecord:
            # What copy.copy does for a plain LogRecord (a new object, the same __dict__),
            # without its reduce protocol: ~5 times cheaper, and every decision line pays it.
            safe = logging.LogRecord.__new__(logging.LogRecord)
            safe.__dict__.update(record.__dict__)
        else:  # a record factory's own class may copy itself its own way
            safe = copy.copy(record)
        safe.msg, safe.args = safe_message(record), None
        return mask_secrets(super().format(safe))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


class Every:
    """A log line that may repeat fast (a refused scan, a listener flapping under overload)
    written at most once per ``interval`` seconds, with how many were held back since: the
    counts live in the metrics, the log keeps a readable trace."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._held = 0

    def due(self) -> int | None:
        """None while the line is not due (counted as held back); otherwise how many were
        held back since the last line, and the next one is due ``interval`` from now."""
        now = self._clock()
        if now < self._next:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._next = now + self._interval
        return held


def level_number(name: str) -> int:
    """A level name (DEBUG, INFO, WARNING, ERROR, CRITICAL) as its number; ValueError otherwise."""
    number = logging.getLevelName(str(name).strip().upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {name!r} (DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    return number


def setup_logging(settings: LoggingSettings, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(MaskingFormatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_number(settings.level))
    # The decision lines are written at decision_level and shown when it is at or above `level`
    # (decision_level = "DEBUG" under level = "INFO" silences them).
    level_number(settings.decision_level)
