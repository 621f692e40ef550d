"""Work that can wait for the calls: run it when the hub has nothing else to do, a bounded time late.

A call waits for the CPU in the hub's queue behind whatever else is ready. Near saturation that
queue, not the work of the call itself, makes the decision's tail (docs/performance.md, round 7).
The hangup side's work (a hungup call's settlement: parsing the hangup, rating, the CDR, the
settle script's arguments) decides nothing and nobody waits for it, so it waits for the hub to
be idle first: libev runs an idle watcher only in a loop iteration with no other event pending
(sockets, timers). A busy hub is never idle, so the wait is bounded: ``bound`` seconds late at
most, the work runs whatever the load, and no queue grows without end.
"""

from __future__ import annotations

import gevent


def wait_for_idle(bound: float) -> bool:
    """Wait until the hub is idle, or ``bound`` seconds at most; True if it was idle.

    ``bound`` <= 0 returns at once (False): the deferral is off."""
    if bound <= 0:
        return False
    with gevent.Timeout(bound, False):
        gevent.idle()
        return True
    return False
