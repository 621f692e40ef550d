"""The engine's side of the shared limits: build the limiter, batch the releases, background jobs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import gevent
import gevent.event
import gevent.lock
import redis

from engine.billing.funds import Funds
from engine.config import Config, LimitsSettings, parse_switch_address
from engine.metrics import EngineMetrics
from engine.reconcile import ReconcileReport, SwitchAddress, reconcile
from engine.recount import Recounter
from engine.state.direct import DirectConnections
from engine.state.limits import FailOpenLimiter, Limiter, LimitResult, LimitsBackend, LimitsUnavailable

log = logging.getLogger("callgate.limits")

RESYNC_INTERVAL = 1.0
RELEASE_WINDOW = 0.01  # seconds a release batch gathers after its first call end (see the class)
RELEASE_BATCH_MAX = 256  # a batch this large is sent without waiting for the window
RELEASE_RETRY_DELAY = 1.0  # seconds before the releases of a failed batch are sent again
RELEASE_RETRY_FOR = 300.0  # seconds a release keeps being retried before it is left to the deadline
RELEASE_RETRY_MAX = 100_000  # releases waiting for a retry; beyond, the oldest are left to their deadline


def switch_addresses(settings: LimitsSettings) -> list[SwitchAddress]:
    return [
        SwitchAddress(host, port, settings.switch_password)
        for host, port in map(parse_switch_address, settings.switches)
    ]


def build_limiter(
    config: Config, client: redis.Redis, metrics: EngineMetrics, direct: DirectConnections | None = None
) -> LimitsBackend:
    limiter = Limiter(
        client,
        config.redis.key_prefix,
        margin_seconds=config.limits.margin_seconds,
        timer=metrics.redis_call,
        direct=direct,
    )
    if not config.limits.fail_open:
        return limiter
    return FailOpenLimiter(
        limiter,
        local_share=config.limits.local_share,
        on_degraded=lambda outcome: metrics.fail_open_decisions.labels(outcome).inc(),
    )


def limit_result_observer(metrics: EngineMetrics) -> Callable[[LimitResult], None]:
    def observe(result: LimitResult) -> None:
        if result.level is not None and result.kind is not None:
            metrics.limit_rejection(result.level.value, result.kind.value)
        for skipped in result.skipped:
            metrics.limit_rejection("trunk", str(skipped.kind))

    return observe


class ReleaseBatcher:
    """Releases calls' slots at their end in batches: one pipelined round trip per window.

    ``release`` only queues the uuid; ``run`` (a background greenlet) waits for the first
    one, gathers for ``window`` seconds (or until ``max_batch`` are queued) and releases
    them with ``limiter.release_many``. A slot is held a few milliseconds longer, which the
    limits cannot notice. ``flush`` releases what is still queued at shutdown.

    A batch that fails because Redis did not answer is sent again every ``retry_delay``
    seconds for up to ``retry_for`` seconds (releases are idempotent per call uuid), so
    a Redis stall does not hold slots until their deadline: this matters most for the
    calls whose acquire timed out (they were refused, but the script may have taken
    their slots). After ``retry_for``, or beyond ``retry_max`` waiting releases, they are
    left to the slots' deadlines and the reconciler. Any other failure is logged and
    not retried.
    """

    def __init__(
        self,
        limiter: LimitsBackend,
        *,
        window: float = RELEASE_WINDOW,
        max_batch: int = RELEASE_BATCH_MAX,
        retry_delay: float = RELEASE_RETRY_DELAY,
        retry_for: float = RELEASE_RETRY_FOR,
        retry_max: int = RELEASE_RETRY_MAX,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.window = window
        self.max_batch = max_batch
        self.retry_delay = retry_delay
        self.retry_for = retry_for
        self.retry_max = retry_max
        self._monotonic = monotonic
        self._queue: list[str] = []
        self._retry: dict[str, float] = {}  # uuid -> when to give up; insertion order = age
        self._retry_at = 0.0  # when the releases in _retry are next sent
        self._give_up: dict[str, float] = {}  # the retried releases now queued again
        self._work = gevent.event.Event()  # set while the queue is not empty
        self._full = gevent.event.Event()  # set while a whole batch is queued
        self._sending = gevent.lock.Semaphore()  # flush() waits for the batch in flight

    def release(self, call_uuid: str) -> None:
        """Queue a call's release (never blocks, never raises)."""
        self._queue.append(call_uuid)
        self._work.set()
        if len(self._queue) >= self.max_batch:
            self._full.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def retrying(self) -> int:
        """Releases waiting to be sent again after a failed batch."""
        return len(self._retry)

    def run(self, stop: gevent.event.Event) -> None:
        while not stop.is_set():
            gevent.wait([self._work, stop], count=1, timeout=self._until_retry())
            if stop.is_set():
                return  # what is left is for flush()
            self._requeue_due()
            if not self._queue:
                continue
            self._full.wait(self.window)
            try:
                with self._sending:
                    self._send(self._take())
            except Exception:  # the loop must outlive any bug: the next call end wakes it again
                log.exception("limits release loop error")

    def flush(self) -> None:
        """Release everything queued now (and what waits for a retry), synchronously."""
        with self._sending:
            self._requeue_due(force=True)
            while self._queue:
                self._send(self._take(), retry=False)

    def _until_retry(self) -> float | None:
        if not self._retry:
            return None
        return max(0.0, self._retry_at - self._monotonic())

    def _requeue_due(self, *, force: bool = False) -> None:
        """Queue again the releases whose retry is due (all of them when ``force``)."""
        if not self._retry or (not force and self._monotonic() < self._retry_at):
            return
        now = self._monotonic()
        due = [u for u, give_up in self._retry.items() if give_up > now]
        expired = len(self._retry) - len(due)
        if expired:
            log.warning("limits release of %d calls given up; their slots expire at their deadline", expired)
        self._give_up.update((u, self._retry[u]) for u in due)  # kept while they are queued again
        self._retry.clear()
        for call_uuid in due:
            self.release(call_uuid)

    def _take(self) -> list[str]:
        batch = self._queue[: self.max_batch]
        del self._queue[: self.max_batch]
        if not self._queue:
            self._work.clear()
        if len(self._queue) < self.max_batch:
            self._full.clear()
        return batch

    def _send(self, batch: list[str], *, retry: bool = True) -> None:
        if not batch:
            return
        try:
            self.limiter.release_many(batch)
        except (LimitsUnavailable, redis.RedisError) as exc:
            if retry:
                log.warning("limits release of %d calls failed (%s); retrying", len(batch), exc)
                self._hold_for_retry(batch)
            else:
                log.warning(
                    "limits release of %d calls failed (%s); their slots expire at their deadline",
                    len(batch),
                    exc,
                )
        except Exception:
            log.exception("limits release of %d calls failed unexpectedly", len(batch))
        finally:
            for call_uuid in batch:
                self._give_up.pop(call_uuid, None)

    def _hold_for_retry(self, batch: list[str]) -> None:
        now = self._monotonic()
        for call_uuid in batch:
            self._retry[call_uuid] = self._give_up.get(call_uuid, now + self.retry_for)
        while len(self._retry) > self.retry_max:
            del self._retry[next(iter(self._retry))]  # the oldest: left to its deadline
        self._retry_at = now + self.retry_delay


def run_resync(limiter: FailOpenLimiter, stop: gevent.event.Event) -> None:
    """Fail-open mode: once Redis answers again, register the calls admitted locally."""
    while not stop.wait(RESYNC_INTERVAL):
        if not limiter.pending_resync:
            continue
        try:
            if limiter.limiter.ping():
                restored = limiter.resync()
                log.info("Redis is back: %d locally admitted calls registered in the shared limits", restored)
        except (LimitsUnavailable, redis.RedisError) as exc:
            log.debug("resync postponed: %s", exc)


def run_reconciler(
    limiter: LimitsBackend,
    switches: list[SwitchAddress],
    interval: float,
    metrics: EngineMetrics,
    stop: gevent.event.Event,
    release_funds: Callable[[list[str]], object] | None = None,
    reserved_calls: Callable[[], Iterable[str]] | None = None,
    recounter: Recounter | None = None,
) -> None:
    while not stop.wait(interval):
        report = reconcile(
            limiter, switches, release_funds=release_funds, reserved_calls=reserved_calls, recounter=recounter
        )
        log_report(report)
        metrics.reconciler_removals.inc(len(report.released))
        metrics.reconciler_recounts.inc(len(report.recounted))


def recounter_for(limiter: LimitsBackend, funds: Funds | None, ticket_keys: tuple[bytes, ...]) -> Recounter:
    """The re-counting of lost acquires, on the Redis limiter (a fail-open wrapper's own)."""
    redis_limiter = limiter.limiter if isinstance(limiter, FailOpenLimiter) else limiter
    if not isinstance(redis_limiter, Limiter):
        raise TypeError(f"cannot re-count with {type(redis_limiter).__name__}")
    return Recounter(redis_limiter, funds, ticket_keys=ticket_keys)


def log_report(report: ReconcileReport) -> None:
    if not report.ran:
        log.warning("reconciliation skipped: %s", "; ".join(report.errors) or "no data")
        return
    if report.released:
        log.warning("reconciliation released %d counted calls no switch knows", len(report.released))
    if report.recounted:
        log.warning(
            "reconciliation re-counted %d live calls the registry lacked (acquires lost, e.g. in a "
            "Redis failover)",
            len(report.recounted),
        )
    if report.errors:
        log.warning("reconciliation incomplete: %s", "; ".join(report.errors))
    if not report.released and not report.recounted:
        log.info("reconciliation: %d counted calls, all live", report.counted)
