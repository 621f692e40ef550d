"""The one interface every user of the limits programs against, and its errors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from engine.decision import Accept
from engine.state.funds import FundsRequest
from engine.state.limits.plan import LevelUsage, LimitPlan, LimitResult, LimitsCatalog

__all__ = ["LimitsAmbiguous", "LimitsBackend", "LimitsUnavailable"]


class LimitsUnavailable(Exception):
    """Redis could not be asked (down, too slow, refusing writes): no limit decision."""


class LimitsAmbiguous(LimitsUnavailable):
    """The acquire was sent but no answer came back (a timeout, a connection lost while
    reading): the script may have run and taken slots. The caller must treat the call as
    possibly counted and release it (releases are idempotent per call uuid)."""


class LimitsBackend(Protocol):
    """Shared concurrent-call and CPS limits (``Limiter`` in Redis, ``FailOpenLimiter``
    around it). Every method may raise :class:`LimitsUnavailable`."""

    def subjects_for(self, accept: Accept, catalog: LimitsCatalog) -> LimitPlan:
        """The plan of an accepted call (engine.state.limits.plan.plan_for)."""
        ...

    def acquire(
        self, call_uuid: str, plan: LimitPlan, hold_seconds: int, funds: FundsRequest | None = None
    ) -> LimitResult:
        """Check and take every limit of ``plan`` for the call (idempotent per uuid), and its
        funds reservation in the same step when ``funds`` is given (engine.state.funds).
        Raises :class:`LimitsAmbiguous` when the slots may have been taken."""
        ...

    def peek(self, plan: LimitPlan) -> LimitResult:
        """What :meth:`acquire` would answer now, taking nothing (``callgate explain``)."""
        ...

    def usage(self, plan: LimitPlan) -> list[LevelUsage]:
        """Current use of every subject of ``plan``."""
        ...

    def release(self, call_uuid: str) -> bool:
        """Stop counting the call; True if it was counted. Idempotent."""
        ...

    def release_many(self, call_uuids: Sequence[str]) -> int:
        """:meth:`release` for each call in one round trip; how many were counted."""
        ...

    def counted_calls(self) -> dict[str, float]:
        """Every counted call: uuid -> deadline (ms)."""
        ...

    def release_orphans(self, call_uuids: Iterable[str], grace_seconds: float) -> list[str]:
        """Release these calls except those admitted within ``grace_seconds``; the released."""
        ...
