"""Origination rating and the maximum call duration (decision-rules §5).

Money is exact: every operation runs in a private decimal context wide enough
that nothing realistic is ever rounded, and the duration is an exact integer
division, so the result never depends on the thread's decimal context.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import Decimal

from engine.decision import RatedLevel, Reason
from engine.model import Account, Did, OriginationRate, RateGroup
from engine.rules.catalog import Catalog, longest_prefix
from engine.rules.config import RulesConfig
from engine.rules.gate import level_name
from engine.rules.refusal import Refusal
from engine.rules.text import plain_decimal

_MONEY = decimal.Context(prec=60, traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow])
_ZERO = Decimal(0)
_HUNDRED = Decimal(100)
_SIXTY = Decimal(60)
_NO_RATES: dict[str, OriginationRate] = {}


@dataclass(frozen=True, slots=True)
class Rating:
    """One chain level rated: the contract's RatedLevel plus what routing and explain need."""

    level: RatedLevel
    rate: OriginationRate
    group: RateGroup

    @property
    def personal(self) -> bool:
        return self.rate.account_id is not None

    def describe(self) -> str:
        level = self.level
        owner = f"personal rate of {level.account_number}, " if self.personal else ""
        markup = ""
        if self.group.markup_percent:
            percent = plain_decimal(self.group.markup_percent)
            markup = f", markup {percent}%: {plain_decimal(level.cost_per_minute)}/min"
        connect = f" + {plain_decimal(level.connect_cost)} connect" if level.connect_cost else ""
        return (
            f"rate {level.prefix or '(any)'} at {plain_decimal(self.rate.cost_per_minute)}/min{connect} "
            f"({owner}group {self.group.name}{markup}), affords {level.max_duration}s"
        )


def find_rate(
    catalog: Catalog, account_id: int, rate_group_id: int, destination: str
) -> OriginationRate | None:
    """Longest prefix over the group's and the account's active rates; at equal length
    the personal rate wins (ties within one table were settled at build: dearer first)."""
    longest = catalog.longest_origination_prefix
    group = longest_prefix(catalog.group_rates.get(rate_group_id, _NO_RATES), destination, longest)
    personal_table = catalog.personal_rates.get(account_id)
    if personal_table is None:
        return group
    personal = longest_prefix(personal_table, destination, longest)
    if personal is None or (group is not None and len(group.prefix.strip()) > len(personal.prefix.strip())):
        return group
    return personal


def with_markup(cost_per_minute: Decimal, markup_percent: Decimal) -> Decimal:
    if not markup_percent:
        return cost_per_minute
    return _MONEY.add(
        cost_per_minute, _MONEY.divide(_MONEY.multiply(cost_per_minute, markup_percent), _HUNDRED)
    )


def affordable_seconds(
    available: Decimal, connect_cost: Decimal, cost_per_minute: Decimal, config: RulesConfig
) -> int:
    """floor((available - connect) / cost_per_minute * 60) capped by call_max_length;
    a free rate (cost <= 0) gets max_free_length, capped the same way. The caller has
    already checked that ``available >= connect_cost + cost_per_minute``."""
    cap = config.call_max_length
    if cost_per_minute <= _ZERO:
        return min(config.max_free_length, cap)
    spendable = _MONEY.multiply(_MONEY.subtract(available, connect_cost), _SIXTY)
    if spendable >= _MONEY.multiply(cost_per_minute, Decimal(cap)):
        return cap
    return int(_MONEY.divide_int(spendable, cost_per_minute))


def _increment(*candidates: int) -> int:
    for value in candidates:
        if value > 0:
            return value
    return 1


def rate_level(
    account: Account,
    destination: str,
    catalog: Catalog,
    config: RulesConfig,
    rate_group_id: int | None = None,
    position: int = 0,
) -> Rating | Refusal:
    """Rate ``destination`` for one level (``position`` in the chain, 0 = the caller):
    ``rate_group_id`` overrides the account's own group (the NON-CLI group of §4.4)."""
    group_id = account.rate_group_id if rate_group_id is None else rate_group_id
    if group_id is None:
        who = level_name(account, position)
        return Refusal(Reason.ORIGINATION_RATE_NOT_FOUND, f"{who} has no rate group")
    group = catalog.rate_groups.get(group_id)
    if group is None or not group.active:
        who = level_name(account, position)
        state = "missing" if group is None else f"{group.name} inactive"
        return Refusal(Reason.ORIGINATION_RATE_NOT_FOUND, f"{who}: rate group {group_id} {state}")
    rate = find_rate(catalog, account.id, group_id, destination)
    if rate is None:
        who = level_name(account, position)
        return Refusal(
            Reason.ORIGINATION_RATE_NOT_FOUND,
            f"{who}: no active rate for {destination} in group {group.name}",
        )
    cost = with_markup(rate.cost_per_minute, group.markup_percent)
    connect = rate.connect_cost
    available = account.available_credit
    needed = _MONEY.add(connect, cost)
    if available < needed:
        who = level_name(account, position)
        return Refusal(
            Reason.NO_SUFFICIENT_FUND,
            f"{who} has {plain_decimal(available)} available, needs {plain_decimal(needed)} "
            f"(connect {plain_decimal(connect)} + 1 min at {plain_decimal(cost)})",
        )
    level = RatedLevel(
        account_id=account.id,
        account_number=account.number,
        rate_id=rate.id,
        prefix=rate.prefix,
        cost_per_minute=cost,
        connect_cost=connect,
        init_inc=_increment(rate.init_inc, group.init_inc),
        inc=_increment(rate.inc, group.inc),
        max_duration=affordable_seconds(available, connect, cost, config),
        included_seconds=rate.included_seconds,
    )
    return Rating(level, rate, group)


LOCAL_RATE_ID = 0
"""``RatedLevel.rate_id`` of an on-net call charged at the account's local-call price."""


def rate_local(
    account: Account, catalog: Catalog, config: RulesConfig
) -> tuple[RatedLevel | None, int] | Refusal:
    """An on-net call (§1.2) at the caller's ``local_call_cost_per_minute``: (its level, the
    seconds it may last). A free local call has no level and gets ``max_free_length``,
    whatever the balance (ASTPP lets free on-net calls through). Only the caller pays:
    an on-net call buys nothing from the resellers above it."""
    cost = account.local_call_cost_per_minute
    if cost <= _ZERO:
        return None, min(config.max_free_length, config.call_max_length)
    available = account.available_credit
    if available < cost:
        return Refusal(
            Reason.NO_SUFFICIENT_FUND,
            f"account {account.number} has {plain_decimal(available)} available, needs "
            f"{plain_decimal(cost)} (1 min of local call at {plain_decimal(cost)})",
        )
    group = catalog.rate_groups.get(account.rate_group_id) if account.rate_group_id is not None else None
    seconds = affordable_seconds(available, _ZERO, cost, config)
    level = RatedLevel(
        account_id=account.id,
        account_number=account.number,
        rate_id=LOCAL_RATE_ID,
        prefix="",
        cost_per_minute=cost,
        connect_cost=_ZERO,
        init_inc=_increment(group.init_inc if group else 0),
        inc=_increment(group.inc if group else 0),
        max_duration=seconds,
    )
    return level, seconds


def did_charged(did: Did) -> bool:
    return did.cost_per_minute > _ZERO or did.connect_cost > _ZERO


def did_allowance(
    owner: Account, did: Did, config: RulesConfig, forward: RatedLevel | None = None
) -> int | Refusal:
    """Seconds the DID's owner can afford for an inbound call (§1.1) when the DID itself has
    a price: its connect cost and per-minute cost, plus, for a DID forwarded to a number,
    the owner's outbound rate (``forward``). The owner needs both connects and one minute
    of both; a DID without a price leaves the decision to the other rules."""
    connect = did.connect_cost
    cost = did.cost_per_minute
    if forward is not None:
        connect = _MONEY.add(connect, forward.connect_cost)
        cost = _MONEY.add(cost, forward.cost_per_minute)
    available = owner.available_credit
    needed = _MONEY.add(connect, cost)
    if available < needed:
        outbound = " with the forwarded call's rate" if forward is not None else ""
        return Refusal(
            Reason.NO_SUFFICIENT_FUND,
            f"DID {did.number} owner {owner.number} has {plain_decimal(available)} available, needs "
            f"{plain_decimal(needed)} (connect {plain_decimal(connect)} + 1 min at {plain_decimal(cost)}"
            f"{outbound})",
        )
    return affordable_seconds(available, connect, cost, config)
