"""The engine's accounting glue (engine.billing.live): the decider's reservation with the limits
(real Redis), the granted duration, and the settlement of each kind of call end."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from decimal import Decimal
from typing import ClassVar

import redis

from engine.billing.funds import Funds
from engine.billing.live import BILLSEC_ROUNDING, LiveBilling, PricedAccept, granted_duration, priced
from engine.billing.pricing import pricing_for
from engine.decider import Decider
from engine.decision import DEFAULT_SIP_RESPONSES, Accept, Reason, Reject
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.state.limits import Limiter
from tests.billing.captures import hangup_complete
from tests.rules.builders import NOW, World, run
from tests.rules.builders import call as rules_call

D = Decimal


def call(uuid: str) -> CallRequest:
    return dataclasses.replace(rules_call(), uuid=uuid)


class _Source:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    @property
    def loaded(self) -> bool:
        return True

    @property
    def current(self) -> tuple[int, Catalog]:
        return 1, self.catalog

    def confirmed_age(self) -> float:
        return 0.0

    switching_since = None


def test_the_rendered_duration_leaves_room_for_freeswitchs_rounding_second() -> None:
    assert BILLSEC_ROUNDING == 1
    assert granted_duration(None, 600) == 600  # no reservation: the rules' duration
    assert granted_duration(601, 600) == 600  # funds for more than the rules allow
    assert granted_duration(90, 600) == 89  # billed at most 90 s: what the reservation covers
    assert granted_duration(1, 600) == 1  # never sched_hangup +0


def test_a_priced_accept_is_an_accept_with_its_frozen_prices() -> None:
    world = World()
    catalog = world.catalog()
    accept = run(catalog)
    assert isinstance(accept, Accept)
    pricing = pricing_for(accept)
    decided = priced(accept, pricing, 91, NOW)
    assert isinstance(decided, PricedAccept) and isinstance(decided, Accept)
    assert decided.max_duration == 90 and decided.pricing is not None
    assert decided.pricing.max_duration == 91 and decided.decided_at == NOW
    assert decided.routes == accept.routes and decided.levels == accept.levels


def decider(client: redis.Redis, prefix: str, catalog: Catalog) -> tuple[Decider, Funds]:
    funds = Funds(client, prefix)
    limiter = Limiter(client, prefix)
    return Decider(_Source(catalog), RulesConfig(), max_age=60, limiter=limiter, funds=funds), funds


def test_concurrent_calls_share_the_funds_and_a_settled_call_gives_back_the_rest(
    client: redis.Redis, key_prefix: str
) -> None:
    world = World()
    world.b.update(world.customer, balance=D("0.15"))  # 90 s at 0.10/min, billed per second
    catalog = world.catalog()
    decide, funds = decider(client, key_prefix, catalog)

    first = decide(call(uuid="c-1"))
    assert isinstance(first, PricedAccept), first
    assert first.max_duration == 89  # 90 s reserved, rendered one second shorter
    assert funds.account(world.customer.id).reserved == D("0.15")
    second = decide(call(uuid="c-2"))  # nothing left: a minute cannot be paid
    assert isinstance(second, Reject) and second.reason is Reason.NO_SUFFICIENT_FUND

    billing = LiveBilling(None, lambda: catalog, DEFAULT_SIP_RESPONSES.__getitem__)  # type: ignore[arg-type]
    hangup = dict(hangup_complete("answered_gateway_failover_wire.txt"))  # 3 billed seconds
    hangup["Unique-ID"] = "c-1"
    hangup["variable_uuid"] = "c-1"
    item = billing.settlement(CallRequest(uuid="c-1", destination="442071234567"), first, hangup)
    assert item is not None
    assert [(a, debit) for a, _recorded, debit in item.debits] == [(world.customer.id, D("0.005"))]
    assert funds.settle(item) and not funds.settle(item)  # a duplicated hangup settles once
    assert funds.account(world.customer.id).reserved == 0
    third = decide(call(uuid="c-3"))  # 0.145 left: 87 s
    assert isinstance(third, PricedAccept) and third.max_duration == 86


def test_a_rejected_attempt_is_recorded_and_a_late_one_releases_its_reservation(
    client: redis.Redis, key_prefix: str
) -> None:
    world = World()
    reseller = world.b.reseller("2001", balance="50", rate_group=world.retail)
    world.b.update(world.customer, reseller_id=reseller.id)
    catalog = world.catalog()
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    billing = LiveBilling(None, lambda: catalog, DEFAULT_SIP_RESPONSES.__getitem__, wallclock=lambda: at)  # type: ignore[arg-type]
    request = CallRequest(uuid="r-1", destination="442071234567", caller_id_number="1001")
    reject = Reject(Reason.NO_SUFFICIENT_FUND, world.customer.id, "no money")
    item = billing.settlement(request, reject, None)
    assert item is not None and item.debits == ()
    assert item.cdr["reject_reason"] == "NO_SUFFICIENT_FUND" and item.cdr["sip_code"] == 402
    assert item.cdr["chain"] == [world.customer.id, reseller.id]  # the reseller sees its customer's rejects
    assert item.cdr["dialled"] == "442071234567" and item.cdr["account_number"] == "1001"

    # A decision that timed out may have reserved funds: the record releases them (zero debits).
    funds = Funds(client, key_prefix)
    accept = run(catalog)
    assert isinstance(accept, Accept)
    from engine.billing.calls import funds_levels

    assert funds.reserve("r-1", funds_levels(pricing_for(accept), catalog), 60).granted
    assert funds.account(world.customer.id).reserved > 0
    late = billing.settlement(request, reject, None, may_hold_funds=True)
    assert late is not None and {a for a, _r, d in late.debits if d == 0} == {world.customer.id, reseller.id}
    assert funds.settle(late)
    assert funds.account(world.customer.id).reserved == 0 == funds.account(reseller.id).reserved


def test_an_accepted_call_without_its_hangup_is_not_billed() -> None:
    world = World()
    catalog = world.catalog()
    billing = LiveBilling(None, lambda: catalog, DEFAULT_SIP_RESPONSES.__getitem__)  # type: ignore[arg-type]
    accept = run(catalog)
    assert billing.settlement(CallRequest(uuid="x", destination="44"), accept, None) is None


def test_the_picked_hangup_headers_bill_exactly_as_a_full_decode() -> None:
    """The engine hands billing only HANGUP_HEADERS, picked out of the event (engine.call.driver)."""
    from engine.billing.hangup import HANGUP_HEADERS, parse_hangup
    from engine.esl.protocol import HeaderPicker, PyHeaderPicker
    from tests.billing.captures import CAPTURES, frames

    checked = 0
    for capture in sorted(CAPTURES.glob("*_wire.txt")):
        for frame in frames(capture.name):
            if frame.event_name == "CHANNEL_HANGUP_COMPLETE":
                for picker in {HeaderPicker, PyHeaderPicker}:
                    picked = picker(HANGUP_HEADERS).pick(frame.body)
                    assert parse_hangup(picked) == parse_hangup(frame.event())
                checked += 1
    assert checked >= 3


def test_parse_hangup_reads_no_header_outside_hangup_headers() -> None:
    """A name parse_hangup reads but HANGUP_HEADERS lacks would silently read as absent."""
    from engine.billing.hangup import HANGUP_HEADERS, parse_hangup
    from tests.billing.captures import CAPTURES, frames

    class Recording(dict[str, str]):
        read: ClassVar[set[str]] = set()

        def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
            Recording.read.add(name)
            return super().get(name, default)

        def __getitem__(self, name: str) -> str:
            Recording.read.add(name)
            return super().__getitem__(name)

        def __contains__(self, name: object) -> bool:
            Recording.read.add(str(name))
            return super().__contains__(name)

    parse_hangup(Recording())  # nothing present: every fallback name is read
    for capture in sorted(CAPTURES.glob("*_wire.txt")):
        for frame in frames(capture.name):
            if frame.event_name == "CHANNEL_HANGUP_COMPLETE":
                parse_hangup(Recording(frame.event()))
    assert Recording.read and Recording.read <= set(HANGUP_HEADERS), Recording.read - set(HANGUP_HEADERS)
