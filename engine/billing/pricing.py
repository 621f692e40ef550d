"""A call's prices, frozen at decision time from the Accept (pure).

The rules carry every term of the prices they decided on: a
:class:`~engine.decision.RatedLevel` holds its origination rate's price, increments and
included seconds, a :class:`~engine.decision.Route` its termination rate's, and its legs
the trunk's gateway names. So the prices are built from the Accept alone, without reading
the catalogue again (round 5 of issue 18: the catalogue lookups cost a decode of each
route's termination rate, five per call), and the hangup rates the call at exactly the
prices that granted it.
"""

from __future__ import annotations

from engine.billing.rating import CallPricing, LevelPrice, RoutePrice, Tariff
from engine.decision import Accept, RatedLevel, Route


def level_price(level: RatedLevel) -> LevelPrice:
    tariff = Tariff(
        level.cost_per_minute, level.connect_cost, level.included_seconds, level.init_inc, level.inc
    )
    return LevelPrice(level.account_id, level.account_number, level.rate_id, level.prefix, tariff)


def route_price(route: Route) -> RoutePrice:
    tariff = Tariff(
        route.cost_per_minute, route.connect_cost, route.included_seconds, route.init_inc, route.inc
    )
    return RoutePrice(
        route.trunk_id,
        route.trunk_name,
        route.provider_id,
        route.termination_prefix,
        tariff,
        tuple([leg.gateway for leg in route.targets]),  # one per dial target, in dial order
    )


def pricing_for(accept: Accept) -> CallPricing:
    return CallPricing(
        tuple([level_price(level) for level in accept.levels]),
        tuple([route_price(route) for route in accept.routes]),
        accept.max_duration,
    )
