"""A decision as the bytes of one pipelined write (observed to work on FreeSWITCH 1.10)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from engine.esl.protocol import command, sendmsg_execute, set_variable


@dataclass(frozen=True, slots=True)
class Batch:
    payload: bytes
    replies_expected: int  # one command/reply per command


def _batch(commands: list[bytes]) -> Batch:
    return Batch(b"".join(commands), len(commands))


def _preamble() -> list[bytes]:
    # myevents: CHANNEL_HANGUP_COMPLETE reaches us; linger: it is delivered before FreeSWITCH closes.
    return [command("myevents"), command("linger")]


def bridge_batch(variables: Iterable[tuple[str, str]], dial_string: str) -> Batch:
    commands = _preamble()
    commands += [set_variable(name, value) for name, value in variables]
    commands.append(sendmsg_execute("bridge", dial_string))
    return _batch(commands)


def respond_batch(variables: Iterable[tuple[str, str]], code: int, text: str) -> Batch:
    commands = _preamble()
    commands += [set_variable(name, value) for name, value in variables]
    commands.append(sendmsg_execute("respond", f"{code} {text}"))
    return _batch(commands)
