"""Number handling (decision-rules §4): the five steps, each a NumberStep, in the spec's order.

Which steps apply depends on the direction §1 found:

| step | outbound | local | inbound DID -> number | inbound DID -> device/URI |
|---|---|---|---|---|
| 1 speed dial | yes | yes | - | - |
| 2 localization: destination | number_originate | - | owner's number_originate | - |
| 2 localization: caller ID | cli_originate | cli_originate | DID rules, owner's cli_inbound | same |
| 3 blocked codes | account and resellers | - | owner and its resellers | - |
| 4 CLI pool | yes | yes | owner's | - |
| 5 forced caller ID | yes | yes | owner's | - |

A DID forwarded to a number is "an outbound call of the DID owner": the owner's rules
apply to it. A speed dial that rewrites the destination sends it through §1 again, so
a speed-dialled DID or on-net user is reached on-net (ASTPP recomputes the direction too).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.decision import Direction, Reason, Step
from engine.model import CliPool
from engine.rules.call import CallState, DecisionContext
from engine.rules.catalog import EMPTY_POOL, Catalog, longest_prefix
from engine.rules.direction import resolve_direction
from engine.rules.localization import CompiledRules
from engine.rules.refusal import Refusal
from engine.rules.text import safe_text, show

_NO_SPEED_DIALS: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class _PoolRule:
    """One CLI-pool option, described once at import (nothing is formatted per call)."""

    action: str  # "replace", "non_cli" or "reject"
    in_dids: bool  # the CLI may be found among the account's DIDs
    in_caller_ids: bool  # ... or among its whitelisted caller IDs
    label: str  # "CLI pool 3 (NON-CLI rates unless in DIDs)"
    lists: str  # "DIDs", "caller IDs" or "DIDs or caller IDs"


_DIDS, _CALLER_IDS, _EITHER = (True, False), (False, True), (True, True)


def _pool_rule(option: int, action: str, lists: tuple[bool, bool], text: str) -> _PoolRule:
    in_dids, in_caller_ids = lists
    names = " or ".join(name for name, used in (("DIDs", in_dids), ("caller IDs", in_caller_ids)) if used)
    return _PoolRule(action, in_dids, in_caller_ids, f"CLI pool {option} ({text})", names)


_POOL_RULES = {
    CliPool(option): _pool_rule(option, action, lists, text)
    for option, action, lists, text in (
        (1, "replace", _DIDS, "keep if in DIDs, else a random DID"),
        (2, "replace", _CALLER_IDS, "keep if in caller IDs, else a random caller ID"),
        (3, "non_cli", _DIDS, "NON-CLI rates unless in DIDs"),
        (4, "non_cli", _CALLER_IDS, "NON-CLI rates unless in caller IDs"),
        (5, "non_cli", _EITHER, "NON-CLI rates unless in DIDs or caller IDs"),
        (6, "reject", _DIDS, "reject unless in DIDs"),
        (7, "reject", _CALLER_IDS, "reject unless in caller IDs"),
        (8, "reject", _EITHER, "reject unless in DIDs or caller IDs"),
    )
}


def _caller_side(call: CallState) -> bool:
    """The caller's own number rules apply: outbound, local, and a DID forwarded to a number."""
    return call.direction is not Direction.INBOUND or call.routed


# -- 4.1 speed dial ------------------------------------------------------------------


def speed_dial(
    call: CallState, catalog: Catalog, ctx: DecisionContext, trail: list[Step] | None
) -> Refusal | None:
    """Only an exact key with a number rewrites the destination ("05" is not key "5")."""
    if call.direction is Direction.INBOUND:
        return None
    number = catalog.speed_dials.get(call.account.id, _NO_SPEED_DIALS).get(call.destination)
    if number is None:
        return None
    if trail is not None:
        trail.append(Step("speed_dial", f"speed dial {call.destination} -> {number}"))
    call.destination = number
    return resolve_direction(call, catalog, ctx, trail)


# -- 4.2 localization ----------------------------------------------------------------


def localize(
    call: CallState, catalog: Catalog, ctx: DecisionContext, trail: list[Step] | None
) -> Refusal | None:
    """Originate-side rules of the account: the destination (routed calls), then the caller ID."""
    localization = call.localization
    if trail is not None and localization is None and call.account.localization_id is not None:
        trail.append(
            Step(
                "localization",
                f"localization {call.account.localization_id} of account {call.account.number} "
                "is inactive or missing: not applied",
            )
        )
    inbound = call.direction is Direction.INBOUND
    if localization is not None and call.routed and localization.number_originate:
        call.destination = _apply(
            localization.number_originate,
            call.destination,
            trail,
            localization.name,
            "originate, destination",
        )
    cli = call.caller_id_number
    if inbound and ctx.config.did_caller_id_rules:
        cli = _apply(ctx.config.did_caller_id_rules, cli, trail)
    if localization is not None:
        rules = localization.cli_inbound if inbound else localization.cli_originate
        if rules:
            side = "inbound, caller ID" if inbound else "originate, caller ID"
            cli = _apply(rules, cli, trail, localization.name, side)
    if cli != call.caller_id_number:
        call.set_caller_id(cli)
    return None


def _apply(rules: CompiledRules, value: str, trail: list[Step] | None, name: str = "", side: str = "") -> str:
    """``rules`` on ``value``; with a trail, each change (or that none matched) is explained
    as coming from localization ``name`` (``side``), or from the global DID caller-ID rules."""
    if trail is None:
        return rules.apply(value)
    label = f"localization {name!r} ({side})" if name else "DID caller-ID translation"
    result, changes = rules.trace(value)
    if not changes:
        trail.append(Step("localization", f"{label}: {value or '(empty)'} unchanged, no rule matched"))
    for before, after, rule in changes:
        trail.append(
            Step("localization", f"{label}: {before or '(empty)'} -> {after or '(empty)'} by {rule}")
        )
    return result


# -- 4.3 blocked codes ---------------------------------------------------------------


def block_codes(
    call: CallState, catalog: Catalog, ctx: DecisionContext, trail: list[Step] | None
) -> Refusal | None:
    """Longest blocked prefix of the localized destination, for the account and every
    reseller above it (a reseller's blocks cover its customers)."""
    if not call.routed or not catalog.blocked_codes:
        return None
    for position, account in enumerate(call.chain):
        table = catalog.blocked_codes.get(account.id)
        if not table:
            continue
        code = longest_prefix(table, call.destination, catalog.longest_blocked_prefix)
        if code is not None:
            whose = f"{'account' if position == 0 else 'reseller'} {account.number}"
            return Refusal(
                Reason.DESTINATION_BLOCKED,
                f"{call.destination} matches blocked code {code.prefix} of {whose}",
            )
    return None


# -- 4.4 CLI pool --------------------------------------------------------------------


def cli_pool(
    call: CallState, catalog: Catalog, ctx: DecisionContext, trail: list[Step] | None
) -> Refusal | None:
    """The account's caller-ID rule (0-8) on the localized caller ID (a leading + ignored)."""
    if not _caller_side(call):
        return None
    account = call.account
    option = account.cli_pool
    if option == CliPool.DISABLED:
        return None
    rule = _POOL_RULES[option]
    dids = catalog.account_dids.get(account.id, EMPTY_POOL)
    caller_ids = catalog.account_caller_ids.get(account.id, EMPTY_POOL)
    cli = call.caller_id_number

    if rule.action == "replace":
        pool = dids if rule.in_dids else caller_ids
        if not pool.numbers:
            return Refusal(
                Reason.CLI_POOL_MISCONFIGURED,
                f"account {account.number}: {rule.label} but it has no active {rule.lists}",
            )
        if cli in pool:
            if trail is not None:
                trail.append(Step("cli_pool", f"{rule.label}: {show(cli)} is one of its {rule.lists}, kept"))
            return None
        chosen = ctx.rng.choice(pool.numbers)
        if trail is not None:
            trail.append(
                Step(
                    "cli_pool",
                    f"{rule.label}: {show(cli)} is not one of its {rule.lists}, presenting {chosen}",
                )
            )
        call.set_caller_id(chosen)
        return None

    group_id = account.non_cli_rate_group_id
    if rule.action == "non_cli" and (group_id is None or group_id not in catalog.rate_groups):
        missing = (
            "no NON-CLI rate group set" if group_id is None else f"NON-CLI rate group {group_id} missing"
        )
        return Refusal(Reason.CLI_POOL_MISCONFIGURED, f"account {account.number}: {rule.label} but {missing}")

    if (rule.in_dids and cli in dids) or (rule.in_caller_ids and cli in caller_ids):
        if trail is not None:
            trail.append(
                Step("cli_pool", f"{rule.label}: {show(cli)} is in its {rule.lists}, ordinary rates")
            )
        return None
    if rule.action == "non_cli":
        call.rate_group_id = group_id
        if trail is not None:
            group = catalog.rate_groups[group_id]  # type: ignore[index]
            trail.append(
                Step(
                    "cli_pool",
                    f"{rule.label}: {show(cli)} is not in its {rule.lists}, rated with group {group.name}",
                )
            )
        return None
    return Refusal(
        Reason.CLI_NOT_ALLOWED,
        f"{rule.label}: caller ID {show(cli)} is not in the {rule.lists} of account {account.number}",
    )


# -- 4.5 forced caller ID ------------------------------------------------------------


def force_caller_id(
    call: CallState, catalog: Catalog, ctx: DecisionContext, trail: list[Step] | None
) -> Refusal | None:
    """An active forced caller ID replaces number and name (an empty name: the number)."""
    if not _caller_side(call):
        return None
    forced = catalog.forced_caller_ids.get(call.account.id)
    if forced is None:
        return None
    number = safe_text(forced.number.strip())
    name = safe_text(forced.name.strip()) or number
    if trail is not None:
        trail.append(
            Step(
                "forced_caller_id",
                f"forced caller ID of account {call.account.number}: "
                f"{show(call.caller_id_number)} {show(call.caller_id_name)} -> {number} {name!r}",
            )
        )
    call.set_caller_id(number, name)
    return None
