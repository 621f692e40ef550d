"""A decision as the bytes of one pipelined write (observed to work on FreeSWITCH 1.10).

The write is shaped to keep FreeSWITCH's output small, because reading it is most of
an engine's work per call: ``nixevent`` drops the channel events callgate never reads
(each carries every channel variable, ~4 KiB) and the variables travel in one
``multiset`` (one reply and one CHANNEL_EXECUTE_COMPLETE instead of one per ``set``).
Both ``linger`` and ``nixevent`` need the socket's ``full`` flag (dialplan/callgate.xml).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.esl.protocol import check_variable_name, command, sendmsg_execute, set_variable

#: The events callgate reads once it has answered (engine.authorize).
FOLLOWED_EVENTS = ("CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP_COMPLETE")

#: What ``myevents`` subscribes to on FreeSWITCH 1.10 (mod_event_socket.c), less FOLLOWED_EVENTS.
UNREAD_EVENTS = (
    "CHANNEL_ANSWER",
    "CHANNEL_APPLICATION",
    "CHANNEL_BRIDGE",
    "CHANNEL_CREATE",
    "CHANNEL_DATA",
    "CHANNEL_DESTROY",
    "CHANNEL_EXECUTE",
    "CHANNEL_HANGUP",
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


def _batch(commands: list[bytes]) -> Batch:
    return Batch(b"".join(commands), len(commands))


def _preamble() -> list[bytes]:
    # myevents: CHANNEL_HANGUP_COMPLETE reaches us; linger: it is delivered before FreeSWITCH closes.
    return [command("myevents"), command("nixevent " + " ".join(UNREAD_EVENTS)), command("linger")]


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
        check_variable_name(name)
    if len(items) < 2:
        return [set_variable(name, value) for name, value in items]
    chunks = [items[i : i + MULTISET_MAX_VARIABLES] for i in range(0, len(items), MULTISET_MAX_VARIABLES)]
    arguments = [multiset_argument(chunk) for chunk in chunks]
    if None in arguments:
        return [set_variable(name, value) for name, value in items]
    return [sendmsg_execute("multiset", argument) for argument in arguments if argument is not None]


def bridge_batch(variables: Iterable[tuple[str, str]], dial_string: str) -> Batch:
    return _batch([*_preamble(), *assignments(variables), sendmsg_execute("bridge", dial_string)])


def respond_batch(variables: Iterable[tuple[str, str]], code: int, text: str) -> Batch:
    return _batch([*_preamble(), *assignments(variables), sendmsg_execute("respond", f"{code} {text}")])
