"""A call's prices, frozen at decision time from the Accept and the snapshot it was decided on (pure).

The Accept's :class:`~engine.decision.RatedLevel` carries the price of each chain level but
not the rate's included seconds, and its :class:`~engine.decision.Route` carries only the
termination per-minute cost: the rest is read from the same catalog the decision used, so
the hangup rates the call at exactly the prices that granted it.
"""

from __future__ import annotations

from engine.billing.rating import CallPricing, LevelPrice, RoutePrice, Tariff
from engine.decision import Accept, RatedLevel, Route
from engine.rules.catalog import Catalog


def _included_seconds(level: RatedLevel, catalog: Catalog) -> int:
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


def level_price(level: RatedLevel, catalog: Catalog) -> LevelPrice:
    tariff = Tariff(
        cost_per_minute=level.cost_per_minute,
        connect_cost=level.connect_cost,
        included_seconds=_included_seconds(level, catalog),
        init_inc=level.init_inc,
        inc=level.inc,
    )
    return LevelPrice(level.account_id, level.account_number, level.rate_id, level.prefix, tariff)


def route_price(route: Route, catalog: Catalog) -> RoutePrice:
    rate = catalog.termination_rates.get(route.trunk_id, {}).get(route.termination_prefix)
    if rate is None:  # the route was decided on this catalog, so only a bug lands here
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


def pricing_for(accept: Accept, catalog: Catalog) -> CallPricing:
    return CallPricing(
        levels=tuple(level_price(level, catalog) for level in accept.levels),
        routes=tuple(route_price(route, catalog) for route in accept.routes),
        max_duration=accept.max_duration,
    )
