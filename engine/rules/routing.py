"""Termination routing, least cost first (decision-rules §6).

Trunk channel/CPS limits are not applied here: the engine takes the limits after
the rules and skips a trunk that is over its own (the routes carry trunk ids).

Termination rates are looked up, and routes ordered, on the destination as the
customer's rules left it; then each route rewrites it for its own carrier: the
trunk's localization, then the provider's (its terminate-side rule sets, applied
once when both name the same localization), then the termination rate's
strip/prepend. The caller ID goes through the same localizations' caller-ID rules.
A route whose caller ID ends up different from the call's presented one carries it on
each of its legs (engine.call.render sends it as that leg's own caller ID, which the
switch presents over the call's).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from engine.decision import GatewayLeg, LegCallerId, Route
from engine.model import RoutingType, TerminationRate, Trunk
from engine.rules.catalog import Catalog, longest_prefix
from engine.rules.config import RulesConfig
from engine.rules.localization import CompiledLocalization, CompiledRules
from engine.rules.rating import Rating
from engine.rules.text import plain_decimal

_NO_RATES: dict[str, TerminationRate] = {}
# Routes sort by cost or by prefix length first, then cost, precedences and trunk id.
OrderKey = tuple[Decimal | int, ...]


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
def codec_names(codecs: str) -> tuple[str, ...]:
    """A comma list of codec names as a tuple, blanks dropped ('' -> (): the switch's default)."""
    return tuple(name for name in (item.strip() for item in codecs.split(",")) if name)


def gateway_legs(
    gateways: Iterable[str], number: str, leg_timeout: int, codecs: str, caller_id: CallerId | None = None
) -> tuple[GatewayLeg, ...]:
    """One leg per gateway, in order (the caller ID only when the leg presents its own)."""
    names = codec_names(codecs)
    leg_caller_id = None if caller_id is None else LegCallerId(caller_id.number, caller_id.name)
    return tuple(GatewayLeg(gateway, number, leg_timeout, names, leg_caller_id) for gateway in gateways)


def carrier_localizations(trunk: Trunk, catalog: Catalog) -> tuple[tuple[str, CompiledLocalization], ...]:
    """(whose, localization): the trunk's, then its provider's (once if they are the same
    one); active ones only."""
    found: list[tuple[str, CompiledLocalization]] = []
    if trunk.localization_id is not None:
        localization = catalog.localizations.get(trunk.localization_id)
        if localization is not None:
            found.append(("trunk", localization))
    provider = catalog.accounts.get(trunk.provider_id)
    if provider is not None and provider.localization_id is not None:
        localization = catalog.localizations.get(provider.localization_id)
        if localization is not None and localization.id != trunk.localization_id:
            found.append(("provider", localization))
    return tuple(found)


def carrier_number(
    destination: str,
    caller_number: str,
    trunk: Trunk,
    rate: TerminationRate,
    catalog: Catalog,
    rewrites: list[str] | None = None,
) -> tuple[str, str]:
    """(number, caller ID number) as this route sends them to its carrier (see the module doc).
    When ``rewrites`` is a list, each change is described there (nothing is formatted otherwise)."""
    number, cli = destination, caller_number
    for whose, localization in carrier_localizations(trunk, catalog):
        if rewrites is None:
            number = localization.number_terminate.apply(number)
            cli = localization.cli_terminate.apply(cli)
            continue
        if whose == "trunk":
            owner = f"trunk {trunk.name}"
        else:
            provider = catalog.accounts[trunk.provider_id]
            owner = f"provider {provider.number} of trunk {trunk.name}"
        label = f"localization {localization.name!r} ({owner}"
        number = _traced(localization.number_terminate, number, label + ", destination)", rewrites)
        cli = _traced(localization.cli_terminate, cli, label + ", caller ID)", rewrites)
    rewritten = strip_prepend(number, rate.strip, rate.prepend)
    if rewrites is not None and rewritten != number:
        rule = f"{rate.strip or '*'}/{rate.prepend or '*'}"
        rewrites.append(
            f"termination rate {rate.prefix or '(any)'} of trunk {trunk.name} (strip/prepend): "
            f"{number} -> {rewritten or '(empty)'} by {rule}"
        )
    return rewritten, cli


def _traced(rules: CompiledRules, value: str, label: str, rewrites: list[str]) -> str:
    result, changes = rules.trace(value)
    rewrites.extend(
        f"{label}: {before or '(empty)'} -> {after or '(empty)'} by {rule}" for before, after, rule in changes
    )
    return result


def plan_routes(
    destination: str,
    rating: Rating,
    caller_id: CallerId,
    caller_codecs: str,
    catalog: Catalog,
    config: RulesConfig,
    notes: list[str] | None = None,
    rewrites: list[str] | None = None,
) -> tuple[Route, ...]:
    """Routes in dialling order for ``destination`` rated at ``rating`` (the level whose
    rate group owns the trunks). ``caller_codecs`` applies when a trunk sets none.
    When ``notes`` is a list, every trunk left out is explained there; when ``rewrites``
    is, every per-route rewrite of the number or caller ID (before -> after, by which rule)."""
    group = rating.group
    lossless = group.lossless
    ceiling = rating.level.cost_per_minute
    routing_type = group.routing_type
    # Read once: this loop runs for every candidate trunk of every routed call.
    trunks = catalog.trunks
    accounts = catalog.accounts
    trunk_gateways = catalog.trunk_gateways
    termination_rates = catalog.termination_rates
    longest = catalog.longest_termination_prefix
    caller_number = caller_id.number
    found: list[tuple[OrderKey, Route]] = []
    for trunk_id in candidate_trunk_ids(rating):
        trunk = trunks.get(trunk_id)
        provider = accounts.get(trunk.provider_id) if trunk is not None else None
        if trunk is None or not (trunk.active and provider is not None and provider.usable):
            if notes is not None:
                notes.append(_why_unusable(trunk, trunk_id, catalog))
            continue
        gateways = trunk_gateways[trunk.id]
        if not gateways:
            if notes is not None:
                notes.append(f"trunk {trunk.name} skipped: no active gateway")
            continue
        rate = longest_prefix(termination_rates.get(trunk.id, _NO_RATES), destination, longest)
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
        if rewrites is None and trunk.localization_id is None and provider.localization_id is None:
            # carrier_number without a localization to apply: the rate's strip/prepend only
            number, cli = strip_prepend(destination, rate.strip, rate.prepend), caller_number
        else:
            number, cli = carrier_number(destination, caller_number, trunk, rate, catalog, rewrites)
        if not number:
            if notes is not None:
                notes.append(f"trunk {trunk.name} skipped: its number rules leave no number")
            continue
        leg_timeout = trunk.leg_timeout if trunk.leg_timeout > 0 else config.default_leg_timeout
        codecs = trunk.codecs if trunk.codecs.strip() else caller_codecs
        leg_caller_id = CallerId(cli, caller_id.name) if cli != caller_number else None
        route = Route(
            trunk_id=trunk.id,
            trunk_name=trunk.name,
            provider_id=trunk.provider_id,
            termination_prefix=rate.prefix,
            cost_per_minute=rate.cost_per_minute,
            number=number,
            caller_id_number=cli,
            caller_id_name=caller_id.name,
            targets=gateway_legs(gateways, number, leg_timeout, codecs, leg_caller_id),
            connect_cost=rate.connect_cost,
            included_seconds=rate.included_seconds,
            init_inc=rate.init_inc,
            inc=rate.inc,
        )
        found.append((_order_key(routing_type, rate, trunk), route))
    if len(found) > 1:
        found.sort(key=_first)
    return tuple([route for _, route in found])


def _first(item: tuple[OrderKey, Route]) -> OrderKey:
    return item[0]


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


def _order_key(routing_type: RoutingType, rate: TerminationRate, trunk: Trunk) -> OrderKey:
    if routing_type is RoutingType.COST:
        return (rate.cost_per_minute, rate.precedence, trunk.precedence, trunk.id)
    return (-len(rate.prefix), rate.cost_per_minute, rate.precedence, trunk.precedence, trunk.id)


def _why_unusable(trunk: Trunk | None, trunk_id: int, catalog: Catalog) -> str:
    if trunk is None:
        return f"trunk {trunk_id} skipped: not found"
    if not trunk.active:
        return f"trunk {trunk.name} skipped: inactive"
    return f"trunk {trunk.name} skipped: provider {trunk.provider_id} missing or inactive"
