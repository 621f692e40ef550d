"""Direction of a call (decision-rules §1): inbound DID, on-net (local) or outbound.

Runs after the caller is identified (§2: the IP map's tech prefix is stripped first)
and has passed the gate (§3). Inbound DID calls need an identified caller like any
other call (normally the carrier, through the IP map); the caller pays nothing for
them (providers are exempt, as in ASTPP): the DID's owner receives the call, pays
for it and is limited by it.
"""

from __future__ import annotations

from engine.decision import Direction, Reason, Step
from engine.model import Account, Did, DidDestinationType, SipDevice
from engine.rules.call import CallState, DecisionContext, localization_of
from engine.rules.catalog import Catalog
from engine.rules.gate import check_chain, describe_level
from engine.rules.refusal import Refusal
from engine.rules.text import is_sip_uri, is_username, show


def resolve_direction(
    call: CallState, catalog: Catalog, ctx: DecisionContext, trail: list[Step] | None
) -> Refusal | None:
    """Classify ``call.destination`` and set the call up for it (again after a speed dial)."""
    destination = call.destination
    did_rules = ctx.config.did_rules
    did_number = did_rules.apply(destination) if did_rules else destination
    did = catalog.dids.get(did_number)
    if did is not None:
        if trail is not None and did_number != destination:
            _, changes = did_rules.trace(destination)
            trail.extend(
                Step("direction", f"DID translation: {before} -> {after} by {rule}")
                for before, after, rule in changes
            )
        return _inbound(call, did, catalog, ctx, trail)

    call.direction = Direction.OUTBOUND
    call.callee_device = None
    device = catalog.devices.get(destination)
    if device is None:
        if trail is not None:
            trail.append(Step("direction", f"outbound: {destination} is neither a DID nor an on-net user"))
        return None
    callee = catalog.accounts.get(device.account_id)
    unusable = _callee_problem(device, callee, destination)
    if unusable is not None or callee is None:
        if trail is not None:
            trail.append(Step("direction", f"outbound: SIP device {show(destination)} {unusable}"))
        return None
    if not call.account.local_calls_allowed:
        if trail is not None:
            trail.append(
                Step(
                    "direction",
                    f"outbound: {destination} is an on-net SIP user, but account {call.account.number} "
                    "may not make local calls",
                )
            )
        return None
    call.direction = Direction.LOCAL
    call.callee_device = device
    if trail is not None:
        trail.append(Step("direction", f"local: SIP device {destination} of account {callee.number}"))
    return None


def _inbound(
    call: CallState, did: Did, catalog: Catalog, ctx: DecisionContext, trail: list[Step] | None
) -> Refusal | None:
    if did.account_id is None:
        return Refusal(Reason.NO_ROUTE_DESTINATION, f"DID {did.number} is not assigned to an account")
    if not did.active:
        return Refusal(Reason.NO_ROUTE_DESTINATION, f"DID {did.number} is inactive")
    owner = catalog.accounts.get(did.account_id)
    if owner is None or not owner.usable:
        state = "missing" if owner is None else ("deleted" if owner.deleted else "inactive")
        return Refusal(
            Reason.NO_ROUTE_DESTINATION, f"DID {did.number} belongs to {state} account {did.account_id}"
        )
    chain = check_chain(owner, owner.number, catalog, ctx.now)
    if isinstance(chain, Refusal):
        return Refusal(chain.reason, f"DID {did.number} owner: {chain.detail}")

    target = did.destination.strip()
    call.callee_device = None
    if did.destination_type == DidDestinationType.DEVICE:
        device = catalog.devices.get(target) if target else None
        problem = _device_problem(device, target, owner)
        if problem is not None:
            return Refusal(Reason.NO_ROUTE_DESTINATION, f"DID {did.number}: {problem}")
        call.callee_device = device
        call.destination = did.number
    elif did.destination_type == DidDestinationType.URI:
        if not is_sip_uri(target):
            problem = "no SIP URI set" if not target else f"SIP URI {show(target)} cannot be dialled"
            return Refusal(Reason.NO_ROUTE_DESTINATION, f"DID {did.number}: {problem}")
        call.destination = did.number
    else:
        if not target:
            return Refusal(Reason.NO_ROUTE_DESTINATION, f"DID {did.number}: no number to forward to")
        call.destination = target

    call.direction = Direction.INBOUND
    call.did = did
    call.account = owner
    call.chain = chain
    call.localization = localization_of(owner, catalog)
    call.rate_group_id = None
    if trail is not None:
        if did.destination_type == DidDestinationType.DEVICE:
            where = f"SIP device {target}"
        elif did.destination_type == DidDestinationType.URI:
            where = f"SIP URI {target}"
        else:
            where = f"number {target}, as an outbound call of account {owner.number}"
        trail.append(Step("direction", f"inbound: DID {did.number} of account {owner.number}, to {where}"))
        trail.extend(Step("gate", describe_level(level, position)) for position, level in enumerate(chain))
    return None


def _callee_problem(device: SipDevice, callee: Account | None, username: str) -> str | None:
    if not device.active:
        return "is inactive"
    if callee is None or not callee.usable:
        return "belongs to an inactive or missing account"
    if not is_username(username):
        return "has a name that cannot be dialled"
    return None


def _device_problem(device: SipDevice | None, username: str, owner: Account) -> str | None:
    if not username:
        return "no SIP device set"
    if device is None:
        return f"SIP device {show(username)} not found"
    if device.account_id != owner.id:
        return f"SIP device {username} is not one of account {owner.number}'s"
    if not device.active:
        return f"SIP device {username} is inactive"
    if not is_username(username):
        return f"SIP device name {show(username)} cannot be dialled"
    return None
