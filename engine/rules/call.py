"""The state one decision carries between the spec's steps (§1, §4) and its context."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from engine.decision import Direction, Step
from engine.model import Account, Did, DidDestinationType, SipDevice
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.identify import Identity
from engine.rules.localization import CompiledLocalization
from engine.rules.refusal import Refusal


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
    """The call as §1's and §4's steps see it; each step may rewrite these fields.

    ``account``/``chain`` are whose call it is: the identified caller's, except on an
    inbound DID call, where they become the DID owner's (who receives, pays for and is
    limited by the call). ``caller_account``/``caller_chain`` always stay the caller's.
    """

    __slots__ = (
        "account",
        "callee_device",
        "caller_account",
        "caller_chain",
        "caller_id_changed",
        "caller_id_name",
        "caller_id_number",
        "chain",
        "destination",
        "did",
        "direction",
        "identity",
        "localization",
        "original_caller_id",
        "rate_group_id",
    )

    def __init__(
        self,
        identity: Identity,
        chain: tuple[Account, ...],
        caller_number: str,
        caller_name: str,
        catalog: Catalog | None = None,
    ):
        self.identity = identity
        self.account = chain[0]
        self.chain = chain
        self.caller_account = chain[0]
        self.caller_chain = chain
        self.destination = identity.destination
        self.caller_id_number = caller_number
        self.caller_id_name = caller_name
        self.original_caller_id = (caller_number, caller_name)
        self.caller_id_changed = False
        self.rate_group_id: int | None = None  # None = the account's own; the CLI pool may pick NON-CLI
        self.direction = Direction.OUTBOUND  # until §1 says otherwise
        self.did: Did | None = None  # the DID of an inbound call
        self.callee_device: SipDevice | None = None  # the on-net device a local or DID call rings
        self.localization: CompiledLocalization | None = None  # the account's, if active
        if catalog is not None:
            self.localization = localization_of(self.account, catalog)

    @property
    def routed(self) -> bool:
        """Rated and routed over trunks (§5, §6): outbound calls and DIDs forwarded to a number."""
        if self.direction is Direction.OUTBOUND:
            return True
        return self.did is not None and self.did.destination_type == DidDestinationType.NUMBER

    def set_caller_id(self, number: str, name: str | None = None) -> None:
        self.caller_id_number = number
        if name is not None:
            self.caller_id_name = name
        self.caller_id_changed = (self.caller_id_number, self.caller_id_name) != self.original_caller_id


def localization_of(account: Account, catalog: Catalog) -> CompiledLocalization | None:
    if account.localization_id is None:
        return None
    return catalog.localizations.get(account.localization_id)


NumberStep = Callable[[CallState, Catalog, DecisionContext, list[Step] | None], Refusal | None]
"""A §4 step: rewrites the call state, or refuses the call; appends Steps when given a list."""
