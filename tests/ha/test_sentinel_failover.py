"""Redis Sentinel failover under load: a real `callgate serve`, a primary, a replica, three sentinels.

The primary is killed with SIGKILL while calls arrive. What must hold (issue 17):
- the engine follows the failover with no restart: calls are accepted again within seconds;
- meanwhile calls are refused ENGINE_DEGRADED, never bridged unchecked: every call bridged after
  the kill is seen in the new primary's registry of counted calls (its limits script ran there);
- one reconciliation with the switch's live channels leaves the registry equal to them, whether
  the failover lost releases (calls counted that have ended) or acquires (live calls uncounted).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import gevent
import gevent.event
import psycopg
import pytest
import redis

from engine.state.keys import (
    cdr_stream,
    funds_account_key,
    funds_amounts_key,
    funds_reservations_key,
    limits_channels_key,
    limits_registry_key,
)
from loadtest.chaos.cluster import zset_members
from loadtest.fsemu import CallResult, InboundServer, Switch, place_call
from tests.ha.sentinel import SentinelCluster
from tests.support import EngineProcess, engine_environment, prepare_database, publish, run_cli, wait_until
from tests.test_limits_e2e import CATALOGUE, spec

pytestmark = pytest.mark.slow


@dataclass
class Placed:
    started: float
    outcome: str
    uuid: str


def outcome(result: CallResult) -> str:
    if result.error is not None:
        return f"error: {result.error}"
    return "BRIDGED" if result.bridged_target else result.variables.get("callgate_reason", "?")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    started = SentinelCluster(tmp_path).start()
    yield started
    started.stop()


def hash_int(client: redis.Redis, key: str, field: str) -> int:
    value = client.hget(key, field)
    assert value is not None, (key, field)
    return int(value)


def sentinel_environment(
    module_pg_url: str, module_key_prefix: str, cluster: SentinelCluster
) -> dict[str, str]:
    return engine_environment(
        module_pg_url,
        "redis://127.0.0.1:1/0",  # host and port unused with sentinels: only the db number counts
        module_key_prefix,
        CALLGATE_REDIS__SENTINELS=cluster.sentinels,
        CALLGATE_REDIS__SERVICE_NAME="callgate",
        CALLGATE_REDIS__SOCKET_TIMEOUT="1",
        CALLGATE_ENGINE__DECISION_DEADLINE="3",
    )


def test_the_engine_follows_a_failover_and_bridges_nothing_unchecked(
    module_pg_url: str, module_key_prefix: str, cluster: SentinelCluster, tmp_path: Path
) -> None:
    env = sentinel_environment(module_pg_url, module_key_prefix, cluster)
    prepare_database(module_pg_url, CATALOGUE)
    publish(env)  # through the sentinels, to the primary
    registry = limits_registry_key(module_key_prefix)
    switch = Switch()
    engine = EngineProcess(env).start(tmp_path / "serve.log")
    placed: list[Placed] = []
    seen: set[str] = set()  # every uuid ever counted in the registry of the current primary
    stop = gevent.event.Event()

    def caller() -> None:
        while not stop.is_set():
            call = spec("fifty", 1.5)
            started = time.monotonic()
            result = place_call("127.0.0.1", engine.port, call, timeout=15, switch=switch)
            placed.append(Placed(started, outcome(result), call.uuid))
            if result.bridged_target is None:
                gevent.sleep(0.05)

    def sampler() -> None:
        while not stop.is_set():
            port = cluster.primary()
            if port is not None and port in cluster.processes and cluster.processes[port].poll() is None:
                with contextlib.suppress(redis.RedisError):  # the primary may die mid-read
                    seen.update(zset_members(cluster.client(port), registry))
            gevent.sleep(0.1)

    with InboundServer(switch, host="127.0.0.1") as inbound:
        try:
            workers = [gevent.spawn(caller) for _ in range(6)] + [gevent.spawn(sampler)]
            gevent.sleep(4)
            old_primary = cluster.primary_port
            killed_at = time.monotonic()
            cluster.kill(old_primary)
            wait_until(lambda: cluster.primary() == cluster.replica_port, timeout=30, interval=0.1,
                       what="the sentinels promoting the replica")  # fmt: skip
            promoted_after = time.monotonic() - killed_at
            gevent.sleep(8)  # steady load on the new primary
            stop.set()
            gevent.joinall(workers, timeout=30, raise_error=True)
        finally:
            stop.set()
        # A few calls stay up, then one reconciliation: the registry equals the live channels.
        held = [
            gevent.spawn(place_call, "127.0.0.1", engine.port, spec("fifty", 6.0), timeout=20, switch=switch)
            for _ in range(3)
        ]
        new_primary = cluster.client(cluster.replica_port)
        wait_until(lambda: len(switch.live_uuids()) == 3, timeout=15, interval=0.05, what="3 calls up")
        result = run_cli(["reconcile", "--switch", f"127.0.0.1:{inbound.address[1]}", "--grace", "0"], env)
        assert result.returncode == 0, result.stderr
        counted = zset_members(new_primary, registry)
        assert counted == set(switch.live_uuids())
        gevent.joinall(held, timeout=30, raise_error=True)
    engine.stop()

    outcomes = {p.outcome for p in placed}
    assert outcomes <= {"BRIDGED", "ENGINE_DEGRADED"}, (outcomes, engine.log()[-3000:])
    degraded = [p for p in placed if p.outcome == "ENGINE_DEGRADED"]
    after_kill = [p for p in placed if p.started > killed_at]
    window = max((p.started for p in degraded), default=killed_at) - killed_at
    # Refusals only around the failover: none before the kill's second, none after the window.
    assert all(p.started > killed_at - 2 for p in degraded), "refused before the primary was killed"
    assert window < promoted_after + 5, (
        f"refused {window:.1f}s after the kill (promotion took {promoted_after:.1f}s)"
    )
    recovered = [p for p in after_kill if p.started > killed_at + window]
    assert len(recovered) >= 10 and all(p.outcome == "BRIDGED" for p in recovered)
    # Nothing bridged without its limits script: every call bridged after the kill was counted.
    unchecked = [p.uuid for p in after_kill if p.outcome == "BRIDGED" and p.uuid not in seen]
    assert unchecked == []
    print(
        f"\nfailover: promotion {promoted_after:.2f}s after SIGKILL, last ENGINE_DEGRADED "
        f"{window:.2f}s after it; {len(degraded)} refused, "
        f"{sum(p.outcome == 'BRIDGED' for p in placed)} bridged, 0 unchecked"
    )


def test_releases_lost_in_a_failover_are_repaired_by_one_reconciliation(
    module_pg_url: str, module_key_prefix: str, cluster: SentinelCluster, tmp_path: Path
) -> None:
    """Asynchronous replication loses the primary's last writes: here, deterministically, the
    releases of three calls that ended while the replica was frozen (SIGSTOP) and its link to the
    primary cut (CLIENT KILL TYPE replica), so they never left the primary. After the
    failover the new primary still counts them; one reconciliation with the switch's live
    channels releases them, and the counters equal the live calls again."""
    env = sentinel_environment(module_pg_url, module_key_prefix, cluster)
    prepare_database(module_pg_url, CATALOGUE)
    publish(env)
    registry = limits_registry_key(module_key_prefix)
    primary, replica = cluster.client(cluster.primary_port), cluster.client(cluster.replica_port)
    switch = Switch()
    engine = EngineProcess(env).start(tmp_path / "serve.log")
    try:
        with InboundServer(switch, host="127.0.0.1") as inbound:
            calls = [
                gevent.spawn(
                    place_call, "127.0.0.1", engine.port, spec("fifty", hold), timeout=60, switch=switch
                )
                for hold in (2.0, 2.0, 2.0, 25.0, 25.0)
            ]
            wait_until(
                lambda: replica.zcard(registry) == 5, timeout=20, interval=0.05, what="5 calls replicated"
            )
            # The replica frozen and its link cut: what the primary writes from now on stays there.
            cluster.processes[cluster.replica_port].send_signal(signal.SIGSTOP)
            try:
                primary.client_kill_filter(_type="replica")
                # The three short calls end; their releases reach the primary only.
                wait_until(lambda: primary.zcard(registry) == 2, timeout=20, interval=0.05, what="3 releases")
                cluster.kill(cluster.primary_port)
            finally:
                cluster.processes[cluster.replica_port].send_signal(signal.SIGCONT)
            wait_until(lambda: cluster.primary() == cluster.replica_port, timeout=30, interval=0.1,
                       what="the sentinels promoting the replica")  # fmt: skip
            live = set(switch.live_uuids())
            counted = zset_members(replica, registry)
            assert len(counted) == 5 and live < counted, "the failover lost the three releases"
            # The engine follows the failover (a sentinel may still name the old primary for a moment).
            promoted = time.monotonic()
            while (
                after := place_call("127.0.0.1", engine.port, spec("fifty", 0.2), switch=switch)
            ).bridged_target is None:
                assert after.variables.get("callgate_reason") == "ENGINE_DEGRADED", after.variables
                assert time.monotonic() - promoted < 10, "still refused 10 s after the promotion"
                gevent.sleep(0.1)
            result = run_cli(
                ["reconcile", "--switch", f"127.0.0.1:{inbound.address[1]}", "--grace", "0"], env
            )
            assert result.returncode == 0, result.stderr
            assert "released 3" in result.stdout, result.stdout
            live = set(switch.live_uuids())
            assert zset_members(replica, registry) == live
            for call in calls[:3]:
                call.get(timeout=5)
            for call in calls[3:]:
                call.kill()
    finally:
        engine.stop()


def test_acquires_lost_in_a_failover_are_recounted_by_one_reconciliation(
    module_pg_url: str, module_key_prefix: str, cluster: SentinelCluster, tmp_path: Path
) -> None:
    """The other half of asynchronous replication: two calls of the account "two" (2 channels at
    most) admitted while the replica was frozen (SIGSTOP) and its link cut, so their acquires (limit
    slots and funds reservations) never left the primary, which is then SIGKILLed. On the promoted
    replica the two live calls are neither counted nor reserved. One reconciliation reads their
    tickets on the switch and counts them again: the registry and the account's counter equal the
    live calls, each has its reservation back, a second run changes nothing, and a third call of
    the account is refused CONCURRENT_LIMIT. At hangup the engine settles them (debit, CDR) and
    releases what the recount took, as for any call."""
    env = sentinel_environment(module_pg_url, module_key_prefix, cluster)
    prepare_database(module_pg_url, CATALOGUE)
    publish(env)
    registry = limits_registry_key(module_key_prefix)
    primary, replica = cluster.client(cluster.primary_port), cluster.client(cluster.replica_port)
    with psycopg.connect(module_pg_url) as conn:
        row = conn.execute("SELECT id FROM accounts WHERE number = '1000000002'").fetchone()
        assert row is not None
        (account,) = row
    counter = limits_channels_key(module_key_prefix, "acct", account)
    reservations = funds_reservations_key(module_key_prefix, account)
    switch = Switch()
    engine = EngineProcess(env).start(tmp_path / "serve.log")
    try:
        with InboundServer(switch, host="127.0.0.1") as inbound:
            reconcile = ["reconcile", "--switch", f"127.0.0.1:{inbound.address[1]}", "--grace", "0"]
            cluster.processes[cluster.replica_port].send_signal(signal.SIGSTOP)
            try:
                primary.client_kill_filter(_type="replica")
                calls = [
                    gevent.spawn(
                        place_call, "127.0.0.1", engine.port, spec("two", 20.0), timeout=60, switch=switch
                    )
                    for _ in range(2)
                ]
                wait_until(lambda: primary.zcard(registry) == 2, timeout=20, interval=0.05, what="2 acquires")
                cluster.kill(cluster.primary_port)
            finally:
                cluster.processes[cluster.replica_port].send_signal(signal.SIGCONT)
            wait_until(lambda: cluster.primary() == cluster.replica_port, timeout=30, interval=0.1,
                       what="the sentinels promoting the replica")  # fmt: skip
            live = set(switch.live_uuids())
            assert len(live) == 2 and replica.zcard(registry) == 0, "the failover lost the two acquires"
            assert replica.zcard(reservations) == 0 and replica.zcard(counter) == 0

            result = run_cli(reconcile, env)
            assert result.returncode == 0 and "recounted 2 " in result.stdout, result.stdout + result.stderr
            assert zset_members(replica, registry) == live
            assert zset_members(replica, counter) == live
            assert zset_members(replica, reservations) == live
            amounts = cast(dict[bytes, bytes], replica.hgetall(funds_amounts_key(module_key_prefix, account)))
            assert {k.decode() for k in amounts} == live and all(int(v) > 0 for v in amounts.values())
            reserved = hash_int(replica, funds_account_key(module_key_prefix, account), "reserved")
            assert reserved == sum(int(v) for v in amounts.values())
            again = run_cli(reconcile, env)
            assert again.returncode == 0 and "recounted 0 " in again.stdout, again.stdout + again.stderr
            assert replica.zcard(registry) == 2 and replica.zcard(reservations) == 2

            # A third call of the account: refused (once the engine follows the failover).
            promoted = time.monotonic()
            while (
                third := place_call("127.0.0.1", engine.port, spec("two", 0.2), switch=switch)
            ).error is None:
                reason = third.variables.get("callgate_reason")
                if reason != "ENGINE_DEGRADED":
                    break
                assert time.monotonic() - promoted < 10, "still ENGINE_DEGRADED 10 s after the promotion"
                gevent.sleep(0.1)
            assert third.error is None and third.bridged_target is None, third
            assert third.variables.get("callgate_reason") == "CONCURRENT_LIMIT", third.variables

            for call in calls:
                assert call.get(timeout=40).bridged_target is not None

            # Billed on the new primary, and what the recount took released at hangup.
            def settled() -> bool:
                entries = cast(
                    list[tuple[bytes, dict[bytes, bytes]]], replica.xrange(cdr_stream(module_key_prefix))
                )
                return live <= {fields[b"uuid"].decode() for _id, fields in entries}

            wait_until(settled, timeout=30, interval=0.1, what="both calls settled on the new primary")
            assert int(replica.hget(funds_account_key(module_key_prefix, account), "spent") or 0) > 0
            wait_until(
                lambda: replica.zcard(registry) == 0 and replica.zcard(counter) == 0,
                timeout=10, interval=0.1, what="the re-counted slots released at hangup",
            )  # fmt: skip
            assert replica.zcard(reservations) == 0
            assert hash_int(replica, funds_account_key(module_key_prefix, account), "reserved") == 0
            assert switch.live_uuids() == []
    finally:
        engine.stop()
