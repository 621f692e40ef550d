"""Logging set-up: plain text or one JSON object per line; secrets never leave the process."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from engine.config import LoggingSettings

# Values after these words are masked wherever they appear in a message (SIP passwords, API tokens).
SECRET_PATTERN = re.compile(r"(?i)\b(password|passwd|secret|token|pin)(\s*[=:]\s*)(\S+)")
EXTRA_FIELDS = ("uuid", "result", "reason", "account", "latency_ms")


def mask_secrets(text: str) -> str:
    return SECRET_PATTERN.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_secrets(record.getMessage()),
        }
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, separators=(",", ":"))


class MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


def setup_logging(settings: LoggingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(MaskingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
