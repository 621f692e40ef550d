"""The decisions of docs/operations.md ("What happens when parts fail") and docs/state-and-limits.md
("Failure modes and decisions") that no other test proved.

Each test fails if its documented decision were not taken. The pure decisions are tested where
they are taken (the call handler behind the engine's CallServer, the release batcher, the decider,
the snapshot holder); what only a whole process does (readiness, fail-open's resync, the release
flush at shutdown, starting without a snapshot) runs real ``callgate serve`` processes with the
FreeSWITCH emulator, a real PostgreSQL and Redis. Redis outages use a ``redis-server`` of the
test's own (tests/private_redis.py), stopped and started again with its data.

Every engine started here is given an unreachable PostgreSQL: nothing on the call path uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest
import redis
from gevent import socket as gsocket
from prometheus_client import CollectorRegistry

from engine.call.driver import CallHandler, DecideFn
from engine.config import load_config
from engine.decider import Decider
from engine.decision import Accept, Decision, Reason, Reject
from engine.esl.server import CallServer, listening_socket
from engine.limits_runtime import ReleaseBatcher
from engine.metrics import EngineMetrics
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.state.direct import DirectConnections
from engine.state.imageblob import read_manifest
from engine.state.keys import image_blob_key
from engine.state.limits import LevelKind, Limiter, LimitPlan, Subject
from engine.state.snapshot import current_stamp, publish_snapshot
from loadtest.fsemu import CallResult, CallSpec, Switch, place_call
from tests.call.test_shedding_driver import connect_reply, recv_until
from tests.private_redis import PrivateRedis, private_redis_fixture, quick_client  # noqa: F401
from tests.rules.builders import World
from tests.rules.builders import call as rules_call
from tests.support import (
    EngineProcess,
    SlowToConnect,
    engine_environment,
    free_port,
    is_counted,
    prepare_database,
    publish,
    run_cli,
    wait_until,
)
from tests.test_image_blob import FINGERPRINT, data, holder, produce
from tests.test_observability_e2e import Engine, http_get, start_engine

# The uuid of the captured connect reply (tests/fixtures/connect_reply_raw.txt).
CAPTURED_UUID = "18de0cbf-f510-4eca-83b5-35ad4384bf5e"

CALLEE = "5550001"  # a SIP device: dialled by another account, an on-net (local) call

CATALOGUE: dict[str, Any] = {
    "gateways": [{"name": "gw-1"}],
    "providers": [
        {
            "number": "9000000001",
            "trunks": [
                {
                    "name": "carrier",
                    "gateway": "gw-1",
                    "termination_rates": [{"prefix": "44", "cost_per_minute": "0.001"}],
                }
            ],
        }
    ],
    "rate_groups": [
        {"name": "retail", "trunks": ["carrier"], "rates": [{"prefix": "44", "cost_per_minute": "0.01"}]},
    ],
    "customers": [
        {  # no limit: a paid call reserves funds (a Redis round trip), a local call needs no Redis
            "number": "1000000001",
            "email": "alice@example.com",
            "password": "Alice2024x",
            "balance": "1000.00",
            "rate_group": "retail",
            "sip_devices": [{"username": "alice", "password": "Secret123x"}],
        },
        {  # 2 channels: its free local calls need the limits script and no funds reservation
            "number": "1000000060",
            "email": "caller@example.com",
            "password": "Caller2024x",
            "balance": "10.00",
            "rate_group": "retail",
            "max_channels": 2,
            "sip_devices": [{"username": "caller", "password": "Secret123x"}],
        },
        {
            "number": "1000000061",
            "email": "callee@example.com",
            "password": "Callee2024x",
            "balance": "10.00",
            "rate_group": "retail",
            "sip_devices": [{"username": CALLEE, "password": "Secret123x"}],
        },
    ],
}


def paid(**fields: Any) -> CallSpec:
    """Alice's call to a carrier: rated, so its funds are reserved in Redis with the limits."""
    fields.setdefault("hold_seconds", 0.05)
    return CallSpec(destination="441234567890", sip_auth_username="alice", **fields)


def local(user: str = "alice", **fields: Any) -> CallSpec:
    """A free on-net call to CALLEE: no funds reserved; from alice (no limit) no Redis at all."""
    fields.setdefault("hold_seconds", 0.05)
    return CallSpec(destination=CALLEE, sip_auth_username=user, **fields)


def place(port: int, spec: CallSpec, switch: Switch | None = None) -> CallResult:
    result = place_call("127.0.0.1", port, spec, timeout=15, switch=switch)
    assert result.error is None, result.error
    return result


def bridged(result: CallResult) -> bool:
    return bool(result.executed) and result.executed[-1][0] == "bridge"


def degraded(result: CallResult) -> bool:
    return result.variables == {"callgate_reason": "ENGINE_DEGRADED"} and result.sip_response == (
        503,
        "Service Unavailable",
    )


@pytest.fixture(scope="module")
def database(module_pg_url: str) -> str:
    prepare_database(module_pg_url, CATALOGUE)
    return module_pg_url


def environments(
    database: str, redis_url: str, prefix: str, **overrides: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(the engine's environment, with PostgreSQL unreachable; the same, reaching it, to publish)."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    settings = {
        # Outcomes are under test, not latency: a busy machine must not turn a decision late.
        "CALLGATE_ENGINE__DECISION_DEADLINE": "5",
        "CALLGATE_REDIS__SOCKET_TIMEOUT": "1",
        **overrides,
    }
    env = engine_environment(dead, redis_url, prefix, **settings)
    return env, {**env, "CALLGATE_DATABASE_URL": database}


# --------------------------------------------------------------------------- the socket (driver)


class _Server:
    """A CallHandler behind the engine's CallServer on a port of its own, as `callgate serve` runs it."""

    def __init__(self, decide: DecideFn, **engine: str) -> None:
        environ = {f"CALLGATE_ENGINE__{k.upper()}": v for k, v in engine.items()}
        self.metrics = EngineMetrics(CollectorRegistry())
        handler = CallHandler(load_config(environ=environ), decide, self.metrics, RulesConfig())
        listener = listening_socket("127.0.0.1", 0)
        self.address = listener.getsockname()
        self.server = CallServer(listener, handler)
        self.server.start()

    def connect(self) -> gsocket.socket:
        """A switch's connection, once the engine sent `connect`."""
        sock = gsocket.create_connection(self.address, timeout=10)
        assert recv_until(sock, b"connect\n\n") == b"connect\n\n"
        return sock

    def socket_errors(self, kind: str) -> float | None:
        return self.metrics.registry.get_sample_value("callgate_socket_errors_total", {"kind": kind})

    def close(self) -> None:
        self.server.stop(timeout=1)


def _refusing(decided: list[CallRequest]) -> DecideFn:
    def decide(request: CallRequest) -> Decision:
        decided.append(request)
        return Reject(Reason.DESTINATION_BLOCKED, detail="test")

    return decide


def _closed_by_the_engine(sock: gsocket.socket) -> bool:
    """Reads until the engine closes the connection (what else it writes does not matter)."""
    with gevent.Timeout(10):
        while sock.recv(65536):
            pass
    return True


def test_malformed_data_drops_the_connection_logged_once_with_the_uuid_and_counted_as_protocol(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = _Server(_refusing([]))
    try:
        with caplog.at_level(logging.INFO, logger="callgate.call"), engine.connect() as switch:
            switch.sendall(connect_reply())
            assert b"DESTINATION_BLOCKED" in recv_until(switch, b"\n\n")  # decided: the uuid is known
            switch.sendall(b"\x00\xffno colon here\n\n")
            assert _closed_by_the_engine(switch)
        with engine.connect() as other:  # the engine still serves other calls
            other.sendall(connect_reply())
            assert b"DESTINATION_BLOCKED" in recv_until(other, b"\n\n")
    finally:
        engine.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "callgate.call"]
    assert len(lines) == 1, lines
    assert f"uuid={CAPTURED_UUID}" in lines[0] and "malformed data from FreeSWITCH" in lines[0]
    assert engine.socket_errors("protocol") == 1
    assert engine.socket_errors("timeout") == 0


def test_a_switch_that_never_answers_connect_is_dropped_and_counted_as_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    decided: list[CallRequest] = []
    engine = _Server(_refusing(decided), connect_timeout="0.1")
    try:
        with caplog.at_level(logging.INFO, logger="callgate.call"), engine.connect() as silent:
            assert _closed_by_the_engine(silent)  # FreeSWITCH never sent the channel data
    finally:
        engine.close()
    assert decided == []
    lines = [r.getMessage() for r in caplog.records if r.name == "callgate.call"]
    assert len(lines) == 1 and "no channel data within 0.1s (engine.connect_timeout)" in lines[0], lines
    assert engine.socket_errors("timeout") == 1
    assert engine.socket_errors("protocol") == 0


# --------------------------------------------------------------------------- limits (Redis)


def test_the_engine_s_release_batches_and_retries_are_the_documented_ones() -> None:
    """operations.md: every 10 ms or 256 calls; retried every second for up to 5 minutes;
    state-and-limits.md: at most 100,000 waiting. The engine builds its batcher with these
    defaults (engine.runtime.Engine)."""
    batcher = ReleaseBatcher(Limiter(quick_client(free_port()), "x:"))
    assert (batcher.window, batcher.max_batch) == (0.01, 256)
    assert (batcher.retry_delay, batcher.retry_for, batcher.retry_max) == (1.0, 300.0, 100_000)


def test_beyond_the_retry_bound_the_oldest_releases_are_left_to_their_deadline(
    private_redis: PrivateRedis,
) -> None:
    limiter = Limiter(quick_client(private_redis.port), "cg:")
    plan = LimitPlan((Subject(LevelKind.ACCOUNT, 1, max_channels=10),))
    for call_uuid in ("a", "b", "c"):
        assert limiter.acquire(call_uuid, plan, 600).admitted
    batcher = ReleaseBatcher(limiter, window=0.001, retry_delay=0.05, retry_max=2)
    stop = gevent.event.Event()
    loop = gevent.spawn(batcher.run, stop)
    try:
        private_redis.stop()
        for call_uuid in ("a", "b", "c"):  # queued before the loop runs: one batch, which fails
            batcher.release(call_uuid)
        wait_until(lambda: batcher.retrying == 2, what="two releases held for a retry")
        private_redis.start()
        wait_until(lambda: not {"b", "c"} & set(limiter.counted_calls()), what="b and c released")
        assert set(limiter.counted_calls()) == {"a"}  # the oldest: left to its deadline
        assert batcher.retrying == 0 and batcher.queued == 0
    finally:
        stop.set()
        loop.join(timeout=5)


@dataclasses.dataclass
class _Confirmed:
    """A catalogue source confirmed just now (what the snapshot holder gives the decider)."""

    current: tuple[int, Catalog]
    loaded: bool = True
    switching_since: float | None = None

    def confirmed_age(self) -> float:
        return 0.0


def test_an_exhausted_connection_pool_is_unavailable_not_ambiguous(redis_url: str, key_prefix: str) -> None:
    """state-and-limits.md: the pool exhausted means nothing was sent: ENGINE_DEGRADED, and no
    release is queued (an ambiguous failure queues one)."""
    world = World()
    world.b.update(world.customer, max_channels=2)
    client = redis.Redis.from_url(redis_url)
    direct = DirectConnections(
        SlowToConnect, client.connection_pool.connection_kwargs, size=1, checkout_timeout=0.1
    )
    limiter = Limiter(client, key_prefix, direct=direct)
    released: list[str] = []
    decider = Decider(
        _Confirmed((1, world.catalog())),
        RulesConfig(),
        max_age=5,
        limiter=limiter,
        release_later=released.append,
    )
    try:
        first = gevent.spawn(decider, dataclasses.replace(rules_call(), uuid="first"))
        # Past the loop's turn (a command of the same turn would share the first's pipeline):
        # the first call holds the only connection (connecting).
        gevent.sleep(0.05)
        decision = decider(dataclasses.replace(rules_call(), uuid="second"))
        assert isinstance(decision, Reject) and decision.reason is Reason.ENGINE_DEGRADED, decision
        assert "no free Redis connection" in decision.detail
        assert released == []
        assert isinstance(first.get(timeout=10), Accept)
        assert set(limiter.counted_calls()) == {"first"}
    finally:
        direct.close()
        client.close()


# --------------------------------------------------------------------------- catalogue images


def test_which_source_a_new_host_loads_its_catalogue_from_is_logged(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """operations.md: the engine logs whether it fetched the published image or loads the
    rows, and why (the choices themselves: tests/test_image_blob.py)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=30)
    try:
        version = publish_snapshot(client, key_prefix, data())

        def load_logged() -> str:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="engine.state.watcher"):
                assert holder(client, key_prefix).refresh() is True
            return caplog.text

        assert f"no catalogue image of version {version} published for this code: loading rows" in (
            load_logged()
        )
        produce(client, key_prefix)
        assert f"image of version {version} fetched from Redis" in load_logged()
        manifest = read_manifest(client, key_prefix, version, FINGERPRINT)
        assert manifest is not None
        key, field = image_blob_key(key_prefix, version), manifest.chunk_field(0)
        stored = client.hget(key, field)
        assert isinstance(stored, bytes)
        client.hset(key, field, stored[:-1])  # a chunk cut short
        text = load_logged()
        assert f"catalogue image of version {version} in Redis unusable (" in text
        assert "): loading rows" in text
    finally:
        client.close()


# --------------------------------------------------------------------------- engines


def test_without_a_snapshot_the_engine_says_so_then_loads_the_first_one_published(
    database: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    env, live = environments(database, redis_url, key_prefix)
    engine = EngineProcess(env).start(tmp_path / "serve.log")
    try:
        assert "no snapshot in Redis yet" in engine.log()
        assert degraded(place(engine.port, paid()))
        publish(live)  # `callgate sync --once`; the engine is not restarted
        wait_until(
            lambda: bridged(place(engine.port, paid())),
            interval=0.1,
            what="a call decided from the published snapshot",
        )
    finally:
        engine.stop()


def _readyz(engine: Engine) -> tuple[int, str]:
    return http_get(engine.metrics_port, "/readyz")


def _unconfirmed(engine: Engine) -> bool:
    status, body = _readyz(engine)
    return status == 503 and "snapshot unconfirmed for" in body


def test_a_snapshot_unconfirmed_past_its_max_age_refuses_every_call_until_redis_is_back(
    database: str, private_redis: PrivateRedis, module_key_prefix: str, tmp_path: Path
) -> None:
    env, live = environments(
        database,
        private_redis.url,
        module_key_prefix,
        CALLGATE_ENGINE__SNAPSHOT_MAX_AGE="2",
        CALLGATE_ENGINE__SNAPSHOT_POLL_INTERVAL="0.2",  # confirmed well within the bound meanwhile
    )
    publish(live)
    engine = start_engine(env, tmp_path / "serve.log")
    try:
        assert bridged(place(engine.port, paid()))
        assert _readyz(engine)[0] == 200
        private_redis.stop()
        wait_until(lambda: _unconfirmed(engine), what="/readyz: snapshot unconfirmed")
        before = engine.scrape()
        # A free local call needs no Redis round trip: only the snapshot's age refuses it.
        assert degraded(place(engine.port, local()))
        after = engine.scrape()
        cause = "callgate_degraded_decisions_total"
        assert after.get(cause, cause="stale_snapshot") - before.get(cause, cause="stale_snapshot") == 1
        private_redis.start()  # with its data; the engine is not restarted
        wait_until(lambda: _readyz(engine)[0] == 200, what="/readyz ready again")
        assert bridged(place(engine.port, local()))
        assert bridged(place(engine.port, paid()))
    finally:
        engine.stop()


def test_fail_open_admits_by_the_local_share_counts_it_and_registers_the_calls_once_redis_is_back(
    database: str, private_redis: PrivateRedis, module_key_prefix: str, tmp_path: Path
) -> None:
    env, live = environments(
        database,
        private_redis.url,
        module_key_prefix,
        CALLGATE_LIMITS__FAIL_OPEN="true",
        CALLGATE_LIMITS__LOCAL_SHARE="0.5",  # caller's 2 channels: 1 for this process alone
        CALLGATE_ENGINE__SNAPSHOT_MAX_AGE="60",  # the snapshot stays trusted through the outage
    )
    publish(live)
    engine = start_engine(env, tmp_path / "serve.log")
    switch = Switch()
    fail_open = "callgate_limits_fail_open_decisions_total"
    held_spec = local("caller", hold_seconds=60)
    held = None
    try:
        private_redis.stop()
        held = gevent.spawn(place, engine.port, held_spec, switch)
        wait_until(lambda: engine.scrape().get(fail_open, outcome="admitted") == 1, what="admitted locally")
        refused = place(engine.port, local("caller"))
        assert refused.variables == {"callgate_reason": "CONCURRENT_LIMIT"}
        assert engine.scrape().get(fail_open, outcome="refused") == 1
        # Funds are never approximated: a call that reserves funds is refused all the same.
        assert degraded(place(engine.port, paid()))
        private_redis.start()  # without the locally admitted call; the engine is not restarted
        wait_until(lambda: is_counted(env, held_spec.uuid), what="the held call registered in Redis")
        assert "locally admitted calls registered in the shared limits" in engine.process.log()
        assert switch.kill(held_spec.uuid)
        assert bridged(held.get(timeout=15))
        wait_until(lambda: not is_counted(env, held_spec.uuid), what="the held call released at its hangup")
    finally:
        if held is not None:
            held.kill()
        engine.stop()


def test_a_release_that_failed_while_redis_was_down_is_flushed_at_shutdown(
    database: str, private_redis: PrivateRedis, module_key_prefix: str, tmp_path: Path
) -> None:
    """The call ends while Redis is down: its release fails and waits for its retry (1 s).
    Redis comes back and the engine is stopped before that retry: the flush at shutdown,
    after the drain, releases it (without it the slot would stay until its deadline). Here
    the stop follows the failure by ~50 ms; were the retry first on a stalled machine, the
    slot would be released all the same: the test would prove less, never fail."""
    env, live = environments(
        database, private_redis.url, module_key_prefix, CALLGATE_ENGINE__SNAPSHOT_MAX_AGE="60"
    )
    publish(live)
    engine = EngineProcess(env).start(tmp_path / "serve.log")
    switch = Switch()
    held_spec = local("caller", hold_seconds=60)
    held = gevent.spawn(place, engine.port, held_spec, switch)
    try:
        wait_until(lambda: is_counted(env, held_spec.uuid), what="the held call counted")
        private_redis.stop()  # saved: it comes back with the call counted
        assert switch.kill(held_spec.uuid)
        assert bridged(held.get(timeout=15))
        wait_until(
            lambda: "limits release of 1 calls failed (" in engine.log() and "); retrying" in engine.log(),
            what="the failed release logged",
        )
        private_redis.start()
    finally:
        held.kill()
        engine.stop()
    assert engine.process is not None and engine.process.returncode == 0, engine.log()[-2000:]
    assert not is_counted(env, held_spec.uuid), engine.log()[-2000:]


def test_postgres_down_calls_are_decided_and_sync_once_fails_with_the_error(
    database: str, redis_url: str, module_key_prefix: str, tmp_path: Path
) -> None:
    env, live = environments(database, redis_url, module_key_prefix)
    publish(live)
    stamp = current_stamp_of(env)
    engine = EngineProcess(env).start(tmp_path / "serve.log")
    try:
        assert bridged(place(engine.port, paid()))
        failed = run_cli(["sync", "--once"], env)
        assert failed.returncode != 0
        assert "connection" in failed.stderr.lower() and "refused" in failed.stderr.lower(), failed.stderr
        assert current_stamp_of(env) == stamp  # nothing published
        assert bridged(place(engine.port, paid()))  # calls still decided from the Redis snapshot
    finally:
        engine.stop()


def current_stamp_of(env: dict[str, str]) -> Any:
    with contextlib.closing(redis.Redis.from_url(env["CALLGATE_REDIS_URL"])) as client:
        return current_stamp(client, env["CALLGATE_REDIS__KEY_PREFIX"])
