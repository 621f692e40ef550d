"""The pure part of the limits: what a call is counted against, and the rule that decides.

No I/O. :func:`plan_for` turns an accepted call and the catalogue into a
:class:`LimitPlan` (the mandatory levels, then the candidate trunks in route order);
:func:`decide` applies the admission rule to a plan given a way to tell whether a
subject is full. The Redis script (``engine.state.limits.redis``) implements the same
rule atomically for the hot path; the fail-open approximation and ``peek`` (explain)
call :func:`decide` with their own counts.

The rule: a full mandatory level refuses the call (nothing is taken). Trunks are
checked in route order; full ones are skipped (dropped from the route list). The call
is counted on the first trunk that has room when that trunk is limited; an unlimited
trunk always has room, so once one comes first no trunk is counted. When every
candidate trunk is full the call is refused, naming them all.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from engine.decision import Accept

__all__ = [
    "WINDOW_MS",
    "LevelKind",
    "LevelUsage",
    "LimitKind",
    "LimitPlan",
    "LimitResult",
    "LimitedEntity",
    "LimitsCatalog",
    "SkippedTrunk",
    "Subject",
    "decide",
    "plan_for",
]

WINDOW_MS = 1000
"""The CPS window: at most ``cps`` admissions in any 1000 ms."""


class LevelKind(enum.StrEnum):
    ACCOUNT = "account"
    RESELLER = "reseller"
    DID = "did"
    TRUNK = "trunk"


class LimitKind(enum.StrEnum):
    CHANNELS = "channels"
    CPS = "cps"


class LimitedEntity(Protocol):
    """What the limits read of an account, a DID or a trunk (0 = unlimited)."""

    @property
    def max_channels(self) -> int: ...

    @property
    def cps(self) -> int: ...


class LimitsCatalog(Protocol):
    """What the limits read of the catalogue (``engine.rules.catalog.Catalog`` has it)."""

    @property
    def accounts(self) -> Mapping[int, LimitedEntity]: ...

    @property
    def trunks(self) -> Mapping[int, LimitedEntity]: ...

    @property
    def dids_by_id(self) -> Mapping[int, LimitedEntity]: ...


@dataclass(frozen=True, slots=True)
class Subject:
    """One counted thing and its limits (0 = unlimited)."""

    level: LevelKind
    id: int
    max_channels: int = 0
    cps: int = 0

    @property
    def limited(self) -> bool:
        return self.max_channels > 0 or self.cps > 0

    @property
    def label(self) -> str:
        return f"{self.level} {self.id}"


@dataclass(frozen=True, slots=True)
class LimitPlan:
    """What one call is counted against: the mandatory levels, then the candidate trunks
    in route order. Unlimited subjects are kept (``explain`` shows them) but never sent."""

    levels: tuple[Subject, ...] = ()
    trunks: tuple[Subject, ...] = ()

    @property
    def limited(self) -> bool:
        return any(s.limited for s in self.levels) or any(t.limited for t in self.trunks)

    @property
    def trunk_ids(self) -> tuple[int, ...]:
        return tuple([t.id for t in self.trunks])


@dataclass(frozen=True, slots=True)
class SkippedTrunk:
    trunk_id: int
    kind: LimitKind


@dataclass(frozen=True, slots=True)
class LimitResult:
    """The outcome of an acquire (or a peek).

    Admitted: ``trunk_ids`` is the route order to dial (candidates minus the trunks found
    full; its first trunk is the one the call is counted on when that trunk is limited,
    ``counted_trunk_id``). Refused: ``level``/``subject_id``/``kind`` name the full
    mandatory level, or ``skipped`` lists every trunk and why when no trunk had room.
    (The reject reason a refusal maps to is the decider's business: engine.decider.)
    """

    admitted: bool
    trunk_ids: tuple[int, ...] = ()
    counted_trunk_id: int | None = None
    skipped: tuple[SkippedTrunk, ...] = ()
    level: LevelKind | None = None
    subject_id: int | None = None
    kind: LimitKind | None = None
    degraded: bool = False  # decided by the fail-open local approximation
    duplicate: bool = False  # this uuid was already admitted; that admission is returned
    # With a funds reservation (engine.state.funds): the seconds every chain level can pay
    # (admitted), or the 0-based chain position that cannot pay (refused, nothing taken).
    granted_seconds: int | None = None
    funds_level: int | None = None

    @property
    def detail(self) -> str:
        skipped = ", ".join([f"trunk {s.trunk_id} ({s.kind})" for s in self.skipped]) if self.skipped else ""
        if self.funds_level is not None:
            return f"chain level {self.funds_level} cannot pay one minute from its available funds"
        if self.admitted:
            text = "within limits"
            if self.counted_trunk_id is not None:
                text += f", counted on trunk {self.counted_trunk_id}"
            if skipped:
                text += f"; skipped full {skipped}"
            if self.granted_seconds is not None:
                text += f"; funds reserved for {self.granted_seconds}s"
            return text + (" [local approximation: Redis unreachable]" if self.degraded else "")
        if self.level is None:
            return f"every candidate trunk is at its limit: {skipped}"
        limit = "channel" if self.kind is LimitKind.CHANNELS else "CPS"
        text = f"{self.level} {self.subject_id} is at its {limit} limit"
        return text + (" [local approximation: Redis unreachable]" if self.degraded else "")


@dataclass(frozen=True, slots=True)
class LevelUsage:
    """Current use of one subject, for ``callgate explain``. ``None`` = not counted (unlimited)."""

    level: LevelKind
    id: int
    channels: int | None
    max_channels: int
    calls_last_second: int | None
    cps: int

    def full(self) -> LimitKind | None:
        """Which limit a new call would hit now (channels first, as the script checks)."""
        if self.channels is not None and self.max_channels > 0 and self.channels >= self.max_channels:
            return LimitKind.CHANNELS
        if self.calls_last_second is not None and self.cps > 0 and self.calls_last_second >= self.cps:
            return LimitKind.CPS
        return None


def _subject(kind: LevelKind, subject_id: int, entity: LimitedEntity | None) -> Subject:
    if entity is None:  # not in the catalogue (a race with a delete): nothing to count
        return Subject(kind, subject_id)
    return Subject(kind, subject_id, entity.max_channels, entity.cps)


def plan_for(accept: Accept, catalog: LimitsCatalog) -> LimitPlan:
    """The levels (account, resellers, DID) and candidate trunks of an accepted call.

    An account's own calls and its customers' calls share one counter: an account id is
    one subject whether it is the calling account or a reseller up the chain.
    (Built for every accepted call: the loops are written out, without helpers.)
    """
    levels: list[Subject] = []
    accounts = catalog.accounts
    kind = LevelKind.ACCOUNT  # the chain's first id; the others are resellers
    seen: list[int] = []  # a chain is a few ids long
    for account_id in accept.chain:
        if account_id in seen:  # a malformed chain: count each account once
            continue
        seen.append(account_id)
        entity = accounts.get(account_id)
        # not in the catalogue (a race with a delete): nothing to count
        levels.append(
            Subject(kind, account_id)
            if entity is None
            else Subject(kind, account_id, entity.max_channels, entity.cps)
        )
        kind = LevelKind.RESELLER
    did_id = accept.did_id
    if did_id is not None:
        levels.append(_subject(LevelKind.DID, did_id, catalog.dids_by_id.get(did_id)))
    trunks: list[Subject] = []
    all_trunks = catalog.trunks
    seen_trunks: list[int] = []
    for route in accept.routes:
        trunk_id = route.trunk_id
        if trunk_id in seen_trunks:
            continue
        seen_trunks.append(trunk_id)
        trunk = all_trunks.get(trunk_id)
        trunks.append(
            Subject(LevelKind.TRUNK, trunk_id)
            if trunk is None
            else Subject(LevelKind.TRUNK, trunk_id, trunk.max_channels, trunk.cps)
        )
    return LimitPlan(tuple(levels), tuple(trunks))


def decide(
    plan: LimitPlan, full: Callable[[Subject], LimitKind | None], *, degraded: bool = False
) -> LimitResult:
    """The admission rule (module docstring) over ``plan``; ``full(subject)`` says which
    limit of a *limited* subject a new call would exceed now, or None."""
    for subject in plan.levels:
        if subject.limited and (kind := full(subject)) is not None:
            return LimitResult(
                admitted=False, level=subject.level, subject_id=subject.id, kind=kind, degraded=degraded
            )
    chosen: Subject | None = None
    skipped: list[SkippedTrunk] = []
    for trunk in plan.trunks:
        kind = full(trunk) if trunk.limited else None
        if kind is not None:
            skipped.append(SkippedTrunk(trunk.id, kind))
        elif chosen is None:
            chosen = trunk
    if plan.trunks and chosen is None:
        return LimitResult(admitted=False, skipped=tuple(skipped), degraded=degraded)
    dropped = {s.trunk_id for s in skipped}
    return LimitResult(
        admitted=True,
        trunk_ids=tuple(t for t in plan.trunk_ids if t not in dropped),
        counted_trunk_id=chosen.id if chosen is not None and chosen.limited else None,
        skipped=tuple(skipped),
        degraded=degraded,
    )
