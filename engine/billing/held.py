"""What an accepted call keeps while it is up: its billing ticket as plain values (pure).

Between the decision and CHANNEL_HANGUP_COMPLETE the call session used to keep the whole
decision (a :class:`~engine.billing.live.PricedAccept`): its routes with two gateway legs
each, their prices and tariffs, ~45 objects the cyclic collector tracks, walked by every
collection that sees the held call (docs/performance.md, "Round 4: latency with calls held").
Billing needs only the facts of the :class:`~engine.billing.ticket.BillingTicket`: who pays,
at what prices, and what the CDR names. :class:`HeldCall` keeps them as one object whose
prices are nested tuples of ints, strings and Decimals: CPython's collector stops tracking
such tuples once it has seen them, so a held call's record costs the collector one object.
At the hangup :meth:`HeldCall.ticket` gives back the ticket the decision would have given
(equal, field by field), and the call is rated through the one path every bill takes
(engine.billing.calls.ticket_settlement).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from engine.billing.rating import CallPricing, LevelPrice, RoutePrice, Tariff
from engine.billing.ticket import BillingTicket
from engine.decision import Accept

# (account id, account number, rate id, prefix, cost per minute, connect cost, included
# seconds, initial increment, increment)
LevelTerms = tuple[int, str, int, str, Decimal, Decimal, int, int, int]
# (trunk id, trunk name, provider id, termination prefix, cost per minute, connect cost,
# included seconds, initial increment, increment, gateway names)
RouteTerms = tuple[int, str, int, str, Decimal, Decimal, int, int, int, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class HeldCall:
    """An accepted call's billing ticket, compact (see the module doc)."""

    account_id: int
    account_number: str
    chain: tuple[int, ...]
    direction: str
    caller_id_name: str
    translated: str
    decided_at: datetime | None
    max_duration: int
    levels: tuple[LevelTerms, ...]
    routes: tuple[RouteTerms, ...]

    def ticket(self) -> BillingTicket:
        levels = tuple(
            [
                LevelPrice(account, number, rate, prefix, Tariff(cpm, connect, included, initial, inc))
                for account, number, rate, prefix, cpm, connect, included, initial, inc in self.levels
            ]
        )
        routes = tuple(
            [
                RoutePrice(trunk, name, provider, prefix, Tariff(cpm, connect, included, initial, inc), gates)
                for trunk, name, provider, prefix, cpm, connect, included, initial, inc, gates in self.routes
            ]
        )
        return BillingTicket(
            self.account_id,
            self.account_number,
            self.chain,
            self.direction,
            self.caller_id_name,
            self.translated,
            self.decided_at,
            CallPricing(levels, routes, self.max_duration),
        )


def held_call(accept: Accept) -> HeldCall | None:
    """The compact record of a priced decision (a PricedAccept); None for a call decided
    without accounting (no funds: the hangup prices it from the Accept itself)."""
    pricing = getattr(accept, "pricing", None)
    if not isinstance(pricing, CallPricing):
        return None
    decided_at = getattr(accept, "decided_at", None)
    levels: list[LevelTerms] = []
    for level in pricing.levels:
        t = level.tariff
        levels.append(
            (
                level.account_id,
                level.account_number,
                level.rate_id,
                level.prefix,
                t.cost_per_minute,
                t.connect_cost,
                t.included_seconds,
                t.init_inc,
                t.inc,
            )
        )
    routes: list[RouteTerms] = []
    for route in pricing.routes:
        t = route.tariff
        routes.append(
            (
                route.trunk_id,
                route.trunk_name,
                route.provider_id,
                route.termination_prefix,
                t.cost_per_minute,
                t.connect_cost,
                t.included_seconds,
                t.init_inc,
                t.inc,
                route.gateways,
            )
        )
    return HeldCall(
        accept.account_id,
        accept.account_number,
        tuple(accept.chain),
        str(accept.direction),
        accept.caller_id_name,
        accept.destination,
        decided_at if isinstance(decided_at, datetime) else None,
        pricing.max_duration,
        tuple(levels),
        tuple(routes),
    )
