"""Rating at hangup (decision-rules §10): pure, Decimal, no I/O.

What a call costs at one tariff is ASTPP's ``calc_cost``: the connect cost, then the
tariff's included seconds are free, then the initial increment is charged whole, then
the rest is rounded up to whole increments. A call under one billed second is free
(connect cost included).

Rounding rule (written once, tested in tests/billing/test_rating.py): every amount is
computed exactly, then rounded ONCE per call and per payer, half-up, to
:data:`MONEY_PLACES` (6 decimal places, the ``numeric(20,6)`` of every money column).
Never per increment, never per minute.

Who pays what: each level of the reseller chain (the caller first) pays at the rate it
buys at (:class:`engine.decision.RatedLevel`), and the carrier cost is the termination
rate of the trunk whose gateway actually carried the call (the answered leg, see
:func:`engine.billing.hangup.parse_hangup`).
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

MONEY_PLACES = Decimal("0.000001")
"""The money precision: numeric(20,6) in PostgreSQL, micro-units in Redis."""

MICROS = 1_000_000
_EXACT = decimal.Context(prec=60, rounding=ROUND_HALF_UP, traps=[decimal.InvalidOperation, decimal.Overflow])
_ZERO = Decimal(0)
_SIXTY = Decimal(60)


_MICROS_DECIMAL = Decimal(MICROS)
_ZERO_MONEY = _ZERO.quantize(MONEY_PLACES)  # Decimal("0.000000"): what a free call costs


def round_money(amount: Decimal) -> Decimal:
    """The one rounding step: half-up to 6 decimal places (0.0000005 -> 0.000001)."""
    return amount.quantize(MONEY_PLACES, ROUND_HALF_UP, _EXACT)


def to_micros(amount: Decimal) -> int:
    """A rounded amount as integer micro-units (what Redis holds)."""
    return int(_EXACT.multiply(amount.quantize(MONEY_PLACES, ROUND_HALF_UP, _EXACT), _MICROS_DECIMAL))


def from_micros(micros: int) -> Decimal:
    return _EXACT.divide(Decimal(micros), Decimal(MICROS)).quantize(MONEY_PLACES)


@dataclass(frozen=True, slots=True)
class Tariff:
    """One price: what a level of the chain pays, or what a carrier charges on a trunk."""

    cost_per_minute: Decimal
    connect_cost: Decimal = _ZERO
    included_seconds: int = 0
    init_inc: int = 1  # 0 is read as 1 (decision-rules §5 fallbacks are applied before)
    inc: int = 1

    @property
    def initial(self) -> int:
        return self.init_inc if self.init_inc > 0 else 1

    @property
    def increment(self) -> int:
        return self.inc if self.inc > 0 else 1

    @property
    def free(self) -> bool:
        return self.cost_per_minute <= _ZERO and self.connect_cost <= _ZERO


def charged_seconds(tariff: Tariff, billsec: int) -> int:
    """The seconds paid for at the per-minute price: 0 within the included seconds, then
    the initial increment whole, then whole increments (ceil)."""
    rest = billsec - max(0, tariff.included_seconds)
    if billsec < 1 or rest <= 0:
        return 0
    seconds = tariff.initial
    rest -= tariff.initial
    if rest > 0:
        steps = -(-rest // tariff.increment)  # ceil for positive integers
        seconds += steps * tariff.increment
    return seconds


def call_cost(tariff: Tariff, billsec: int) -> Decimal:
    """ASTPP's calc_cost, exact, rounded once (see the module docstring)."""
    if billsec < 1:
        return _ZERO_MONEY
    exact = _EXACT.add(
        tariff.connect_cost,
        _EXACT.divide(
            _EXACT.multiply(tariff.cost_per_minute, Decimal(charged_seconds(tariff, billsec))), _SIXTY
        ),
    )
    return exact.quantize(MONEY_PLACES, ROUND_HALF_UP, _EXACT)


# --------------------------------------------------------------------------- a call's prices


@dataclass(frozen=True, slots=True)
class LevelPrice:
    """What one chain member pays (position 0 = the caller's account)."""

    account_id: int
    account_number: str
    rate_id: int
    prefix: str
    tariff: Tariff


@dataclass(frozen=True, slots=True)
class RoutePrice:
    """One route of the call: its trunk, carrier, termination tariff and dial targets."""

    trunk_id: int
    trunk_name: str
    provider_id: int
    termination_prefix: str
    tariff: Tariff
    gateways: tuple[str, ...]  # one per dial target of this route, in dial order


@dataclass(frozen=True, slots=True)
class CallPricing:
    """Everything a call's rating needs, frozen at decision time (a rate edited while the
    call is up does not change its price)."""

    levels: tuple[LevelPrice, ...]
    routes: tuple[RoutePrice, ...]
    max_duration: int

    def target(self, position: int) -> tuple[RoutePrice, str] | None:
        """(route, gateway) of the ``position``-th dial target (0-based), or None."""
        if position < 0:
            return None
        for route in self.routes:
            if position < len(route.gateways):
                return route, route.gateways[position]
            position -= len(route.gateways)
        return None


@dataclass(frozen=True, slots=True)
class Debit:
    account_id: int
    level: int  # 0 = the caller, 1 = its reseller, ...
    amount: Decimal


@dataclass(frozen=True, slots=True)
class RatedCall:
    billsec: int
    debits: tuple[Debit, ...]  # one per chain level, the caller first
    carrier_cost: Decimal
    route: RoutePrice | None
    gateway: str
    notes: tuple[str, ...] = ()  # what had to be assumed (logged, kept on the CDR)

    @property
    def customer_debit(self) -> Decimal:
        return self.debits[0].amount if self.debits else _ZERO_MONEY

    @property
    def margin(self) -> Decimal:
        """What the top of the chain keeps: its debit minus the carrier cost."""
        top = self.debits[-1].amount if self.debits else _ZERO
        return round_money(_EXACT.subtract(top, self.carrier_cost))


def rate_call(pricing: CallPricing, billsec: int, carried_leg: int | None) -> RatedCall:
    """Rate an ended call: every level's debit and the carrier cost of the leg that carried it.

    ``carried_leg`` is the position of the answered leg in the dial string. Unknown on an
    answered call, the first route is assumed (noted on the CDR): the customer's debit does
    not depend on it, only the carrier cost and the margin do.
    """
    billsec = max(0, billsec)
    debits = tuple(
        [
            Debit(level.account_id, index, call_cost(level.tariff, billsec))
            for index, level in enumerate(pricing.levels)
        ]
    )
    found = pricing.target(carried_leg) if carried_leg is not None else None
    if found is None:
        if billsec > 0 and pricing.routes:
            first = pricing.routes[0]
            gateway = first.gateways[0] if first.gateways else ""
            note = f"carrying leg {carried_leg} not in the dial plan: first route assumed"
            return RatedCall(billsec, debits, call_cost(first.tariff, billsec), first, gateway, (note,))
        return RatedCall(billsec, debits, _ZERO_MONEY, None, "", ())
    route, gateway = found
    return RatedCall(billsec, debits, call_cost(route.tariff, billsec), route, gateway, ())
