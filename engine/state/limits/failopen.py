"""Opt-in fail-open for the limits only (decision-rules §9).

:class:`FailOpenLimiter` wraps the Redis :class:`~engine.state.limits.redis.Limiter`:
Redis decides while it answers; while it does not, a per-process approximation does
(the rule of ``engine.state.limits.plan`` over this process's own counts), every such
decision is counted, and :meth:`FailOpenLimiter.resync` re-registers the locally
admitted calls still up once Redis is back.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from engine.decision import Accept
from engine.state.funds import FundsRequest
from engine.state.limits.backend import LimitsAmbiguous, LimitsUnavailable
from engine.state.limits.plan import (
    WINDOW_MS,
    LevelUsage,
    LimitKind,
    LimitPlan,
    LimitResult,
    LimitsCatalog,
    Subject,
    decide,
)
from engine.state.limits.redis import Limiter

__all__ = ["FailOpenLimiter"]


@dataclass(slots=True)
class _LocalCall:
    levels: tuple[Subject, ...]  # limited mandatory levels
    trunk: Subject | None  # the trunk the call is counted on, if limited
    deadline: float  # monotonic seconds
    local: bool  # admitted by the approximation: not in Redis until resync


class FailOpenLimiter:
    """Opt-in fail-open for limits only (§9): Redis decides while it answers; while it does
    not, a per-process approximation does, and every such decision is counted.

    The approximation counts this process's own live calls per subject (every call it
    admitted, through Redis or locally, until released or past its deadline) and its own
    admissions per subject in the last 1000 ms, against each limit times ``local_share``
    (set it to 1/N with N engine processes to split the limits; rounded up, at least 1).
    Calls counted by other processes or hosts are invisible to it.

    After a Redis failure, Redis is not asked again for ``retry_after`` seconds (so an
    outage costs one timeout per interval, not one per call). When Redis answers again,
    the engine calls :meth:`resync` off the hot path: the calls admitted locally that
    are still up are registered in Redis (one script call each), and the releases that
    failed during the outage are replayed. ``pending_resync`` says when that is needed.

    ``degraded_decisions`` counts decisions taken locally; ``on_degraded(outcome)`` is
    called with "admitted" or "refused" for each, for the metrics.
    """

    def __init__(
        self,
        limiter: Limiter,
        *,
        retry_after: float = 1.0,
        local_share: float = 1.0,
        on_degraded: Callable[[str], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < local_share <= 1:
            raise ValueError("local_share must be in (0, 1]")
        self.limiter = limiter
        self.retry_after = retry_after
        self.local_share = local_share
        self.on_degraded = on_degraded
        self.degraded_decisions = 0
        self._monotonic = monotonic
        self._lock = threading.Lock()  # a gevent lock once monkey-patched
        self._down_until = 0.0
        self._calls: dict[str, _LocalCall] = {}
        self._live: dict[str, dict[str, float]] = {}  # channel key -> uuid -> deadline
        self._admissions: dict[str, collections.deque[float]] = {}  # cps key -> times
        self._pending_releases: set[str] = set()

    # -- delegation ------------------------------------------------------------

    def subjects_for(self, accept: Accept, catalog: LimitsCatalog) -> LimitPlan:
        return self.limiter.subjects_for(accept, catalog)

    def peek(self, plan: LimitPlan) -> LimitResult:
        """Redis's answer (explain asks Redis even while calls are decided locally)."""
        return self.limiter.peek(plan)

    def usage(self, plan: LimitPlan) -> list[LevelUsage]:
        return self.limiter.usage(plan)

    def counted_calls(self) -> dict[str, float]:
        return self.limiter.counted_calls()

    def release_orphans(self, call_uuids: Iterable[str], grace_seconds: float) -> list[str]:
        released = self.limiter.release_orphans(call_uuids, grace_seconds)
        with self._lock:
            for call_uuid in released:
                if call_uuid in self._calls and not self._calls[call_uuid].local:
                    self._forget(call_uuid)
        return released

    # -- state -----------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while Redis is considered down (decisions are local)."""
        return self._monotonic() < self._down_until

    @property
    def pending_resync(self) -> int:
        """Locally admitted calls and failed releases waiting for :meth:`resync`."""
        with self._lock:
            return sum(1 for c in self._calls.values() if c.local) + len(self._pending_releases)

    def _trip(self) -> None:
        self._down_until = self._monotonic() + self.retry_after

    # -- hot path --------------------------------------------------------------

    def acquire(
        self, call_uuid: str, plan: LimitPlan, hold_seconds: int, funds: FundsRequest | None = None
    ) -> LimitResult:
        if funds is not None:
            # Funds are never approximated locally (decision-rules §9: fail-open is for limits
            # only): Redis unreachable raises, and the call is answered ENGINE_DEGRADED.
            result = self.limiter.acquire(call_uuid, plan, hold_seconds, funds)
            if result.admitted and not result.duplicate:
                self._record(call_uuid, plan, result, hold_seconds, local=False)
            return result
        if not plan.limited:
            return LimitResult(admitted=True, trunk_ids=plan.trunk_ids)
        if not self.degraded:
            try:
                result = self.limiter.acquire(call_uuid, plan, hold_seconds)
            except LimitsAmbiguous:
                # Redis may have taken slots for this call: release them there once it
                # answers (resync replays releases before it registers local calls).
                self._trip()
                with self._lock:
                    self._pending_releases.add(call_uuid)
            except LimitsUnavailable:
                self._trip()
            else:
                if result.admitted and not result.duplicate:
                    self._record(call_uuid, plan, result, hold_seconds, local=False)
                return result
        result = self._decide_locally(call_uuid, plan, hold_seconds)
        with self._lock:
            self.degraded_decisions += 1
        if self.on_degraded is not None:
            self.on_degraded("admitted" if result.admitted else "refused")
        return result

    def release(self, call_uuid: str) -> bool:
        with self._lock:
            call = self._forget(call_uuid)
        if call is not None and call.local:
            return True
        if self.degraded:
            with self._lock:
                self._pending_releases.add(call_uuid)
            return call is not None
        try:
            return self.limiter.release(call_uuid)
        except LimitsUnavailable:
            self._trip()
            with self._lock:
                self._pending_releases.add(call_uuid)
            return call is not None

    def release_many(self, call_uuids: Sequence[str]) -> int:
        """:meth:`release` for each call (returns how many were counted), with the calls
        Redis must hear about sent in one :meth:`Limiter.release_many` round trip."""
        counted = 0
        remote: list[str] = []
        known = 0  # calls in ``remote`` that this process admitted through Redis
        with self._lock:
            for call_uuid in call_uuids:
                call = self._forget(call_uuid)
                if call is not None and call.local:
                    counted += 1
                    continue
                remote.append(call_uuid)
                known += call is not None
        if not remote:
            return counted
        if not self.degraded:
            try:
                return counted + self.limiter.release_many(remote)
            except LimitsUnavailable:
                self._trip()
        with self._lock:
            self._pending_releases.update(remote)
        return counted + known

    def resync(self, live_calls: Iterable[str] | None = None) -> int:
        """Register in Redis the locally admitted calls still up (all of them, or only
        those in ``live_calls``) and replay failed releases. Raises LimitsUnavailable if
        Redis is still down (what was not done stays pending). Returns the number of
        calls registered."""
        live = None if live_calls is None else set(live_calls)
        now = self._monotonic()
        with self._lock:
            pending = sorted(self._pending_releases)
            local = [(u, c) for u, c in self._calls.items() if c.local]
        if not pending and not local:
            return 0
        try:
            for call_uuid in pending:
                self.limiter.release(call_uuid)
                with self._lock:
                    self._pending_releases.discard(call_uuid)
            registered = 0
            for call_uuid, call in local:
                if (live is not None and call_uuid not in live) or call.deadline <= now:
                    with self._lock:
                        self._forget(call_uuid)
                    continue
                remaining_ms = round((call.deadline - now) * 1000)
                self.limiter.register(call_uuid, call.levels, remaining_ms, call.trunk)
                with self._lock:
                    if call_uuid in self._calls:
                        self._calls[call_uuid].local = False
                registered += 1
        except LimitsUnavailable:
            self._trip()
            raise
        self._down_until = 0.0
        return registered

    # -- the local approximation -----------------------------------------------

    def _local_limit(self, limit: int) -> int:
        return max(1, math.ceil(limit * self.local_share))

    def _full_locally(self, subject: Subject, now: float) -> LimitKind | None:
        if subject.max_channels > 0:
            calls = self._live.get(self.limiter.channels_key(subject))
            if calls:
                for call_uuid in [u for u, d in calls.items() if d <= now]:
                    del calls[call_uuid]
                if len(calls) >= self._local_limit(subject.max_channels):
                    return LimitKind.CHANNELS
        if subject.cps > 0:
            times = self._admissions.get(self.limiter.cps_key(subject))
            if times:
                while times and times[0] <= now - WINDOW_MS / 1000:
                    times.popleft()
                if len(times) >= self._local_limit(subject.cps):
                    return LimitKind.CPS
        return None

    def _decide_locally(self, call_uuid: str, plan: LimitPlan, hold_seconds: int) -> LimitResult:
        now = self._monotonic()
        with self._lock:
            if call_uuid in self._calls:
                call = self._calls[call_uuid]
                counted = call.trunk.id if call.trunk else None
                return LimitResult(
                    admitted=True,
                    trunk_ids=plan.trunk_ids,
                    counted_trunk_id=counted,
                    degraded=True,
                    duplicate=True,
                )
            result = decide(plan, lambda subject: self._full_locally(subject, now), degraded=True)
            if not result.admitted:
                return result
            self._record_locked(call_uuid, plan, result, hold_seconds, local=True, now=now)
            return result

    def _record(
        self, call_uuid: str, plan: LimitPlan, result: LimitResult, hold_seconds: int, *, local: bool
    ) -> None:
        with self._lock:
            self._record_locked(call_uuid, plan, result, hold_seconds, local=local, now=self._monotonic())

    def _record_locked(
        self,
        call_uuid: str,
        plan: LimitPlan,
        result: LimitResult,
        hold_seconds: int,
        *,
        local: bool,
        now: float,
    ) -> None:
        deadline = now + self.limiter.hold_ms(hold_seconds) / 1000
        levels = tuple(s for s in plan.levels if s.limited)
        trunk = next((t for t in plan.trunks if t.id == result.counted_trunk_id), None)
        for subject in (*levels, *((trunk,) if trunk is not None else ())):
            if subject.max_channels > 0:
                self._live.setdefault(self.limiter.channels_key(subject), {})[call_uuid] = deadline
            if subject.cps > 0:
                times = self._admissions.setdefault(self.limiter.cps_key(subject), collections.deque())
                times.append(now)
                while times and times[0] <= now - WINDOW_MS / 1000:
                    times.popleft()
        channel_trunk = trunk if trunk is not None and trunk.max_channels > 0 else None
        self._calls[call_uuid] = _LocalCall(levels, channel_trunk, deadline, local)
        if len(self._calls) % 1024 == 0:
            self._sweep(now)

    def _forget(self, call_uuid: str) -> _LocalCall | None:
        call = self._calls.pop(call_uuid, None)
        if call is None:
            return None
        for subject in (*call.levels, *((call.trunk,) if call.trunk is not None else ())):
            key = self.limiter.channels_key(subject)
            calls = self._live.get(key)
            if calls is not None:
                calls.pop(call_uuid, None)
                if not calls:
                    del self._live[key]
        return call

    def _sweep(self, now: float) -> None:
        """Drop calls past their deadline (their release was never seen)."""
        for call_uuid in [u for u, c in self._calls.items() if c.deadline <= now]:
            self._forget(call_uuid)
        for key in [k for k, times in self._admissions.items() if not times or times[-1] <= now - 1]:
            del self._admissions[key]
