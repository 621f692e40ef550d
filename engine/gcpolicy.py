"""The engine's policy for CPython's cyclic garbage collector.

A call's garbage is freed by reference counting; the cyclic collector only finds the rare
cycle. Left at CPython's defaults it pauses the whole process (every call in it) for tens of
milliseconds whenever it walks the objects of the calls that are up: ~50 per call, so
10,000 calls up are half a million objects. Measured at 300 CPS with 1,500 calls up: p99
decision latency 21-141 ms with the defaults, 2.6-9 ms with this policy (docs/performance.md).

The policy:

* young collections after ``young_threshold`` net allocations instead of 700 (fewer, still
  short pauses: a young collection walks only the objects allocated since the last one);
* no automatic middle-generation collection (``middle_threshold`` 0, the default): CPython's
  middle collection walks every object that survived a young collection since the last
  middle one. With calls held for minutes those are the objects of every call started
  meanwhile that is still up: ~24 ms of CPU with 10,000 calls held, one every ~750 calls,
  the engine's largest pause of its own (docs/performance.md, "Round 4"). Survivors of
  young collections now stay in the middle generation, which nothing walks but the
  periodic full collection: exactly what ``gc.freeze()`` after each young collection would
  do, without the freeze's bookkeeping;
* a young collection every ``young_interval`` seconds as well, from a background greenlet.
  CPython's young threshold counts allocations *minus deallocations* of tracked objects, and
  a process in steady state (calls ending as fast as they start) frees about as many old
  objects as it allocates: the count then stays under the threshold for seconds while the
  young generation's list keeps every object allocated since (92,000-104,000 measured with
  10,000 calls held at 357 CPS), and the young collection that finally runs walks them all
  (p99 18-24 ms, max 42-50 ms of CPU; on the clock: under 0.6 ms, docs/performance.md
  "Round 6"). Collecting on a clock bounds the young generation by the allocation *rate*:
  ~90 surviving objects per call, a few hundred per collection at hundreds of calls per
  second, a fraction of a millisecond; the threshold stays as the backstop of a burst;
* no automatic full collection (it is what walks every call up), and a full collection
  every ``full_interval`` seconds from a background greenlet so that cyclic garbage cannot
  accumulate. The snapshot's catalogue is frozen (engine.state.snapshot) and never walked.

The engine's calls leave no cyclic garbage (tests/test_gcpolicy.py counts it per call), so
what the full collection finds is the rare cycle of a failure path.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

import gevent.event

log = logging.getLogger("callgate.gc")

# A threshold the collector never reaches in practice: no automatic collection of that
# generation (CPython counts collections of the younger generation against it).
NEVER = 1_000_000_000


def thresholds(
    young_threshold: int, middle_threshold: int, current: tuple[int, int, int]
) -> tuple[int, int, int]:
    """The collector's thresholds under the policy, from the ``current`` ones (pure).

    ``young_threshold`` 0 keeps ``current`` whole (CPython's defaults: the policy is off);
    ``middle_threshold`` 0 means no automatic middle collection, a negative one keeps the
    current middle threshold (CPython's 10)."""
    if young_threshold <= 0:
        return current
    middle = current[1] if middle_threshold < 0 else (middle_threshold or NEVER)
    return (young_threshold, middle, NEVER)


def apply(young_threshold: int, middle_threshold: int = -1) -> None:
    """Set the collector's thresholds (see :func:`thresholds`)."""
    gc.set_threshold(*thresholds(young_threshold, middle_threshold, gc.get_threshold()))


def full_collection(clock: Callable[[], float] = time.thread_time) -> tuple[int, float]:
    """One full collection: (unreachable objects found, CPU seconds it took)."""
    started = clock()
    found = gc.collect()
    return found, clock() - started


def run_young_collections(
    interval: float,
    stop: gevent.event.Event,
    collect: Callable[[int], int] = gc.collect,
) -> None:
    """A young collection every ``interval`` seconds until ``stop`` is set (see the module's
    docstring: the automatic one is triggered by a net count that steady state keeps low)."""
    while not stop.wait(interval):
        collect(0)


def run_full_collections(
    interval: float,
    stop: gevent.event.Event,
    collect: Callable[[], tuple[int, float]] = full_collection,
) -> None:
    """A full collection every ``interval`` seconds until ``stop`` is set."""
    while not stop.wait(interval):
        found, seconds = collect()
        log.info("full garbage collection: %d unreachable objects in %.1f ms of CPU", found, seconds * 1000)
