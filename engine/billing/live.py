"""Accounting in the running engine: a priced decision at the call's start, its record at its end.

* At the decision (engine.decider): :func:`reservation_for` builds the call's funds
  reservation (every chain level at the price it pays, for the duration the rules allow),
  which rides in the limits acquire script (one Redis round trip); the admitted call
  becomes a :class:`PricedAccept`: the Accept with the duration the reservation covers
  (``max_duration``, rendered into ``sched_hangup +N``) and its frozen prices.
* At the end (engine.call.session's ``Bill`` action, carried out by the driver):
  :meth:`LiveBilling.bill` rates the accepted call from its CHANNEL_HANGUP_COMPLETE, or
  records the rejected attempt, and queues the settlement (:class:`Settler`: batched,
  never blocking the call). The settle script releases the reservation, applies the
  debit and queues the CDR once per call uuid; the limits release runs beside it (the
  two scripts touch different keys, each is idempotent per uuid: nothing is released
  twice, nothing leaks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from engine.billing.calls import (
    absurd,
    call_settlement,
    funds_levels,
    held_settlement,
    reject_settlement,
)
from engine.billing.funds import Funds, Settlement
from engine.billing.pricing import pricing_for, route_price
from engine.billing.rating import CallPricing
from engine.billing.settler import Settler
from engine.billing.ticket import BillingTicket
from engine.decision import Accept, Decision, Reason, Reject
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.rules.text import show
from engine.state.funds import FundsRequest

log = logging.getLogger("callgate.billing")

SipResponse = Callable[[Reason], tuple[int, str]]


_ACCEPT_FIELDS = tuple(field.name for field in dataclasses.fields(Accept))
_accept_values = operator.attrgetter(*_ACCEPT_FIELDS)


@dataclasses.dataclass(frozen=True, slots=True)
class PricedAccept(Accept):
    """An admitted call with what its hangup is rated on: the prices frozen at the decision
    and the decision time (the CDR's start when FreeSWITCH reports none)."""

    pricing: CallPricing | None = None
    decided_at: datetime | None = None


# FreeSWITCH bills ``end_epoch - answer_epoch`` in whole seconds, so a call hung up N seconds
# after its answer may be billed N + 1 (freeswitch-captures: ``sched_hangup +63`` ended the call
# 62.52 s after the answer, billsec 63). A reservation covering d billed seconds is therefore
# rendered as ``sched_hangup +(d - 1)``: the billed seconds never exceed what was reserved.
BILLSEC_ROUNDING = 1


def reservation_for(
    funds: Funds, accept: Accept, catalog: Catalog
) -> tuple[CallPricing, FundsRequest | None]:
    """The call's prices, and its reservation (None when no chain level pays anything): up to
    the rules' duration plus the billing second FreeSWITCH may add."""
    pricing = pricing_for(accept)
    levels = funds_levels(pricing, catalog)
    cap = accept.max_duration + BILLSEC_ROUNDING
    return pricing, (funds.request(levels, cap) if levels else None)


def granted_duration(granted: int | None, max_duration: int) -> int:
    """What ``sched_hangup`` is given when the reservation covers ``granted`` billed seconds."""
    if granted is None:
        return max_duration
    return max(1, min(max_duration, granted - BILLSEC_ROUNDING))


def priced(accept: Accept, pricing: CallPricing, granted: int | None, now: datetime) -> PricedAccept:
    """``accept`` (after the limits: possibly fewer routes) with the duration its reservation
    covers and the prices of the routes it will dial. ``pricing.max_duration`` keeps the
    billed seconds reserved (the CDR's ``max_duration``)."""
    duration = granted_duration(granted, accept.max_duration)
    routes = pricing.routes
    if len(accept.routes) != len(routes):  # the limits dropped full trunks: price what is dialled
        routes = tuple([route_price(route) for route in accept.routes])
    reserved = duration if granted is None else granted
    values = dict(zip(_ACCEPT_FIELDS, _accept_values(accept), strict=True))
    values["max_duration"] = duration
    return PricedAccept(**values, pricing=CallPricing(pricing.levels, routes, reserved), decided_at=now)


def _chain(catalog: Catalog, account_id: int) -> tuple[int, ...]:
    """The account and its resellers up to the top (what a reseller's CDR view filters on)."""
    chain = [account_id]
    account = catalog.accounts.get(account_id)
    while account is not None and account.reseller_id is not None and account.reseller_id not in chain:
        chain.append(account.reseller_id)
        account = catalog.accounts.get(account.reseller_id)
    return tuple(chain)


class LiveBilling:
    """The engine's hangup side: turns each decided call into one settlement for the Settler.

    ``bill`` never raises and never blocks (the call's greenlet runs it): a failure is logged
    with the call's uuid, and the call is then left unbilled like a hangup never seen."""

    def __init__(
        self,
        settler: Settler,
        catalog: Callable[[], Catalog],
        sip_response: SipResponse,
        *,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settler = settler
        self._catalog = catalog
        self._sip_response = sip_response
        self._wallclock = wallclock

    def bill(
        self,
        request: CallRequest | None,
        decision: Decision | BillingTicket | None,
        hangup: Mapping[str, str] | None,
        *,
        may_hold_funds: bool = False,
    ) -> None:
        if request is None or decision is None:
            return
        try:
            item = self.settlement(request, decision, hangup, may_hold_funds=may_hold_funds)
        except Exception:
            log.exception("uuid=%s could not be billed (left unbilled)", show(request.uuid, 64))
            return
        if item is not None:
            self.settler.put(item)

    def settlement(
        self,
        request: CallRequest,
        decision: Decision | BillingTicket,
        hangup: Mapping[str, str] | None,
        *,
        may_hold_funds: bool = False,
    ) -> Settlement | None:
        """``decision``: the call's decision, or what the call session keeps of a priced accept
        once its answer is written: its ticket (engine.call.session)."""
        if isinstance(decision, Reject):
            return self._rejected(request, decision, may_hold_funds=may_hold_funds)
        if hangup is None:
            return None  # an accepted call is billed on its hangup only
        catalog = self._catalog()
        if isinstance(decision, BillingTicket):  # what the call session keeps of a priced accept
            item, rated, end = held_settlement(hangup, decision, catalog)
        else:
            if isinstance(decision, PricedAccept) and decision.pricing is not None:
                pricing, decided_at = decision.pricing, decision.decided_at
            else:  # decided without accounting (no limiter): priced now
                pricing, decided_at = pricing_for(decision), None
            item, rated, end = call_settlement(hangup, decision, pricing, catalog, decided_at=decided_at)
        why = absurd(rated)
        if why is not None:
            # A billsec no call reaches (FreeSWITCH's word, forged or broken): Redis would refuse
            # the settle, or the CDR writer its CDR, each retrying (with the calls batched with
            # it) forever. Not settled: the reservation expires like a hangup never seen; the CDR
            # is logged.
            log.error(
                "uuid=%s not billed: %s (billsec %d); cdr=%s",
                show(request.uuid, 64),
                why,
                rated.billsec,
                json.dumps(dict(item.cdr), default=str),
            )
            return None
        notes = (*end.anomalies, *rated.notes)
        if notes:
            log.warning("uuid=%s billed with notes: %s", show(request.uuid, 64), show("; ".join(notes), 400))
        return item

    def _rejected(self, request: CallRequest, reject: Reject, *, may_hold_funds: bool) -> Settlement:
        code, _text = self._sip_response(reject.reason)
        chain: tuple[int, ...] = ()
        number = ""
        catalog = self._catalog() if reject.account_id is not None else None
        if catalog is not None and reject.account_id is not None:
            account = catalog.accounts.get(reject.account_id)
            if account is not None:
                number = account.number
                chain = _chain(catalog, reject.account_id)
        item = reject_settlement(
            request.uuid,
            self._wallclock(),
            reason=reject.reason.value,
            sip_code=code,
            account_id=reject.account_id,
            account_number=number,
            caller_id_number=request.caller_id_number,
            caller_id_name=request.caller_id_name,
            dialled=request.destination,
            chain=chain,
        )
        if may_hold_funds and catalog is not None:
            # A late decision may have reserved funds: a zero debit per chain level releases them.
            recorded = {a: catalog.accounts[a].calls_debited for a in chain if a in catalog.accounts}
            item = dataclasses.replace(
                item, debits=tuple((a, recorded[a], recorded[a] * 0) for a in chain if a in recorded)
            )
        return item


def affordable_seconds(available: int, level: Sequence[int], cap: int) -> int:
    """The Lua ``funds_affordable`` (engine.state.funds) in Python, for ``callgate explain``:
    the longest duration one level can pay in full with ``available`` micro-units, given its
    8 reservation arguments (``FundsLevel.args()``), or -1 when it cannot pay its connect cost
    plus one minute."""
    connect, cpm, included, initial, increment = level[3], level[4], level[5], level[6], level[7]
    if cpm <= 0:
        return -1 if available < connect else cap
    if available < connect + cpm:
        return -1
    most = (available - connect) * 60 // cpm
    seconds = included
    if most >= initial:
        seconds = included + initial + (most - initial) // increment * increment
    if seconds < 1:
        return -1
    return min(seconds, cap)
