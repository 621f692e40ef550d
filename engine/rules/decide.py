"""One call in, one decision out: the spec's steps in the spec's order.

Pure: everything the rules need arrives as arguments (the catalog snapshot, the
clock reading, the random source, the settings); nothing is read or written
elsewhere. Order: §2 who is calling, §3 the caller's gate, §1 the direction (it
needs the IP map's tech prefix stripped), §4 number handling, then for on-net legs
(local calls, DIDs to a SIP device or URI) a direct bridge, and for everything else
(outbound calls, DIDs forwarded to a number) §5 rating and §6 routing.
"""

from __future__ import annotations

import dataclasses

from engine.decision import (
    Accept,
    Decision,
    DeviceLeg,
    Direction,
    OnNetLeg,
    RatedLevel,
    Reason,
    Reject,
    Step,
    UriLeg,
)
from engine.model import Account, CallRequest
from engine.rules.call import CallState, DecisionContext, NumberStep
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.direction import resolve_direction
from engine.rules.gate import check_chain, describe_level, level_name
from engine.rules.identify import Identity, identify
from engine.rules.numbers import block_codes, cli_pool, force_caller_id, localize, speed_dial
from engine.rules.rating import Rating, did_allowance, did_charged, rate_level, rate_local
from engine.rules.refusal import Refusal
from engine.rules.routing import CallerId, candidate_trunk_ids, describe_routes, plan_routes
from engine.rules.text import is_diallable, is_username, plain_decimal, safe_text, show

__all__ = ["NUMBER_HANDLING", "CallState", "DecisionContext", "NumberStep", "decide"]

# §4 "Number handling", in the spec's order, each one NumberStep (engine/rules/numbers.py):
#   1. speed dial        whole-destination key with a non-empty number (then §1 again)
#   2. localization      originate side: destination, then caller ID
#   3. blocked codes     longest prefix of the localized destination -> DESTINATION_BLOCKED
#   4. CLI pool          keep / random DID or caller ID (ctx.rng) / NON-CLI rate group / reject
#   5. forced caller ID  replaces name and number after the CLI pool
NUMBER_HANDLING: tuple[NumberStep, ...] = (speed_dial, localize, block_codes, cli_pool, force_caller_id)


def decide(request: CallRequest, catalog: Catalog, ctx: DecisionContext) -> Decision:
    trail: list[Step] | None = [] if ctx.explain else None

    # §2 Who is calling.
    identity = identify(request, catalog, ctx.config)
    if isinstance(identity, Refusal):
        return _reject(identity, "identify", identity.account_id, trail)
    account_id = identity.account.id if identity.account is not None else None
    if trail is not None:
        trail.append(Step("identify", identity.describe()))

    problem = _destination_problem(identity.destination, ctx.config, catalog)
    if problem is not None:
        return _reject(Refusal(Reason.NO_ROUTE_DESTINATION, problem), "destination", account_id, trail)

    # §3 The account gate, for the account and each reseller above it.
    chain = check_chain(identity.account, identity.account_number, catalog, ctx.now)
    if isinstance(chain, Refusal):
        return _reject(chain, "gate", account_id, trail)
    if trail is not None:
        trail.extend(
            Step("gate", describe_level(account, position)) for position, account in enumerate(chain)
        )

    # §1 Direction: inbound DID, on-net, or outbound.
    call = CallState(
        identity, chain, safe_text(request.caller_id_number), safe_text(request.caller_id_name), catalog
    )
    refusal = resolve_direction(call, catalog, ctx, trail)
    if refusal is not None:
        return _reject(refusal, "direction", account_id, trail)

    # §4 Number handling.
    for step in NUMBER_HANDLING:
        refusal = step(call, catalog, ctx, trail)
        if refusal is not None:
            return _reject(refusal, getattr(step, "__name__", "number"), account_id, trail)

    if not call.routed:
        return _on_net(call, catalog, ctx, trail)

    problem = _routed_destination_problem(call, ctx.config)
    if problem is not None:
        return _reject(Refusal(Reason.NO_ROUTE_DESTINATION, problem), "destination", account_id, trail)

    # §5 Rating: every level at its own rate group, with its own funds.
    ratings: list[Rating] = []
    for position, account in enumerate(call.chain):
        group_id = call.rate_group_id if position == 0 else None
        rating = rate_level(account, call.destination, catalog, ctx.config, group_id, position)
        if isinstance(rating, Refusal):
            return _reject(rating, "rating", account_id, trail)
        ratings.append(rating)
        if trail is not None:
            who = f"{level_name(account, position)}: " if position else ""
            trail.append(Step("rating", who + rating.describe()))
    if call.did is not None and did_charged(call.did):
        # A DID with a price, forwarded: its owner pays the DID and the outbound leg together.
        first = ratings[0]
        seconds = did_allowance(call.account, call.did, ctx.config, first.level)
        if isinstance(seconds, Refusal):
            return _reject(seconds, "rating", account_id, trail)
        level = dataclasses.replace(first.level, max_duration=min(seconds, first.level.max_duration))
        ratings[0] = Rating(level, first.rate, first.group)
        if trail is not None:
            trail.append(Step("rating", _did_price(call, seconds)))
    # first (lowest level) on a tie; one level (no reseller): itself
    binding = ratings[0] if len(ratings) == 1 else min(ratings, key=_max_duration)
    max_duration = binding.level.max_duration
    if trail is not None:
        who = level_name(catalog.accounts[binding.level.account_id], ratings.index(binding))
        trail.append(Step("duration", f"max duration {max_duration}s, set by {who}"))

    # §6 Routing, by the top of the chain: the level that buys from the trunks' owner.
    router = ratings[-1]
    caller_id = CallerId(call.caller_id_number, call.caller_id_name)
    codecs = _caller_codecs(identity, call.caller_account)
    notes: list[str] | None = [] if trail is not None else None
    rewrites: list[str] | None = [] if trail is not None else None
    routes = plan_routes(call.destination, router, caller_id, codecs, catalog, ctx.config, notes, rewrites)
    if not routes:
        if notes is None:  # the rejection explains itself even when no steps are kept
            notes = []
            plan_routes(call.destination, router, caller_id, codecs, catalog, ctx.config, notes)
        detail = _no_route_detail(call.destination, router, notes)
        return _reject(Refusal(Reason.TERMINATION_RATE_NOT_FOUND, detail), "routing", account_id, trail)
    if trail is not None:
        trail.extend(Step("routing", line) for line in notes or ())
        trail.extend(Step("routing", line) for line in rewrites or ())
        trail.extend(Step("routing", line) for line in describe_routes(routes, catalog))
        trail.append(Step("decision", f"accepted: {len(routes)} route(s), at most {max_duration}s"))

    return Accept(
        direction=call.direction,
        account_id=call.account.id,
        account_number=call.account.number,
        chain=tuple([account.id for account in call.chain]),
        destination=call.destination,
        caller_id_number=call.caller_id_number,
        caller_id_name=call.caller_id_name,
        levels=tuple([rating.level for rating in ratings]),
        max_duration=max_duration,
        routes=routes,
        did_id=call.did.id if call.did is not None else None,
        steps=tuple(trail) if trail is not None else (),
        caller_id_changed=call.caller_id_changed,
        caller_account_id=call.caller_account.id,
        callee_account_id=call.account.id if call.did is not None else None,
    )


def _on_net(call: CallState, catalog: Catalog, ctx: DecisionContext, trail: list[Step] | None) -> Decision:
    """A local call (§1.2) or a DID to a SIP device or URI (§1.1): one bridge target, no trunks."""
    config = ctx.config
    caller = call.caller_account.id
    levels: tuple[RatedLevel, ...] = ()
    if call.direction is Direction.LOCAL:
        device = call.callee_device
        assert device is not None
        local = rate_local(call.account, catalog, config)
        if isinstance(local, Refusal):
            return _reject(local, "rating", caller, trail)
        level, max_duration = local
        levels = (level,) if level is not None else ()
        if trail is not None:
            price = f"at {plain_decimal(level.cost_per_minute)}/min" if level is not None else "free"
            trail.append(Step("rating", f"local call {price}, affords {max_duration}s"))
        callee = device.account_id
    else:
        did = call.did
        assert did is not None
        if did_charged(did):
            allowance = did_allowance(call.account, did, config)
            if isinstance(allowance, Refusal):
                return _reject(allowance, "rating", caller, trail)
            max_duration = allowance
        else:
            max_duration = min(config.max_free_length, config.call_max_length)
        if trail is not None:
            trail.append(Step("rating", _did_price(call, max_duration)))
        callee = call.account.id
    target = _on_net_target(call, config)
    if trail is not None:
        trail.append(Step("routing", f"bridge to {describe_leg(target)}"))
        trail.append(Step("decision", f"accepted: {call.direction} call, at most {max_duration}s"))
    return Accept(
        direction=call.direction,
        account_id=call.account.id,
        account_number=call.account.number,
        chain=tuple(account.id for account in call.chain),
        destination=call.destination,
        caller_id_number=call.caller_id_number,
        caller_id_name=call.caller_id_name,
        levels=levels,
        max_duration=max_duration,
        routes=(),
        bridge_targets=(target,),
        did_id=call.did.id if call.did is not None else None,
        steps=tuple(trail) if trail is not None else (),
        caller_id_changed=call.caller_id_changed,
        caller_account_id=call.caller_account.id,
        callee_account_id=callee,
    )


def _on_net_target(call: CallState, config: RulesConfig) -> OnNetLeg:
    """A device leg (the directory finds where the device is registered), or a leg to the
    DID's SIP URI through the configured profile."""
    timeout = config.default_leg_timeout
    device = call.callee_device
    if device is not None:
        return DeviceLeg(device.username, config.local_domain, timeout)
    assert call.did is not None
    return UriLeg(config.uri_profile, call.did.destination.strip(), timeout)


def describe_leg(leg: OnNetLeg) -> str:
    if isinstance(leg, DeviceLeg):
        return f"device {leg.username}@{leg.domain}, ringing up to {leg.timeout}s"
    return f"SIP URI {leg.uri} via profile {leg.profile}, ringing up to {leg.timeout}s"


def _did_price(call: CallState, seconds: int) -> str:
    did = call.did
    assert did is not None
    if not did_charged(did):
        return f"DID {did.number} is free to its owner, affords {seconds}s"
    connect = f" + {plain_decimal(did.connect_cost)} connect" if did.connect_cost else ""
    return (
        f"DID {did.number} at {plain_decimal(did.cost_per_minute)}/min{connect} paid by account "
        f"{call.account.number}, affords {seconds}s"
    )


def _destination_problem(destination: str, config: RulesConfig, catalog: Catalog) -> str | None:
    """Checked before any lookup: a number, or the name of an on-net SIP device."""
    if not destination:
        return "empty destination"
    if len(destination) > config.max_destination_length:
        return f"destination longer than {config.max_destination_length} characters"
    if is_diallable(destination) or (destination in catalog.devices and is_username(destination)):
        return None
    return f"destination {show(destination)} is not a diallable number (+, digits, * and # only)"


def _routed_destination_problem(call: CallState, config: RulesConfig) -> str | None:
    """What goes to a carrier must be a number (an on-net user name is not, nor an empty
    result of the number rules)."""
    destination = call.destination
    if not destination:
        return "no destination left after the number rules"
    if len(destination) > config.max_destination_length:
        return f"destination longer than {config.max_destination_length} characters after the number rules"
    if not is_diallable(destination):
        return f"destination {show(destination)} is not a diallable number (+, digits, * and # only)"
    return None


def _max_duration(rating: Rating) -> int:
    return rating.level.max_duration


def _caller_codecs(identity: Identity, account: Account) -> str:
    """Codecs for trunks that set none: the caller's device, else the caller's account."""
    if identity.device is not None and identity.device.codecs.strip():
        return identity.device.codecs
    return account.codecs


def _no_route_detail(destination: str, router: Rating, notes: list[str]) -> str:
    if not candidate_trunk_ids(router):
        return f"no trunk for {destination}: neither the rate nor rate group {router.group.name} names one"
    return f"no route for {destination}: " + "; ".join(notes)


def _reject(refusal: Refusal, rule: str, account_id: int | None, trail: list[Step] | None) -> Reject:
    steps: tuple[Step, ...] = ()
    if trail is not None:
        trail.append(Step(rule, f"{refusal.reason}: {refusal.detail}"))
        steps = tuple(trail)
    return Reject(refusal.reason, account_id, refusal.detail, steps)
