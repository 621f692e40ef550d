"""The engine's side of the shared limits: build the limiter from config, release, background jobs."""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent
import gevent.event
import redis

from engine.config import Config, LimitsSettings, parse_switch_address
from engine.metrics import EngineMetrics
from engine.reconcile import ReconcileReport, SwitchAddress, reconcile
from engine.state.limits import FailOpenLimiter, Limiter, LimitResult, LimitsUnavailable

log = logging.getLogger("callgate.limits")

RESYNC_INTERVAL = 1.0


def switch_addresses(settings: LimitsSettings) -> list[SwitchAddress]:
    return [
        SwitchAddress(host, port, settings.switch_password)
        for host, port in map(parse_switch_address, settings.switches)
    ]


def build_limiter(config: Config, client: redis.Redis, metrics: EngineMetrics) -> Limiter | FailOpenLimiter:
    limiter = Limiter(
        client, config.redis.key_prefix, margin_seconds=config.limits.margin_seconds, timer=metrics.redis_call
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


def releaser(limiter: Limiter | FailOpenLimiter, metrics: EngineMetrics) -> Callable[[str], None]:
    """Release a call's slots at its end; a failure is left to the deadline and the reconciler."""

    def release(call_uuid: str) -> None:
        try:
            limiter.release(call_uuid)
        except (LimitsUnavailable, redis.RedisError) as exc:
            log.warning(
                "uuid=%s limits release failed (%s); the slot expires at its deadline", call_uuid, exc
            )

    return release


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
    limiter: Limiter | FailOpenLimiter,
    switches: list[SwitchAddress],
    interval: float,
    metrics: EngineMetrics,
    stop: gevent.event.Event,
) -> None:
    while not stop.wait(interval):
        report = reconcile(limiter, switches)
        log_report(report)
        metrics.reconciler_removals.inc(len(report.released))


def log_report(report: ReconcileReport) -> None:
    if not report.ran:
        log.warning("reconciliation skipped: %s", "; ".join(report.errors) or "no data")
    elif report.released:
        log.warning("reconciliation released %d counted calls no switch knows", len(report.released))
    else:
        log.info("reconciliation: %d counted calls, all live", report.counted)
