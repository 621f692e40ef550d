"""Re-counting live calls whose acquire was lost (engine.reconcile's second half).

Redis replicates asynchronously: a Sentinel failover can promote a replica that never received
the primary's last acquires. Those calls are up on FreeSWITCH, decided by callgate, yet the
new primary neither counts them (limits) nor holds their funds reservation, so their accounts
could go over their channel limits and funds until they hang up. The reconciler finds them
(inbound channels a switch lists that the registry of counted calls lacks), reads what the
engine wrote on each (``callgate_bill``, the billing ticket: account, chain, routes, prices,
granted duration, decision time; ``callgate_did``), and counts them again with
:meth:`engine.state.limits.Limiter.recount`: one script per call, no limit checked (the call
is up; an over-limit subject refuses new calls until it drains), guarded by the registry so
two reconcilers or two runs never count a call twice.

What the acquire counted is rebuilt from the ticket without the catalogue: the account and
every reseller of the chain, the DID, and the first trunk of the routes (the routes written
are those left after the limits dropped full trunks, so the acquire counted that trunk when it
is limited). A subject that is unlimited now gets a member nobody reads, dropped at release
like any other. The funds reservation is the ticket's granted duration at each level's
frozen tariff, as the acquire took it (engine.billing.funds), from the decision time.

A call without a ticket (decided with no accounting configured, or not by callgate) cannot be
re-counted: its account ids are not on the channel. A ticket that does not decode, or whose
signature does not verify when ``[billing] ticket_keys`` is set, is not trusted either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from engine.billing.funds import Funds, FundsLevel
from engine.billing.rating import Tariff
from engine.billing.ticket import TICKET_VARIABLE, BadTicket, decode_ticket, verify_ticket
from engine.esl.inbound import api_many
from engine.state.limits import Limiter
from engine.state.limits.plan import LevelKind, Subject

__all__ = [
    "ALREADY_COUNTED",
    "ALREADY_SETTLED",
    "DID_VARIABLE",
    "RECOUNTED",
    "TOO_RECENT",
    "CallVariables",
    "RecountRequest",
    "Recounter",
    "fetch_call_variables",
    "recount_candidates",
    "recount_request",
]

log = logging.getLogger("callgate.limits")

DID_VARIABLE = "callgate_did"  # engine.call.render writes it for a call to a DID
UNSET = "_undef_"  # uuid_getvar's answer for a variable the channel does not have

# Outcomes of Limiter.recount's script.
RECOUNTED, ALREADY_COUNTED, ALREADY_SETTLED, TOO_RECENT = 1, 0, 2, 3


@dataclass(frozen=True, slots=True)
class CallVariables:
    """What the engine wrote on a channel that the recount reads (None: not set)."""

    ticket: str | None
    did: str | None


@dataclass(frozen=True, slots=True)
class RecountRequest:
    """What one call's acquire counted and reserved, as its ticket tells."""

    uuid: str
    chain: tuple[int, ...]  # the account first, then its resellers
    did_id: int | None
    trunk_id: int | None  # the first route's trunk
    max_duration: int  # the seconds granted (the funds reservation's duration)
    decided_ms: int | None
    tariffs: tuple[Tariff, ...]  # one per chain level, as frozen at the decision


def recount_candidates(inbound: Iterable[str], counted: Mapping[str, float] | Iterable[str]) -> list[str]:
    """The inbound channels a switch lists that the registry does not count (sorted).

    B-legs (outbound) are never counted: the registry holds A-leg uuids only."""
    counted_set = set(counted)
    return sorted(uuid for uuid in inbound if uuid not in counted_set)


def recount_request(
    uuid: str, variables: CallVariables, ticket_keys: tuple[bytes, ...] = ()
) -> RecountRequest | None:
    """The request to re-count ``uuid`` from its channel variables; None when it has no ticket.

    Raises BadTicket for a ticket that is not one the engine wrote (or not signed for this
    uuid when ``ticket_keys`` is set), ValueError for a malformed ``callgate_did``."""
    if variables.ticket is None:
        return None
    ticket = decode_ticket(verify_ticket(variables.ticket, uuid, ticket_keys))
    did_id = None
    if variables.did is not None:
        if not variables.did.isdigit():
            raise ValueError(f"{DID_VARIABLE} is not an id")
        did_id = int(variables.did)
    pricing = ticket.pricing
    if len(pricing.levels) != len(ticket.chain):
        raise BadTicket("one price per chain level expected")
    decided_ms = None if ticket.decided_at is None else round(ticket.decided_at.timestamp() * 1000)
    return RecountRequest(
        uuid=uuid,
        chain=ticket.chain,
        did_id=did_id,
        trunk_id=pricing.routes[0].trunk_id if pricing.routes else None,
        max_duration=pricing.max_duration,
        decided_ms=decided_ms,
        tariffs=tuple(level.tariff for level in pricing.levels),
    )


def _value(body: str) -> str | None:
    text = body.strip()
    if not text or text == UNSET or text.startswith("-"):  # "-ERR No such channel!": it hung up
        return None
    return text


def fetch_call_variables(
    host: str, port: int, password: str, uuids: list[str], timeout: float = 5.0
) -> dict[str, CallVariables]:
    """``uuid_getvar`` of the ticket and the DID of each call, over one connection: two commands
    a call, pipelined (engine.esl.inbound.api_many). Calls gone meanwhile have no ticket.

    Raises InboundError."""
    lines = [f"uuid_getvar {uuid} {name}" for uuid in uuids for name in (TICKET_VARIABLE, DID_VARIABLE)]
    bodies = api_many(host, port, password, lines, timeout=timeout)
    return {
        uuid: CallVariables(_value(bodies[2 * n]), _value(bodies[2 * n + 1])) for n, uuid in enumerate(uuids)
    }


class Recounter:
    """Counts the lost calls back: :meth:`apply` runs one call's script.

    ``limiter``: the Redis limiter (a fail-open wrapper's own ``.limiter``); ``funds``: the
    reservations' margins (None: limits only); ``ticket_keys``: ``[billing] ticket_keys``;
    ``fetch``: reads the variables of some calls on one switch (host, port, password, uuids)."""

    def __init__(
        self,
        limiter: Limiter,
        funds: Funds | None = None,
        *,
        ticket_keys: tuple[bytes, ...] = (),
        fetch: Callable[[str, int, str, list[str], float], dict[str, CallVariables]] = fetch_call_variables,
    ) -> None:
        self.limiter = limiter
        self.funds = funds
        self.ticket_keys = ticket_keys
        self.fetch = fetch

    def variables(
        self, host: str, port: int, password: str, uuids: list[str], timeout: float
    ) -> dict[str, CallVariables]:
        """Raises InboundError (or OSError) when the switch cannot be asked."""
        return self.fetch(host, port, password, uuids, timeout)

    def apply(self, request: RecountRequest, grace_seconds: float) -> int:
        """Run the recount script for one call; its outcome (RECOUNTED, ...). Raises LimitsUnavailable."""
        levels = [
            Subject(LevelKind.ACCOUNT if n == 0 else LevelKind.RESELLER, account_id)
            for n, account_id in enumerate(dict.fromkeys(request.chain))
        ]
        if request.did_id is not None:
            levels.append(Subject(LevelKind.DID, request.did_id))
        trunk = None if request.trunk_id is None else Subject(LevelKind.TRUNK, request.trunk_id)
        reservation = None
        if self.funds is not None:
            reservation = self.funds.request(
                [
                    FundsLevel(account_id, Decimal(0), Decimal(0), tariff)  # base, recorded: unused to take
                    for account_id, tariff in zip(request.chain, request.tariffs, strict=True)
                ],
                request.max_duration,
            )
        return self.limiter.recount(
            request.uuid,
            levels,
            request.max_duration,
            trunk=trunk,
            decided_ms=request.decided_ms,
            grace_seconds=grace_seconds,
            funds=reservation,
        )
