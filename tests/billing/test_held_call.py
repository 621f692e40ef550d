"""What the call session keeps of a priced accept (its BillingTicket) bills it exactly as the
decision would have, and costs the cyclic collector far fewer objects than the whole decision.

Equal settlements (debits and CDR, by repr) for random priced accepts of a generated catalogue
(several chain levels, five routes with failover gateways, random tariffs) over four hangup
captures and random billsecs; then the collector's view of the record.
"""

from __future__ import annotations

import dataclasses
import gc
import random
from typing import Any

import pytest

from engine.billing.live import LiveBilling, PricedAccept, priced
from engine.billing.pricing import pricing_for
from engine.billing.ticket import BillingTicket, ticket_of
from engine.call.session import CallSession, Phase, SessionSettings
from engine.decision import DEFAULT_SIP_RESPONSES, Accept
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from loadtest.dataset import generate
from tests.billing.captures import hangup_complete
from tests.billing.test_pricing_from_rules import NOW, SCALE, accepts, varied

HANGUPS = (
    "answered_gateway_failover_wire.txt",
    "callee_hangs_up_wire.txt",
    "caller_cancels_wire.txt",
    "all_routes_fail_wire.txt",
)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.build(varied(generate(SCALE), seed=4))


@pytest.fixture(scope="module")
def decided(catalog: Catalog) -> list[PricedAccept]:
    rng = random.Random(8)
    found = []
    for accept in accepts(catalog, 6):
        granted = rng.choice([None, 1, 61, 600, 7200])
        decision = priced(accept, pricing_for(accept), granted, NOW)
        if rng.random() < 0.2:
            decision = dataclasses.replace(decision, decided_at=None)  # the CDR's fallback start
        found.append(decision)
    assert sum(1 for d in found if len(d.routes) > 1 and len(d.levels) > 1) > 100
    return found


def test_the_held_record_bills_as_the_decision(catalog: Catalog, decided: list[PricedAccept]) -> None:
    billing = LiveBilling(None, lambda: catalog, DEFAULT_SIP_RESPONSES.__getitem__)  # type: ignore[arg-type]
    rng = random.Random(9)
    billed = 0
    for n, decision in enumerate(decided[:600]):
        hangup = dict(hangup_complete(rng.choice(HANGUPS)))
        hangup["Unique-ID"] = hangup["variable_uuid"] = f"held-{n}"
        hangup["variable_billsec"] = str(rng.choice([0, 1, 59, 61, 3599]))
        request = CallRequest(uuid=f"held-{n}", destination=decision.destination)
        held = ticket_of(decision)
        assert held is not None
        expected = billing.settlement(request, decision, hangup)
        got = billing.settlement(request, held, hangup)
        assert got == expected
        assert repr(got) == repr(expected)
        billed += expected is not None and any(debit for _a, _r, debit in expected.debits)
    assert billed > 100  # calls with a debit: the comparison covers the amounts


def test_an_accept_without_prices_is_kept_whole(decided: list[PricedAccept]) -> None:
    from tests.call.test_session import channel_data

    plain = Accept(**{f.name: getattr(decided[0], f.name) for f in dataclasses.fields(Accept)})
    session = CallSession(SessionSettings(), DEFAULT_SIP_RESPONSES.__getitem__)
    session.start()
    session.frame(channel_data())
    session.decided(plain, holds_slots=True)
    assert session.decision is plain  # decided without accounting: billed from the Accept


def _tracked(root: object) -> int:
    """Objects the cyclic collector tracks, reachable from ``root`` (classes not followed)."""
    seen: set[int] = set()
    stack: list[Any] = [root]
    count = 0
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, type):
            continue
        seen.add(id(item))
        if gc.is_tracked(item):
            count += 1
            stack.extend(gc.get_referents(item))
    return count


def test_a_held_call_keeps_few_objects_for_the_collector(decided: list[PricedAccept]) -> None:
    """Measured: the PricedAccept of a call with five routes holds ~44 tracked objects (five
    routes of two GatewayLegs each, their prices and tariffs); its ticket ~17 (the prices)."""
    biggest = max(decided, key=lambda d: len(d.routes) * 10 + len(d.levels))
    held = ticket_of(biggest)
    gc.collect()
    assert _tracked(biggest) > 40  # what the session kept before
    assert _tracked(held) <= 20


def test_the_session_keeps_the_ticket_once_the_accept_is_written(decided: list[PricedAccept]) -> None:
    from tests.call.test_session import channel_data

    decision = decided[0]
    session = CallSession(SessionSettings(), DEFAULT_SIP_RESPONSES.__getitem__)
    session.start()
    session.frame(channel_data())
    actions = session.decided(decision, holds_slots=True)
    assert session.phase is Phase.COMMITTED and actions
    assert isinstance(session.decision, BillingTicket)
    assert session.decision == ticket_of(decision)
