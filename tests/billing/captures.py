"""Read the proxy transcripts in captures/ (copied from shared/reference/freeswitch-captures).

Format: '==== <unix time> FS->CG|CG->FS <n> bytes' then exactly n bytes, then the proxy's newline.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.esl.protocol import EslParser, Frame

CAPTURES = Path(__file__).parent / "captures"
_HEADER = re.compile(rb"^==== [0-9.]+ (FS->CG|CG->FS) (?:([0-9]+) bytes|EOF)\n", re.MULTILINE)


def chunks(name: str) -> list[tuple[str, bytes]]:
    data = (CAPTURES / name).read_bytes()
    out: list[tuple[str, bytes]] = []
    pos = 0
    while True:
        match = _HEADER.search(data, pos)
        if match is None:
            return out
        start = match.end()
        if match.group(2) is None:
            pos = start
            continue
        size = int(match.group(2))
        out.append((match.group(1).decode(), data[start : start + size]))
        pos = start + size


def frames(name: str) -> list[Frame]:
    parser = EslParser()
    found: list[Frame] = []
    for direction, data in chunks(name):
        if direction == "FS->CG":
            found += parser.feed(data)
    return found


def events(name: str, event_name: str) -> list[dict[str, str]]:
    return [f.event() for f in frames(name) if f.event_name == event_name]


def hangup_complete(name: str) -> dict[str, str]:
    (event,) = events(name, "CHANNEL_HANGUP_COMPLETE")
    return event


def bridge_data(name: str) -> str:
    """Application-Data of the bridge's CHANNEL_EXECUTE_COMPLETE."""
    for event in events(name, "CHANNEL_EXECUTE_COMPLETE"):
        if event.get("Application") == "bridge":
            return event.get("Application-Data", "")
    return ""
