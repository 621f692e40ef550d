"""The engine's decision step: the pure rules on the in-memory snapshot, then the shared limits.

A snapshot that Redis has not confirmed as current for longer than
engine.snapshot_max_age is not trusted (an account may have been blocked or
emptied meanwhile): such calls are answered ENGINE_DEGRADED (fail closed).
The limits step is the call's only Redis round trip (none when nothing in the
chain is limited).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from engine.decision import Accept, Decision, Reason, Reject
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.decide import DecisionContext, decide
from engine.state.limits import FailOpenLimiter, Limiter, LimitResult, LimitsUnavailable, apply_limits

LimitObserver = Callable[[LimitResult], None]
AcceptObserver = Callable[[Accept, Catalog, datetime], None]


class CatalogSource(Protocol):
    """What the decider needs of a snapshot holder (engine.state.watcher.SnapshotHolder)."""

    @property
    def loaded(self) -> bool: ...

    @property
    def current(self) -> tuple[int, Catalog]: ...

    def confirmed_age(self) -> float: ...


class Decider:
    def __init__(
        self,
        source: CatalogSource,
        rules: RulesConfig,
        *,
        max_age: float,
        limiter: Limiter | FailOpenLimiter | None = None,
        on_limit_result: LimitObserver | None = None,
        on_accept: AcceptObserver | None = None,
        rng: random.Random | None = None,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._source = source
        self._rules = rules
        self._max_age = max_age
        self._limiter = limiter
        self._on_limit_result = on_limit_result
        self._on_accept = on_accept
        self._rng = rng or random.Random()
        self._wallclock = wallclock

    def __call__(self, request: CallRequest, *, explain: bool = False) -> Decision:
        if not self._source.loaded:
            return Reject(Reason.ENGINE_DEGRADED, detail="no snapshot loaded")
        _version, catalog = self._source.current
        age = self._source.confirmed_age()
        if age > self._max_age:
            return Reject(Reason.ENGINE_DEGRADED, detail=f"snapshot unconfirmed for {age:.1f}s")
        now = self._wallclock()
        ctx = DecisionContext(now=now, rng=self._rng, config=self._rules, explain=explain)
        decision = decide(request, catalog, ctx)
        if isinstance(decision, Accept) and self._limiter is not None:
            decision = self._take_limits(request.uuid, decision, catalog)
        if isinstance(decision, Accept) and self._on_accept is not None and not explain:
            self._on_accept(decision, catalog, now)
        return decision

    def _take_limits(self, uuid: str, accept: Accept, catalog: Catalog) -> Decision:
        assert self._limiter is not None
        plan = self._limiter.subjects_for(accept, catalog)
        try:
            result = self._limiter.acquire(uuid, plan, accept.max_duration)
        except LimitsUnavailable as exc:
            return Reject(
                Reason.ENGINE_DEGRADED, account_id=accept.account_id, detail=f"limits unavailable: {exc}"
            )
        if self._on_limit_result is not None:
            self._on_limit_result(result)
        return apply_limits(accept, result)
