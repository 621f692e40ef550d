"""A call's prices built from what the rules carry equal the prices read again from the catalogue.

Before round 5 of issue 18, engine.billing.pricing looked up each route's termination rate
and each level's origination rate again in the (packed) catalogue the decision was made on;
now the rules carry every term (Route and RatedLevel) and the prices are built from the
Accept alone. The old functions are kept below, verbatim, as the reference. Thousands of
random calls of the load-test mix, on a generated catalogue whose rates have random connect
costs, included seconds and increments (packed tables, several chain levels, failover
gateways), must price exactly alike: equal, and equal in every Decimal's digits (compared
by repr, so 0.10 and 0.1 differ).
"""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from engine.billing.live import priced
from engine.billing.pricing import pricing_for, route_price
from engine.billing.rating import CallPricing, LevelPrice, RoutePrice, Tariff
from engine.decision import Accept, RatedLevel, Route
from engine.model import CallRequest, CatalogData
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.decide import DecisionContext, decide
from engine.rules.packed import PackedTable
from loadtest.dataset import CallMix, Scale, generate

SCALE = Scale(accounts=1_500, rates=8_000, groups=8, trunks=10, termination_rates=3_000, seed=9)
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CALLS = 3_000


# --------------------------------------------------------------------------- the reference
# engine/billing/pricing.py before round 5 (main 046e51c), unchanged but for the names.


def old_included_seconds(level: RatedLevel, catalog: Catalog) -> int:
    account = catalog.accounts.get(level.account_id)
    tables = [catalog.personal_rates.get(level.account_id, {})]
    if account is not None:
        for group_id in (account.rate_group_id, account.non_cli_rate_group_id):
            if group_id is not None:
                tables.append(catalog.group_rates.get(group_id, {}))
    for table in tables:
        rate = table.get(level.prefix)
        if rate is not None and rate.id == level.rate_id:
            return rate.included_seconds
    return 0


def old_level_price(level: RatedLevel, catalog: Catalog) -> LevelPrice:
    tariff = Tariff(
        cost_per_minute=level.cost_per_minute,
        connect_cost=level.connect_cost,
        included_seconds=old_included_seconds(level, catalog),
        init_inc=level.init_inc,
        inc=level.inc,
    )
    return LevelPrice(level.account_id, level.account_number, level.rate_id, level.prefix, tariff)


def old_route_price(route: Route, catalog: Catalog) -> RoutePrice:
    rate = catalog.termination_rates.get(route.trunk_id, {}).get(route.termination_prefix)
    if rate is None:
        tariff = Tariff(cost_per_minute=route.cost_per_minute)
    else:
        tariff = Tariff(
            cost_per_minute=route.cost_per_minute,
            connect_cost=rate.connect_cost,
            included_seconds=rate.included_seconds,
            init_inc=rate.init_inc,
            inc=rate.inc,
        )
    names = catalog.trunk_gateways.get(route.trunk_id, ())
    gateways = tuple(names[i] if i < len(names) else "" for i in range(len(route.targets)))
    return RoutePrice(
        trunk_id=route.trunk_id,
        trunk_name=route.trunk_name,
        provider_id=route.provider_id,
        termination_prefix=route.termination_prefix,
        tariff=tariff,
        gateways=gateways,
    )


def old_pricing_for(accept: Accept, catalog: Catalog) -> CallPricing:
    return CallPricing(
        levels=tuple(old_level_price(level, catalog) for level in accept.levels),
        routes=tuple(old_route_price(route, catalog) for route in accept.routes),
        max_duration=accept.max_duration,
    )


# --------------------------------------------------------------------------- the catalogue


def _money(rng: random.Random) -> Decimal:
    some = Decimal(rng.randrange(0, 10**6)) / 10**7
    return rng.choice([Decimal(0), Decimal("0.0100"), Decimal("0.002"), some])


def varied(data: CatalogData, seed: int) -> CatalogData:
    """``data`` with random connect costs, included seconds and increments on its rates
    (the generator leaves them at their defaults)."""
    rng = random.Random(seed)

    def vary(rate: object) -> object:
        return dataclasses.replace(
            rate,  # type: ignore[type-var]
            connect_cost=_money(rng),
            included_seconds=rng.choice([0, 0, 5, 30, 60]),
            init_inc=rng.choice([0, 1, 30, 60]),
            inc=rng.choice([0, 1, 6, 60]),
        )

    return dataclasses.replace(
        data,
        origination_rates=[vary(r) for r in data.origination_rates],  # type: ignore[misc]
        termination_rates=[vary(r) for r in data.termination_rates],  # type: ignore[misc]
    )


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    built = Catalog.build(varied(generate(SCALE), seed=3))
    assert any(type(t) is PackedTable for t in built.termination_rates.values())  # the decode path
    assert any(type(t) is PackedTable for t in built.group_rates.values())
    return built


def accepts(catalog: Catalog, seed: int) -> list[Accept]:
    ctx = DecisionContext(now=NOW, rng=random.Random(seed), config=RulesConfig())
    rng = random.Random(seed)
    found = []
    for n, plan in enumerate(CallMix(SCALE, seed=seed).take(CALLS)):
        request = CallRequest(
            uuid=f"call-{n}",
            destination=plan.destination,
            sip_auth_username=plan.sip_auth_username,
            network_ip=plan.network_ip,
            caller_id_number=plan.caller_id_number or str(rng.randrange(10**10, 10**11)),
        )
        decision = decide(request, catalog, ctx)
        if isinstance(decision, Accept):
            found.append(decision)
    return found


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("seed", [1, 2])
def test_prices_from_the_rules_equal_the_catalogue_lookups(catalog: Catalog, seed: int) -> None:
    found = accepts(catalog, seed)
    routed = [a for a in found if a.routes]
    assert len(routed) > CALLS // 3, len(routed)
    for accept in found:
        new, old = pricing_for(accept), old_pricing_for(accept, catalog)
        assert new == old, accept
        assert repr(new) == repr(old)  # every Decimal with the same digits
    # the random terms reached the prices: the comparison can fail on each of them
    levels = [lv.tariff for a in found for lv in pricing_for(a).levels]
    routes = [r.tariff for a in routed for r in pricing_for(a).routes]
    for tariffs in (levels, routes):
        assert any(t.included_seconds for t in tariffs)
        assert any(t.connect_cost for t in tariffs)
        assert any(t.init_inc not in (0, 1) for t in tariffs) and any(t.inc not in (0, 1) for t in tariffs)
    assert any(len(r.gateways) > 1 for a in routed for r in pricing_for(a).routes)
    assert any(len(a.levels) > 1 for a in routed)


def test_prices_of_the_routes_left_by_the_limits(catalog: Catalog) -> None:
    """``priced`` prices again the routes left when the limits drop full trunks."""
    rng = random.Random(5)
    checked = 0
    for accept in accepts(catalog, 3):
        if len(accept.routes) < 2:
            continue
        kept = tuple(r for r in accept.routes if rng.random() < 0.5) or accept.routes[-1:]
        after = dataclasses.replace(accept, routes=kept)
        result = priced(after, pricing_for(accept), 120, NOW)
        assert result.pricing is not None
        assert result.pricing.routes == tuple(old_route_price(r, catalog) for r in kept)
        assert repr(result.pricing.routes) == repr(tuple(route_price(r) for r in kept))
        assert result.pricing.levels == old_pricing_for(accept, catalog).levels
        checked += 1
    assert checked > 100
