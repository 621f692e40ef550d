"""One call in, one decision out: the spec's steps in the spec's order.

Pure: everything the rules need arrives as arguments (the catalog snapshot, the
clock reading, the random source, the settings); nothing is read or written
elsewhere. Scope so far: outbound calls (§1.3), §2, §3, §5 and §6. Inbound DID
and on-net calls, and §4's number handling, plug in at the places marked below.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from engine.decision import Accept, Decision, Direction, Reason, Reject, Step
from engine.model import Account, CallRequest
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.gate import check_chain, describe_level, level_name
from engine.rules.identify import Identity, identify
from engine.rules.rating import Rating, rate_level
from engine.rules.refusal import Refusal
from engine.rules.routing import CallerId, candidate_trunk_ids, describe_routes, plan_routes
from engine.rules.text import is_diallable, safe_text, show


@dataclass(frozen=True, slots=True)
class DecisionContext:
    now: datetime  # UTC; a naive value is taken as UTC
    rng: random.Random  # the only source of chance (CLI pool picks), injectable for tests
    config: RulesConfig = field(default_factory=RulesConfig)
    explain: bool = False  # build the human-readable steps (off on the hot path)

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            object.__setattr__(self, "now", self.now.replace(tzinfo=UTC))


class CallState:
    """The call as §4's steps see it; each step may rewrite these fields."""

    __slots__ = (
        "account",
        "caller_id_changed",
        "caller_id_name",
        "caller_id_number",
        "chain",
        "destination",
        "identity",
        "rate_group_id",
    )

    def __init__(self, identity: Identity, chain: tuple[Account, ...], caller_number: str, caller_name: str):
        self.identity = identity
        self.account = chain[0]
        self.chain = chain
        self.destination = identity.destination
        self.caller_id_number = caller_number
        self.caller_id_name = caller_name
        self.caller_id_changed = False
        self.rate_group_id: int | None = None  # None = the account's own; the CLI pool may pick NON-CLI


NumberStep = Callable[[CallState, Catalog, DecisionContext, list[Step] | None], Refusal | None]
"""A §4 step: rewrites the call state, or refuses the call; appends Steps when given a list."""

# §4 "Number handling", in the spec's order, each one NumberStep:
#   1. speed dial        whole-destination key with a non-empty number
#   2. localization      originate side: destination, then caller ID
#   3. blocked codes     longest prefix of the localized destination -> DESTINATION_BLOCKED
#   4. CLI pool          keep / random DID or caller ID (ctx.rng) / NON-CLI rate group / reject
#   5. forced caller ID  replaces name and number after the CLI pool
# None of them is in the outbound scope yet: the pipeline is deliberately empty.
NUMBER_HANDLING: tuple[NumberStep, ...] = ()


def decide(request: CallRequest, catalog: Catalog, ctx: DecisionContext) -> Decision:
    trail: list[Step] | None = [] if ctx.explain else None

    # §1 Direction. Inbound DID (§1.1) and on-net (§1.2) are decided here once they
    # exist; everything currently goes the outbound way (§1.3).
    direction = Direction.OUTBOUND

    # §2 Who is calling.
    identity = identify(request, catalog, ctx.config)
    if isinstance(identity, Refusal):
        return _reject(identity, "identify", identity.account_id, trail)
    account_id = identity.account.id if identity.account is not None else None
    if trail is not None:
        trail.append(Step("identify", identity.describe()))

    problem = _destination_problem(identity.destination, ctx.config)
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

    # §4 Number handling.
    call = CallState(identity, chain, safe_text(request.caller_id_number), safe_text(request.caller_id_name))
    for step in NUMBER_HANDLING:
        refusal = step(call, catalog, ctx, trail)
        if refusal is not None:
            return _reject(refusal, "number", account_id, trail)

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
    binding = min(ratings, key=lambda rating: rating.level.max_duration)  # first (lowest level) on a tie
    max_duration = binding.level.max_duration
    if trail is not None:
        who = level_name(catalog.accounts[binding.level.account_id], ratings.index(binding))
        trail.append(Step("duration", f"max duration {max_duration}s, set by {who}"))

    # §6 Routing, by the top of the chain: the level that buys from the trunks' owner.
    router = ratings[-1]
    caller_id = CallerId(call.caller_id_number, call.caller_id_name)
    codecs = _caller_codecs(identity, call.account)
    notes: list[str] | None = [] if trail is not None else None
    routes = plan_routes(call.destination, router, caller_id, codecs, catalog, ctx.config, notes)
    if not routes:
        if notes is None:  # the rejection explains itself even when no steps are kept
            notes = []
            plan_routes(call.destination, router, caller_id, codecs, catalog, ctx.config, notes)
        detail = _no_route_detail(call.destination, router, notes)
        return _reject(Refusal(Reason.TERMINATION_RATE_NOT_FOUND, detail), "routing", account_id, trail)
    if trail is not None:
        trail.extend(Step("routing", line) for line in notes or ())
        trail.extend(Step("routing", line) for line in describe_routes(routes, catalog))
        trail.append(Step("decision", f"accepted: {len(routes)} route(s), at most {max_duration}s"))

    return Accept(
        direction=direction,
        account_id=call.account.id,
        account_number=call.account.number,
        chain=tuple(account.id for account in call.chain),
        destination=call.destination,
        caller_id_number=call.caller_id_number,
        caller_id_name=call.caller_id_name,
        levels=tuple(rating.level for rating in ratings),
        max_duration=max_duration,
        routes=routes,
        steps=tuple(trail) if trail is not None else (),
        caller_id_changed=call.caller_id_changed,
    )


def _destination_problem(destination: str, config: RulesConfig) -> str | None:
    if not destination:
        return "empty destination"
    if len(destination) > config.max_destination_length:
        return f"destination longer than {config.max_destination_length} characters"
    if not is_diallable(destination):
        return f"destination {show(destination)} is not a diallable number (+, digits, * and # only)"
    return None


def _caller_codecs(identity: Identity, account: Account) -> str:
    """Codecs for trunks that set none: the caller's device, else the account."""
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
