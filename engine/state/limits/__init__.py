"""Concurrent-call and CPS limits shared by every engine process and host (decision-rules §7).

The package, by job:

* :mod:`~engine.state.limits.plan` (pure): subjects, levels, plans, results and the
  admission rule; :func:`plan_for` reads a typed catalogue (:class:`LimitsCatalog`).
* :mod:`~engine.state.limits.backend`: the one :class:`LimitsBackend` protocol every
  user programs against, and the errors (:class:`LimitsUnavailable`,
  :class:`LimitsAmbiguous`).
* :mod:`~engine.state.limits.redis`: the Lua scripts and :class:`Limiter`, their client
  (the shared truth).
* :mod:`~engine.state.limits.failopen`: :class:`FailOpenLimiter`, the opt-in local
  approximation while Redis is unreachable.

What a refused result means for the call (its reject reason) is the decider's business
(``engine.decider``). The definitions of the channel and CPS limits, the clock and the
failure policy are written down in docs/state-and-limits.md.
"""

from engine.state.limits.backend import LimitsAmbiguous, LimitsBackend, LimitsUnavailable
from engine.state.limits.failopen import FailOpenLimiter
from engine.state.limits.plan import (
    WINDOW_MS,
    LevelKind,
    LevelUsage,
    LimitedEntity,
    LimitKind,
    LimitPlan,
    LimitResult,
    LimitsCatalog,
    SkippedTrunk,
    Subject,
    decide,
    plan_for,
)
from engine.state.limits.redis import Limiter

__all__ = [
    "WINDOW_MS",
    "FailOpenLimiter",
    "LevelKind",
    "LevelUsage",
    "LimitKind",
    "LimitPlan",
    "LimitResult",
    "LimitedEntity",
    "Limiter",
    "LimitsAmbiguous",
    "LimitsBackend",
    "LimitsCatalog",
    "LimitsUnavailable",
    "SkippedTrunk",
    "Subject",
    "decide",
    "plan_for",
]
