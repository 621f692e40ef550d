"""Termination routing, least cost first (decision-rules §6).

Trunk channel/CPS limits are not applied here: the engine takes the limits after
the rules and skips a trunk that is over its own (the routes carry trunk ids).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from engine.decision import Route
from engine.model import RoutingType, TerminationRate, Trunk
from engine.rules.catalog import Catalog, longest_prefix
from engine.rules.config import RulesConfig
from engine.rules.rating import Rating
from engine.rules.text import plain_decimal

_NO_RATES: dict[str, TerminationRate] = {}


@dataclass(frozen=True, slots=True)
class CallerId:
    number: str
    name: str


def candidate_trunk_ids(rating: Rating) -> tuple[int, ...]:
    """The rate's forced trunks if it has any, else the rate group's trunk links (deduplicated)."""
    return tuple(dict.fromkeys(rating.rate.forced_trunk_ids or rating.group.trunk_ids))


def strip_prepend(number: str, strip: str, prepend: str) -> str:
    """The termination rate's rewrite, read as one `strip/prepend` translation pair:
    a leading ``strip`` is replaced by ``prepend``; with no strip, ``prepend`` is
    put in front; a number that does not start with ``strip`` is left alone."""
    if not strip:
        return prepend + number
    if number.startswith(strip):
        return prepend + number[len(strip) :]
    return number


@functools.lru_cache(maxsize=4096)  # a pure memo: a snapshot holds few distinct codec lists
def codec_option(codecs: str) -> str:
    """`,absolute_codec_string=^^:A:B` for a comma list, '' for none (FreeSWITCH's default).

    Inside `[...]` a comma separates variables, so the list uses FreeSWITCH's
    `^^:` custom-delimiter form."""
    names = [name.strip() for name in codecs.split(",")]
    names = [name for name in names if name]
    if not names:
        return ""
    return ",absolute_codec_string=^^:" + ":".join(names)


def dial_targets(gateways: Iterable[str], number: str, leg_timeout: int, codecs: str) -> tuple[str, ...]:
    """`[leg_timeout=T,absolute_codec_string=C]sofia/gateway/<gateway>/<number>` per gateway."""
    head = f"[leg_timeout={leg_timeout}{codec_option(codecs)}]sofia/gateway/"
    tail = "/" + number
    return tuple(head + gateway + tail for gateway in gateways)


def plan_routes(
    destination: str,
    rating: Rating,
    caller_id: CallerId,
    caller_codecs: str,
    catalog: Catalog,
    config: RulesConfig,
    notes: list[str] | None = None,
) -> tuple[Route, ...]:
    """Routes in dialling order for ``destination`` rated at ``rating`` (the level whose
    rate group owns the trunks). ``caller_codecs`` applies when a trunk sets none.
    When ``notes`` is a list, every trunk left out is explained there."""
    lossless = rating.group.lossless
    ceiling = rating.level.cost_per_minute
    found: list[tuple[tuple, Route]] = []
    for trunk_id in candidate_trunk_ids(rating):
        trunk = catalog.trunks.get(trunk_id)
        if trunk is None or not _usable(trunk, catalog):
            if notes is not None:
                notes.append(_why_unusable(trunk, trunk_id, catalog))
            continue
        gateways = catalog.trunk_gateways[trunk.id]
        if not gateways:
            if notes is not None:
                notes.append(f"trunk {trunk.name} skipped: no active gateway")
            continue
        rate = longest_prefix(
            catalog.termination_rates.get(trunk.id, _NO_RATES),
            destination,
            catalog.longest_termination_prefix,
        )
        if rate is None:
            if notes is not None:
                notes.append(f"trunk {trunk.name} skipped: no termination rate for {destination}")
            continue
        if lossless and rate.cost_per_minute > ceiling:
            if notes is not None:
                notes.append(
                    f"trunk {trunk.name} dropped: {plain_decimal(rate.cost_per_minute)}/min costs more than "
                    f"the rate {plain_decimal(ceiling)}/min (loss-less group {rating.group.name})"
                )
            continue
        number = strip_prepend(destination, rate.strip, rate.prepend)
        if not number:
            if notes is not None:
                notes.append(f"trunk {trunk.name} skipped: strip {rate.strip} leaves no number")
            continue
        leg_timeout = trunk.leg_timeout if trunk.leg_timeout > 0 else config.default_leg_timeout
        codecs = trunk.codecs if trunk.codecs.strip() else caller_codecs
        route = Route(
            trunk_id=trunk.id,
            trunk_name=trunk.name,
            provider_id=trunk.provider_id,
            termination_prefix=rate.prefix,
            cost_per_minute=rate.cost_per_minute,
            number=number,
            caller_id_number=caller_id.number,
            caller_id_name=caller_id.name,
            targets=dial_targets(gateways, number, leg_timeout, codecs),
        )
        found.append((_order_key(rating.group.routing_type, rate, trunk), route))
    found.sort(key=lambda item: item[0])
    return tuple(route for _, route in found)


def describe_routes(routes: Iterable[Route], catalog: Catalog) -> list[str]:
    lines = []
    for position, route in enumerate(routes, start=1):
        gateways = catalog.trunk_gateways[route.trunk_id]
        failover = f" (failover {', '.join(gateways[1:])})" if len(gateways) > 1 else ""
        lines.append(
            f"route {position}: trunk {route.trunk_name} via {gateways[0]}{failover}, "
            f"{plain_decimal(route.cost_per_minute)}/min, prefix {route.termination_prefix or '(any)'}, "
            f"dials {route.number}"
        )
    return lines


def _order_key(routing_type: RoutingType, rate: TerminationRate, trunk: Trunk) -> tuple:
    if routing_type is RoutingType.COST:
        return (rate.cost_per_minute, rate.precedence, trunk.precedence, trunk.id)
    return (-len(rate.prefix), rate.cost_per_minute, rate.precedence, trunk.precedence, trunk.id)


def _usable(trunk: Trunk, catalog: Catalog) -> bool:
    provider = catalog.accounts.get(trunk.provider_id)
    return trunk.active and provider is not None and provider.usable


def _why_unusable(trunk: Trunk | None, trunk_id: int, catalog: Catalog) -> str:
    if trunk is None:
        return f"trunk {trunk_id} skipped: not found"
    if not trunk.active:
        return f"trunk {trunk.name} skipped: inactive"
    return f"trunk {trunk.name} skipped: provider {trunk.provider_id} missing or inactive"
