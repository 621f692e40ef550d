"""Building blocks of a pipelined write: channel variables as ``multiset``/``set`` commands.

Generic event-socket knowledge (observed on FreeSWITCH 1.10); what callgate writes for a
call is assembled in engine.call.render.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.esl.protocol import _GOOD_NAMES, check_variable_name, sendmsg_execute, set_variable

#: What ``myevents`` subscribes an outbound socket to on FreeSWITCH 1.10 (mod_event_socket.c).
MYEVENTS_TYPES = (
    "CHANNEL_ANSWER",
    "CHANNEL_APPLICATION",
    "CHANNEL_BRIDGE",
    "CHANNEL_CREATE",
    "CHANNEL_DATA",
    "CHANNEL_DESTROY",
    "CHANNEL_EXECUTE",
    "CHANNEL_EXECUTE_COMPLETE",
    "CHANNEL_HANGUP",
    "CHANNEL_HANGUP_COMPLETE",
    "CHANNEL_ORIGINATE",
    "CHANNEL_UUID",
    "CHANNEL_OUTGOING",
    "CHANNEL_PARK",
    "CHANNEL_PROGRESS",
    "CHANNEL_PROGRESS_MEDIA",
    "CHANNEL_STATE",
    "CHANNEL_UNBRIDGE",
    "CHANNEL_UNPARK",
    "DETECTED_SPEECH",
    "DTMF",
    "NOTALK",
    "TALK",
)

# multiset's "^^<c>" prefix names its separator; the first of these absent from every
# name and value is used (none of them is special to FreeSWITCH's variable expansion).
MULTISET_DELIMITERS = "|~!;#&*@%"
# mod_dptools splits a multiset argument into at most 256 parts (the last keeps the rest).
MULTISET_MAX_VARIABLES = 128


@dataclass(frozen=True, slots=True)
class Batch:
    payload: bytes
    replies_expected: int  # one command/reply per command


def multiset_argument(variables: Sequence[tuple[str, str]]) -> str | None:
    """``multiset``'s argument for ``variables`` (``^^<c>name=value<c>...``), or None when
    every candidate separator occurs in a name or value."""
    pairs = [f"{name}={value}" for name, value in variables]
    text = "".join(pairs)
    delimiter = next((c for c in MULTISET_DELIMITERS if c not in text), None)
    return None if delimiter is None else f"^^{delimiter}" + delimiter.join(pairs)


def assignments(variables: Iterable[tuple[str, str]]) -> list[bytes]:
    """Commands setting ``variables`` on the channel: one ``multiset`` when it can carry
    them, else one ``set`` each (a single variable, or no free separator)."""
    items = list(variables)
    for name, _ in items:
        if name not in _GOOD_NAMES:  # check_variable_name's own first test, without the call
            check_variable_name(name)
    if len(items) < 2:
        return [set_variable(name, value) for name, value in items]
    chunks = [items[i : i + MULTISET_MAX_VARIABLES] for i in range(0, len(items), MULTISET_MAX_VARIABLES)]
    arguments = [multiset_argument(chunk) for chunk in chunks]
    if None in arguments:
        return [set_variable(name, value) for name, value in items]
    return [sendmsg_execute("multiset", argument) for argument in arguments if argument is not None]
