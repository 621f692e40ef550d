"""Reconciliation of the shared call counters against FreeSWITCH's live channels (§7).

Hangups get lost (a slow inbound listener loses events and is eventually killed by
FreeSWITCH; an engine process can die with calls up), so the limits' registry of
counted calls is periodically compared with what every switch reports in
``show channels``, and calls that no switch knows are released.

Acquires get lost too (a Redis failover promotes a replica that never received the
primary's last writes): with a ``recounter`` (engine.recount), the inbound channels a
switch lists that the registry lacks are read (``uuid_getvar`` of the billing ticket and
the DID, pipelined, only for those channels) and counted again, funds reservation
included. Re-counting only ever adds calls a switch has just shown up, so it runs per
switch: a switch that cannot be asked only delays its own calls' recount.

Safety rules:

* A partial view never releases anything: if any configured switch cannot be listed
  (refused, timed out, bad password, malformed or truncated reply), the run does
  nothing. An empty switch list does nothing either. The list must therefore name
  every FreeSWITCH whose calls are counted under this key prefix; a switch missing from
  it would have its calls released.
* Calls admitted less than ``grace_seconds`` ago are kept (the check is atomic in
  Redis), since a switch listed a moment before the admission cannot show them yet.
  Switches are listed before the registry is read, for the same reason.

The switches are listed with ``api show channels as delim |`` through the small
inbound-socket client of engine.esl.inbound (one overall deadline per switch).

``show channels`` output (mod_commands): a header line of column names joined by the
delimiter (``uuid`` first), one line per channel, an empty line and ``N total.``; with
no channel only the empty line and ``0 total.``. The parser reads the ``uuid`` column by
its position in the header, and accepts ``,`` (plain ``show channels``) or any other
one-character delimiter. A value holding a newline can split a row in two; the extra
"uuid" such a line yields only ever keeps calls, never releases one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from engine.esl.inbound import InboundError, api
from engine.recount import RECOUNTED, Recounter, recount_candidates, recount_request
from engine.state.limits import LimitsBackend, LimitsUnavailable

__all__ = [
    "LiveChannels",
    "ReconcileReport",
    "SwitchAddress",
    "SwitchUnavailable",
    "list_live_channels",
    "parse_show_channels",
    "reconcile",
]

log = logging.getLogger("callgate.limits")

SHOW_CHANNELS = "show channels as delim |"
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
    funds_only: tuple[str, ...] = ()  # reservations of calls neither live nor counted, given back
    recounted: tuple[str, ...] = ()  # live calls the registry lacked, counted (and reserved) again
    unrecountable: int = 0  # live inbound calls not counted and not re-countable (no usable ticket)
    errors: tuple[str, ...] = ()


class LiveChannels(set[str]):
    """Every uuid a switch lists, and (``inbound``) those of its inbound legs: the only ones the
    registry can count (a call is counted under its A-leg's uuid)."""

    def __init__(self, uuids: Iterable[str] = (), inbound: Iterable[str] = ()) -> None:
        super().__init__(uuids)
        self.inbound = frozenset(inbound)


# --------------------------------------------------------------------------- ESL client


def list_live_channels(
    host: str, port: int = 8021, password: str = "ClueCon", timeout: float = 5.0
) -> LiveChannels:
    """The uuids of every channel FreeSWITCH at ``host:port`` has up (inbound socket).

    Raises SwitchUnavailable on any failure; ``timeout`` bounds the whole exchange."""
    try:
        body = api(host, port, password, SHOW_CHANNELS, timeout=timeout, max_reply_bytes=MAX_REPLY_BYTES)
    except InboundError as exc:
        raise SwitchUnavailable(str(exc)) from exc
    try:
        return parse_live_channels(body)
    except ValueError as exc:
        raise SwitchUnavailable(f"{host}:{port}: {exc}") from exc


def parse_show_channels(text: str) -> set[str]:
    """The ``uuid`` column of a ``show channels`` reply (any one-character delimiter).

    Raises ValueError for an error reply, a missing ``N total.`` line (truncated) or
    fewer rows than the total says."""
    return set(parse_live_channels(text))


def parse_live_channels(text: str) -> LiveChannels:
    """:func:`parse_show_channels`, with the inbound legs apart (the ``direction`` column;
    every row is taken for one when the reply has no such column)."""
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
        return LiveChannels()
    if not rows or not rows[0].startswith("uuid") or len(rows[0]) < 5:
        raise ValueError("no 'uuid' header line")
    header = rows[0]
    delim = header[4]
    names = header.split(delim)
    column = names.index("uuid")
    direction = names.index("direction") if "direction" in names else None
    uuids: set[str] = set()
    inbound: set[str] = set()
    for row in rows[1:]:
        fields = row.split(delim)
        if len(fields) > column and fields[column].strip():
            uuid = fields[column].strip()
            uuids.add(uuid)
            if direction is None or (len(fields) > direction and fields[direction].strip() == "inbound"):
                inbound.add(uuid)
    if len(rows) - 1 < total:
        raise ValueError(f"{len(rows) - 1} rows listed, the total says {total}")
    return LiveChannels(uuids, inbound)


# --------------------------------------------------------------------------- reconcile


def reconcile(
    limiter: LimitsBackend,
    switches: Sequence[SwitchAddress],
    *,
    grace_seconds: float = 5,
    lister: Callable[[SwitchAddress], set[str]] | None = None,
    release_funds: Callable[[list[str]], object] | None = None,
    reserved_calls: Callable[[], Iterable[str]] | None = None,
    recounter: Recounter | None = None,
) -> ReconcileReport:
    """Release counted calls that no switch lists; do nothing unless every switch answered.
    With ``recounter``, count again the live inbound calls the registry lacks (see below).

    ``release_funds`` (engine.billing.funds.Funds.release_calls): the funds reservations of the
    calls released are given back too (every reserved call is in the limits registry), without
    a debit and without a CDR: a call whose hangup was never seen is not billed
    (docs/accounting.md). A failure there is reported, the slots stay released.

    ``reserved_calls`` (engine.billing.funds.Funds.reserved_calls): reservations of calls that are
    neither live nor counted are given back too. An engine killed between its two hangup batches
    (the limits release flushed, the settle not) leaves exactly that: no slot for the reconciler to
    find, and a reservation that would hold the account's funds until its deadline (found by the
    chaos suite). No grace is needed: a reservation is taken in the same script as the call's
    slot, and the reservations are read before the registry, so a call admitted meanwhile is in
    the registry read. Releasing is no debit and marks nothing settled: if the call's settle
    comes later after all, it still debits and writes the CDR.

    ``recounter`` (engine.recount.Recounter): each inbound channel a switch listed that the
    registry read here lacks is read on that switch (its ticket and DID) and counted again,
    with its funds reservation, by one script per call that does nothing when the call is
    counted by then (an acquire, another reconciler), already settled (it hung up), or decided
    less than ``grace_seconds`` ago. A switch that cannot be read, or a call without a usable
    ticket, is reported and skipped; a Redis failure stops the recount (the next run redoes it)."""
    if not switches:
        return ReconcileReport(ran=False, switches=0, errors=("no switches configured",))
    list_one = lister or (lambda s: list_live_channels(s.host, s.port, s.password, s.timeout))
    live: set[str] = set()
    listed: dict[SwitchAddress, set[str]] = {}
    errors: list[str] = []
    for switch in switches:
        try:
            listed[switch] = list_one(switch)
            live |= listed[switch]
        except (SwitchUnavailable, OSError) as exc:
            errors.append(f"{switch}: {exc}")
    if errors:
        return ReconcileReport(ran=False, switches=len(switches), errors=tuple(errors))
    funds_errors: tuple[str, ...] = ()
    reserved: set[str] = set()
    if reserved_calls is not None and release_funds is not None:
        try:
            reserved = set(reserved_calls())  # before the registry: see the docstring
        except Exception as exc:  # FundsUnavailable: the limits part still runs
            funds_errors = (f"funds: {exc}",)
    try:
        counted = limiter.counted_calls()
        orphans = [u for u in counted if u not in live]
        released = limiter.release_orphans(orphans, grace_seconds) if orphans else []
    except LimitsUnavailable as exc:
        return ReconcileReport(
            ran=False, switches=len(switches), live_channels=len(live), errors=(f"redis: {exc}",)
        )
    unreleased_funds = sorted(reserved - live - counted.keys())
    if (released or unreleased_funds) and release_funds is not None:
        try:
            release_funds([*released, *unreleased_funds])
        except Exception as exc:  # FundsUnavailable: they expire at their own deadline
            funds_errors = (f"funds: {exc}",)
    recounted: list[str] = []
    unrecountable = 0
    recount_errors: list[str] = []
    if recounter is not None:
        recounted, unrecountable, recount_errors = _recount(recounter, listed, counted, grace_seconds)
    return ReconcileReport(
        ran=True,
        switches=len(switches),
        live_channels=len(live),
        counted=len(counted),
        orphans=len(orphans),
        released=tuple(released),
        kept=len(orphans) - len(released),
        funds_only=tuple(unreleased_funds),
        recounted=tuple(recounted),
        unrecountable=unrecountable,
        errors=(*funds_errors, *recount_errors),
    )


def _recount(
    recounter: Recounter,
    listed: dict[SwitchAddress, set[str]],
    counted: dict[str, float],
    grace_seconds: float,
) -> tuple[list[str], int, list[str]]:
    """(calls re-counted, calls not re-countable, errors) over every switch's uncounted inbound legs."""
    recounted: list[str] = []
    unrecountable = 0
    errors: list[str] = []
    for switch, uuids in listed.items():
        inbound = uuids.inbound if isinstance(uuids, LiveChannels) else uuids
        candidates = recount_candidates(inbound, counted)
        if not candidates:
            continue
        try:
            found = recounter.variables(switch.host, switch.port, switch.password, candidates, switch.timeout)
        except (InboundError, OSError) as exc:
            errors.append(f"recount: {exc}")  # InboundError names the switch
            continue
        for uuid in candidates:
            variables = found.get(uuid)
            try:
                request = (
                    None if variables is None else recount_request(uuid, variables, recounter.ticket_keys)
                )
            except ValueError as exc:  # BadTicket included: never trusted
                log.warning("live call %s not re-counted: unusable ticket (%s)", uuid, exc)
                request = None
            if request is None:
                unrecountable += 1
                continue
            try:
                outcome = recounter.apply(request, grace_seconds)
            except LimitsUnavailable as exc:
                errors.append(f"recount: redis: {exc}")
                return recounted, unrecountable, errors
            if outcome == RECOUNTED:
                log.warning(
                    "re-counted live call %s (account %d): its acquire was lost", uuid, request.chain[0]
                )
                recounted.append(uuid)
    return recounted, unrecountable, errors
