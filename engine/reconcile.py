"""Reconciliation of the shared call counters against FreeSWITCH's live channels (§7).

Hangups get lost (a slow inbound listener loses events and is eventually killed by
FreeSWITCH; an engine process can die with calls up), so the limits' registry of
counted calls is periodically compared with what every switch reports in
``show channels``, and calls that no switch knows are released.

Safety rules:

* A partial view never releases anything: if any configured switch cannot be listed
  (refused, timed out, bad password, malformed or truncated reply), the run does
  nothing. An empty switch list does nothing either. The list must therefore name
  every FreeSWITCH whose calls are counted under this key prefix; a switch missing from
  it would have its calls released.
* Calls admitted less than ``grace_seconds`` ago are kept (the check is atomic in
  Redis), since a switch listed a moment before the admission cannot show them yet.
  Switches are listed before the registry is read, for the same reason.

The inbound-socket client here is deliberately small: connect, ``auth``,
``api show channels as delim |``, ``exit``, one overall deadline. It uses the standard
``socket`` module, which is cooperative once gevent has monkey-patched the process (the
engine does), and the engine's own sans-I/O parser. greenswitch's ``InboundESL`` was not
used because it has no deadline on command replies (``send`` waits forever when a
reply never comes) and spawns reader greenlets per connection.

``show channels`` output (mod_commands): a header line of column names joined by the
delimiter (``uuid`` first), one line per channel, an empty line and ``N total.``; with
no channel only the empty line and ``0 total.``. The parser reads the ``uuid`` column by
its position in the header, and accepts ``,`` (plain ``show channels``) or any other
one-character delimiter. A value holding a newline can split a row in two; the extra
"uuid" such a line yields only ever keeps calls, never releases one.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.esl.protocol import EslParser, Frame, ProtocolError, command
from engine.state.limits import LimitsBackend, LimitsUnavailable

__all__ = [
    "ReconcileReport",
    "SwitchAddress",
    "SwitchUnavailable",
    "list_live_channels",
    "parse_show_channels",
    "reconcile",
]

SHOW_CHANNELS = "api show channels as delim |"
MAX_REPLY_BYTES = 256 * 1024 * 1024  # ~100k channels at ~1 KiB a row, with room to spare

_TOTAL = re.compile(r"^(\d+) total\.$")


class SwitchUnavailable(Exception):
    """A switch's live channels could not be listed."""


@dataclass(frozen=True, slots=True)
class SwitchAddress:
    host: str
    port: int = 8021
    password: str = "ClueCon"
    timeout: float = 5.0

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    ran: bool  # False: nothing was released (a switch or Redis could not be read)
    switches: int
    live_channels: int = 0  # uuids listed over all switches (A and B legs)
    counted: int = 0  # calls in the limits registry
    orphans: int = 0  # counted calls no switch listed
    released: tuple[str, ...] = ()
    kept: int = 0  # orphans not released: admitted within the grace period (or released meanwhile)
    errors: tuple[str, ...] = ()


# --------------------------------------------------------------------------- ESL client


class _Inbound:
    def __init__(self, sock: socket.socket, deadline: float, where: str) -> None:
        self._sock = sock
        self._deadline = deadline
        self._where = where
        self._parser = EslParser(max_body_bytes=MAX_REPLY_BYTES)
        self._frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise SwitchUnavailable(f"{self._where}: send failed: {exc}") from exc

    def frame(self) -> Frame:
        while not self._frames:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise SwitchUnavailable(f"{self._where}: no reply before the deadline")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(262144)
            except TimeoutError as exc:
                raise SwitchUnavailable(f"{self._where}: no reply before the deadline") from exc
            except OSError as exc:
                raise SwitchUnavailable(f"{self._where}: receive failed: {exc}") from exc
            if not data:
                raise SwitchUnavailable(f"{self._where}: connection closed by the switch")
            try:
                self._frames += self._parser.feed(data)
            except ProtocolError as exc:
                raise SwitchUnavailable(f"{self._where}: not ESL: {exc}") from exc
        frame = self._frames.pop(0)
        if frame.content_type in ("text/disconnect-notice", "text/rude-rejection"):
            text = frame.body.decode("utf-8", "replace").strip()
            raise SwitchUnavailable(f"{self._where}: switch refused or closed: {text[:120]}")
        return frame

    def reply(self, content_type: str) -> Frame:
        """The next frame of ``content_type``, skipping events and log lines."""
        while True:
            frame = self.frame()
            if frame.content_type == content_type:
                return frame


def list_live_channels(
    host: str, port: int = 8021, password: str = "ClueCon", timeout: float = 5.0
) -> set[str]:
    """The uuids of every channel FreeSWITCH at ``host:port`` has up (inbound socket).

    Raises SwitchUnavailable on any failure; ``timeout`` bounds the whole exchange."""
    where = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise SwitchUnavailable(f"{where}: connect failed: {exc}") from exc
    with sock:
        client = _Inbound(sock, deadline, where)
        greeting = client.frame()
        if greeting.content_type != "auth/request":
            raise SwitchUnavailable(f"{where}: expected auth/request, got {greeting.content_type!r}")
        try:
            client.send(command(f"auth {password}"))
        except ValueError as exc:
            raise SwitchUnavailable(f"{where}: unusable password") from exc
        answer = client.reply("command/reply")
        if not answer.reply_ok():
            raise SwitchUnavailable(f"{where}: auth refused: {answer.reply_text}")
        client.send(command(SHOW_CHANNELS))
        body = client.reply("api/response").body.decode("utf-8", "replace")
        with contextlib.suppress(SwitchUnavailable):
            client.send(command("exit"))
    try:
        return parse_show_channels(body)
    except ValueError as exc:
        raise SwitchUnavailable(f"{where}: {exc}") from exc


def parse_show_channels(text: str) -> set[str]:
    """The ``uuid`` column of a ``show channels`` reply (any one-character delimiter).

    Raises ValueError for an error reply, a missing ``N total.`` line (truncated) or
    fewer rows than the total says."""
    text = text.replace("\r", "")
    if text.lstrip().startswith("-"):
        raise ValueError(f"switch answered {text.strip()[:120]!r}")
    lines = text.split("\n")
    total_at = next((n for n in range(len(lines) - 1, -1, -1) if _TOTAL.match(lines[n].strip())), None)
    if total_at is None:
        raise ValueError("no 'N total.' line: truncated or unexpected reply")
    total = int(_TOTAL.match(lines[total_at].strip()).group(1))  # type: ignore[union-attr]
    rows = [line for line in lines[:total_at] if line.strip()]
    if total == 0:
        return set()
    if not rows or not rows[0].startswith("uuid") or len(rows[0]) < 5:
        raise ValueError("no 'uuid' header line")
    header = rows[0]
    delim = header[4]
    column = header.split(delim).index("uuid")
    uuids: set[str] = set()
    for row in rows[1:]:
        fields = row.split(delim)
        if len(fields) > column and fields[column].strip():
            uuids.add(fields[column].strip())
    if len(rows) - 1 < total:
        raise ValueError(f"{len(rows) - 1} rows listed, the total says {total}")
    return uuids


# --------------------------------------------------------------------------- reconcile


def reconcile(
    limiter: LimitsBackend,
    switches: Sequence[SwitchAddress],
    *,
    grace_seconds: float = 5,
    lister: Callable[[SwitchAddress], set[str]] | None = None,
) -> ReconcileReport:
    """Release counted calls that no switch lists; do nothing unless every switch answered."""
    if not switches:
        return ReconcileReport(ran=False, switches=0, errors=("no switches configured",))
    list_one = lister or (lambda s: list_live_channels(s.host, s.port, s.password, s.timeout))
    live: set[str] = set()
    errors: list[str] = []
    for switch in switches:
        try:
            live |= list_one(switch)
        except (SwitchUnavailable, OSError) as exc:
            errors.append(f"{switch}: {exc}")
    if errors:
        return ReconcileReport(ran=False, switches=len(switches), errors=tuple(errors))
    try:
        counted = limiter.counted_calls()
        orphans = [u for u in counted if u not in live]
        released = limiter.release_orphans(orphans, grace_seconds) if orphans else []
    except LimitsUnavailable as exc:
        return ReconcileReport(
            ran=False, switches=len(switches), live_channels=len(live), errors=(f"redis: {exc}",)
        )
    return ReconcileReport(
        ran=True,
        switches=len(switches),
        live_channels=len(live),
        counted=len(counted),
        orphans=len(orphans),
        released=tuple(released),
        kept=len(orphans) - len(released),
        errors=(),
    )
