"""Logging set-up: plain text or one JSON object per line; secrets never leave the process.

Whatever a message, an exception or a structured field carries, the value of anything
named like a secret (password, secret, token, API key, PIN, the ESL `auth` command) and
the password part of a URL (``redis://:pw@host``, ``postgresql://user:pw@host``) are
replaced by ``***`` before the line is written.

The decision log (logger ``callgate.decision``, one line per call at
``logging.decision_level``, shown when that is at or above ``logging.level``) carries the
fields uuid, result, reason, account and latency_ms; in JSON every ``extra=`` field of a
record is a key of its own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
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


def mask_secrets(text: str) -> str:
    if not text.isascii() or any(piece in text.lower() for piece in _SECRET_PIECES):
        text = SECRET_PATTERN.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = URL_PASSWORD_PATTERN.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    text = AUTH_PATTERN.sub(lambda m: f"{m.group(1)}{MASK}", text)
    return ESL_AUTH_PATTERN.sub(lambda m: f"{m.group(1)}{MASK}", text)


def _field_value(name: str, value: Any) -> Any:
    if SECRET_FIELD.search(name):
        return MASK
    if isinstance(value, str):
        return mask_secrets(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return mask_secrets(str(value))


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a caller passed with ``extra=``, secrets masked."""
    return {
        name: _field_value(name, value)
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
            "message": mask_secrets(record.getMessage()),
        }
        for name, value in extra_fields(record).items():
            entry.setdefault(name, value)
        if record.exc_info:
            entry["exception"] = mask_secrets(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = mask_secrets(self.formatStack(record.stack_info))
        return json.dumps(entry, separators=(",", ":"), default=str)


class MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


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
