"""The engine's decision step: the pure rules on the in-memory snapshot, then the shared limits.

A snapshot that Redis has not confirmed as current for longer than
engine.snapshot_max_age is not trusted (an account may have been blocked or
emptied meanwhile): such calls are answered ENGINE_DEGRADED (fail closed).
While the engine loads the next version of a held snapshot (a full switch: a
bulk import, a flushed Redis; a minute or two at a million rates), the held one
was current until that version appeared and Redis answered the load: it is
trusted up to engine.snapshot_switch_max_age instead (:func:`snapshot_distrust`).
The limits step is the call's only Redis round trip (none when nothing in the
chain is limited).

What a limit refusal means for the call is decided here (:func:`limit_reason`,
:func:`apply_limits`): a full account, reseller or DID is CONCURRENT_LIMIT or
CPS_LIMIT; every candidate trunk full is TERMINATION_RATE_NOT_FOUND ("no route
left", decision-rules §6).

With ``funds`` (accounting, issue 13) the limits step also reserves the call's funds, in the
same script and round trip (engine.billing.live.reservation_for): every chain level at the
price it pays, for the duration the rules allow. The admitted call gets the duration the
reservation covers (``max_duration``, rendered into ``sched_hangup +N``), so no set of
concurrent calls can cost more than an account's available funds; a level that cannot pay
is NO_SUFFICIENT_FUND (nothing taken).

``explain=True`` runs the same steps without taking anything: the limits are
*peeked* (the same rule over the same counts, nothing written), so ``callgate
explain`` answers what the engine would answer.
"""

from __future__ import annotations

import dataclasses
import operator
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from engine.billing.funds import Funds
from engine.billing.live import priced, reservation_for
from engine.decision import Accept, Decision, Reason, Reject, Route, Step
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.decide import DecisionContext, decide
from engine.state.limits import LimitKind, LimitResult, LimitsAmbiguous, LimitsBackend, LimitsUnavailable

LimitObserver = Callable[[LimitResult], None]
AcceptObserver = Callable[[Accept, Catalog, datetime], None]
ReleaseLater = Callable[[str], None]


class CatalogSource(Protocol):
    """What the decider needs of a snapshot holder (engine.state.watcher.SnapshotHolder)."""

    @property
    def loaded(self) -> bool: ...

    @property
    def current(self) -> tuple[int, Catalog]: ...

    def confirmed_age(self) -> float: ...

    @property
    def switching_since(self) -> float | None: ...


def snapshot_distrust(source: CatalogSource, max_age: float, switch_max_age: float) -> str | None:
    """Why the held snapshot must not be decided from (None: it may).

    ``max_age`` bounds the time since Redis last confirmed the held snapshot; while its
    successor is being loaded, ``switch_max_age`` does (the held version serves until the
    new one is swapped in whole, as a full switch promises; a failed load ends the grace).
    """
    if not source.loaded:
        return "no snapshot loaded"
    age = source.confirmed_age()
    if age <= max_age:
        return None
    if source.switching_since is not None and age <= switch_max_age:
        return None
    return f"snapshot unconfirmed for {age:.1f}s"


def limit_reason(result: LimitResult) -> Reason | None:
    """The reject reason of a refused limits result (None when admitted)."""
    if result.admitted:
        return None
    if result.funds_level is not None:
        return Reason.NO_SUFFICIENT_FUND  # open calls hold the rest of the funds (engine.state.funds)
    if result.level is None:
        return Reason.TERMINATION_RATE_NOT_FOUND  # every candidate trunk is full (§6)
    return Reason.CPS_LIMIT if result.kind is LimitKind.CPS else Reason.CONCURRENT_LIMIT


def apply_limits(accept: Accept, result: LimitResult) -> Decision:
    """The decision after the limits: the Accept with full trunks dropped, or a Reject."""
    step = Step("limits", result.detail)
    reason = limit_reason(result)
    if reason is None:
        routes = accept.routes
        if result.trunk_ids != tuple([r.trunk_id for r in routes]):
            keep = set(result.trunk_ids)
            routes = tuple([r for r in routes if r.trunk_id in keep])
        return _replaced(accept, routes, (*accept.steps, step))
    return Reject(
        reason=reason, account_id=accept.account_id, detail=result.detail, steps=(*accept.steps, step)
    )


_ACCEPT_FIELDS = tuple(field.name for field in dataclasses.fields(Accept))
_accept_values = operator.attrgetter(*_ACCEPT_FIELDS)


def _replaced(accept: Accept, routes: tuple[Route, ...], steps: tuple[Step, ...]) -> Accept:
    """``dataclasses.replace(accept, routes=routes, steps=steps)``, without its loop over the
    fields in Python (every accepted call goes through here)."""
    if type(accept) is not Accept:  # a subclass may have fields of its own
        return dataclasses.replace(accept, routes=routes, steps=steps)
    values = dict(zip(_ACCEPT_FIELDS, _accept_values(accept), strict=True))
    values["routes"] = routes
    values["steps"] = steps
    return Accept(**values)


class Decider:
    """``limiter``: the shared limits (None: no limits). ``release_later(uuid)``: queues a
    release for a call whose acquire may have taken slots although it failed (a timeout
    after the request was sent); the call is refused ENGINE_DEGRADED all the same."""

    def __init__(
        self,
        source: CatalogSource,
        rules: RulesConfig,
        *,
        max_age: float,
        switch_max_age: float = 0.0,
        limiter: LimitsBackend | None = None,
        on_limit_result: LimitObserver | None = None,
        on_accept: AcceptObserver | None = None,
        release_later: ReleaseLater | None = None,
        funds: Funds | None = None,
        rng: random.Random | None = None,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._source = source
        self._rules = rules
        self._max_age = max_age
        self._switch_max_age = max(max_age, switch_max_age)
        self._limiter = limiter
        self._on_limit_result = on_limit_result
        self._on_accept = on_accept
        self._release_later = release_later
        self._funds = funds
        self._rng = rng or random.Random()
        self._wallclock = wallclock

    def __call__(self, request: CallRequest, *, explain: bool = False) -> Decision:
        distrust = snapshot_distrust(self._source, self._max_age, self._switch_max_age)
        if distrust is not None:
            return Reject(Reason.ENGINE_DEGRADED, detail=distrust)
        _version, catalog = self._source.current
        now = self._wallclock()
        ctx = DecisionContext(now=now, rng=self._rng, config=self._rules, explain=explain)
        decision = decide(request, catalog, ctx)
        if isinstance(decision, Accept) and self._limiter is not None:
            if explain:
                decision = self._peek_limits(self._limiter, decision, catalog)
            else:
                decision = self._take_limits(self._limiter, request.uuid, decision, catalog, now)
        if isinstance(decision, Accept) and self._on_accept is not None and not explain:
            self._on_accept(decision, catalog, now)
        return decision

    def _take_limits(
        self, limiter: LimitsBackend, uuid: str, accept: Accept, catalog: Catalog, now: datetime
    ) -> Decision:
        plan = limiter.subjects_for(accept, catalog)
        funds = self._funds
        pricing, reservation = reservation_for(funds, accept, catalog) if funds is not None else (None, None)
        try:
            if reservation is None:
                result = limiter.acquire(uuid, plan, accept.max_duration)
            else:
                result = limiter.acquire(uuid, plan, accept.max_duration, reservation)
        except LimitsUnavailable as exc:
            if isinstance(exc, LimitsAmbiguous) and self._release_later is not None:
                self._release_later(uuid)  # the script may have run: free what it took
            return Reject(
                Reason.ENGINE_DEGRADED, account_id=accept.account_id, detail=f"limits unavailable: {exc}"
            )
        if self._on_limit_result is not None:
            self._on_limit_result(result)
        decision = apply_limits(accept, result)
        if pricing is not None and isinstance(decision, Accept):
            return priced(decision, pricing, result.granted_seconds, now)
        return decision

    @staticmethod
    def _peek_limits(limiter: LimitsBackend, accept: Accept, catalog: Catalog) -> Decision:
        try:
            result = limiter.peek(limiter.subjects_for(accept, catalog))
        except LimitsUnavailable as exc:
            return Reject(
                Reason.ENGINE_DEGRADED, account_id=accept.account_id, detail=f"limits unavailable: {exc}"
            )
        return apply_limits(accept, result)
