"""What the call session hands to accounting: pure glue from a decision and its hangup to Redis calls.

At the decision (after the rules accepted the call)::

    pricing = pricing_for(accept)                     # frozen prices, kept with the call
    levels = funds_levels(pricing, catalog)           # -> Funds.reserve (or the limits script)

At CHANNEL_HANGUP_COMPLETE::

    item, rated = call_settlement(headers, accept, pricing, catalog)
    funds.settle_many([item, ...])                    # batched with other hangups

A refused call is recorded with :func:`reject_settlement` (no reservation, no debit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from engine.billing.cdr import answered_cdr, rejected_cdr
from engine.billing.funds import FundsLevel, Settlement
from engine.billing.hangup import CDR_INT_MAX, CallEnd, parse_hangup
from engine.billing.rating import CallPricing, RatedCall, rate_call
from engine.billing.ticket import BillingTicket
from engine.decision import Accept
from engine.rules.catalog import Catalog

_ZERO = Decimal(0)
# Per call. No real call costs this much: only a forged or broken billsec (centuries) gets
# here, and Redis's 64-bit counters of micro-units (9.2e12 units) would refuse the settle,
# which would then be retried forever (by the engine's settler, with every call batched
# with it; by FreeSWITCH, for a post).
MAX_DEBIT = Decimal(10**9)


def absurd(rated: RatedCall) -> str | None:
    """Why no switch can have reported this call, or None: a debit or carrier cost over
    :data:`MAX_DEBIT`, or a billsec over :data:`CDR_INT_MAX` (68 years, more than the CDR's
    ``integer`` column holds: its CDR would stop the CDR writer). Refused and logged, never
    settled."""
    if any(abs(d.amount) > MAX_DEBIT for d in rated.debits) or rated.carrier_cost > MAX_DEBIT:
        return f"debit over {MAX_DEBIT}"
    if rated.billsec > CDR_INT_MAX:
        return f"billsec over {CDR_INT_MAX}"
    return None


def _recorded(catalog: Catalog, account_id: int) -> tuple[Decimal, Decimal]:
    """(available credit, calls_debited) of an account in this snapshot."""
    account = catalog.accounts.get(account_id)
    if account is None:
        return _ZERO, _ZERO
    return account.available_credit, account.calls_debited


def funds_levels(pricing: CallPricing, catalog: Catalog) -> list[FundsLevel]:
    """One FundsLevel per chain member that pays for the call, at the price it pays."""
    levels = []
    for level in pricing.levels:
        base, recorded = _recorded(catalog, level.account_id)
        levels.append(FundsLevel(level.account_id, base, recorded, level.tariff))
    return levels


def call_settlement(
    headers: Mapping[str, str],
    accept: Accept,
    pricing: CallPricing,
    catalog: Catalog,
    *,
    decided_at: datetime | None = None,
) -> tuple[Settlement, RatedCall, CallEnd]:
    """Rate an accepted call from its decoded CHANNEL_HANGUP_COMPLETE and build its settlement.

    ``catalog`` is the snapshot at hangup: only its ``calls_debited`` is read (to initialise
    Redis's spent counter after a Redis restart); the prices are the ones frozen in ``pricing``.
    The engine's priced calls keep their ticket and go through :func:`held_settlement`; this is
    for a call decided without accounting, priced at its hangup.
    """
    ticket = BillingTicket(
        account_id=accept.account_id,
        account_number=accept.account_number,
        chain=tuple(accept.chain),
        direction=str(accept.direction),
        caller_id_name=accept.caller_id_name,
        translated=accept.destination,
        decided_at=decided_at,
        pricing=pricing,
    )
    return held_settlement(headers, ticket, catalog)


def held_settlement(
    headers: Mapping[str, str], ticket: BillingTicket, catalog: Catalog
) -> tuple[Settlement, RatedCall, CallEnd]:
    """:func:`ticket_settlement` of a call whose ticket the engine kept (engine.call.session)."""
    return ticket_settlement(headers, ticket, lambda account_id: _recorded(catalog, account_id)[1])


def ticket_settlement(
    headers: Mapping[str, str], ticket: BillingTicket, recorded: Callable[[int], Decimal]
) -> tuple[Settlement, RatedCall, CallEnd]:
    """The one way an accepted call is rated and settled, whoever saw its end: the engine from
    CHANNEL_HANGUP_COMPLETE (:func:`held_settlement`), or ``callgate fsxml`` from FreeSWITCH's
    CDR post, with the ticket the engine wrote on the channel (engine.billing.ticket). Same
    facts in, same amounts and the same CDR out, so whichever settles first, the other is a
    no-op. ``recorded``: the snapshot's ``calls_debited`` of an account (0 when unknown)."""
    end = parse_hangup(headers)
    rated = rate_call(ticket.pricing, end.billsec, end.carried_leg)
    record = ticket_cdr(end, ticket, rated)
    debits = tuple([(d.account_id, recorded(d.account_id), d.amount) for d in rated.debits])
    return Settlement(end.uuid, debits, record), rated, end


def ticket_cdr(end: CallEnd, ticket: BillingTicket, rated: RatedCall) -> dict[str, Any]:
    """The CDR of an answered call from its end and the ticket its decision wrote."""
    return answered_cdr(
        end,
        ticket.pricing,
        rated,
        account_id=ticket.account_id,
        account_number=ticket.account_number,
        chain=ticket.chain,
        direction=ticket.direction,
        caller_id_name=ticket.caller_id_name,
        translated=ticket.translated,
        fallback_start=ticket.decided_at,
    )


def reject_settlement(
    uuid: str,
    at: datetime,
    *,
    reason: str,
    sip_code: int,
    account_id: int | None = None,
    account_number: str = "",
    caller_id_number: str = "",
    caller_id_name: str = "",
    dialled: str = "",
    chain: tuple[int, ...] = (),
) -> Settlement:
    """A refused call's CDR (no debit). ``chain``: the account and its resellers, so that each
    reseller sees its customers' refused calls."""
    record = rejected_cdr(
        uuid,
        at,
        reason=reason,
        sip_code=sip_code,
        account_id=account_id,
        account_number=account_number,
        caller_id_number=caller_id_number,
        caller_id_name=caller_id_name,
        dialled=dialled,
    )
    if chain:
        record["chain"] = list(chain)
    return Settlement(uuid, (), record)
