"""Limits end to end: real engines, the emulator, PostgreSQL and Redis (issue: shared limits)."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import gevent
import pytest
import redis

from loadtest.fsemu import CallSpec, InboundServer, Switch, place_call, run_calls
from tests.private_redis import PrivateRedis
from tests.support import (
    EngineProcess,
    counted_calls,
    engine_environment,
    free_port,
    is_counted,
    prepare_database,
    publish,
    run_cli,
    wait_until,
)

CATALOGUE = {
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
    "resellers": [
        {
            "number": "2000000001",
            "email": "reseller@example.com",
            "password": "Reseller2024",
            "balance": "1000.00",
            "rate_group": "retail",
            "max_channels": 3,
            "customers": [
                {
                    "number": "2000000101",
                    "email": "small@example.com",
                    "password": "Small2024x",
                    "balance": "100.00",
                    "rate_group": "retail",
                    "max_channels": 5,
                    "sip_devices": [{"username": "small", "password": "Secret123x"}],
                }
            ],
        }
    ],
    "customers": [
        {
            "number": "1000000050",
            "email": "fifty@example.com",
            "password": "Fifty2024x",
            "balance": "1000.00",
            "rate_group": "retail",
            "max_channels": 50,
            "sip_devices": [{"username": "fifty", "password": "Secret123x"}],
        },
        {
            "number": "1000000002",
            "email": "two@example.com",
            "password": "Two2024xxx",
            "balance": "100.00",
            "rate_group": "retail",
            "max_channels": 2,
            "sip_devices": [{"username": "two", "password": "Secret123x"}],
        },
    ],
}


def spec(user: str, hold: float) -> CallSpec:
    return CallSpec(destination="441234567890", sip_auth_username=user, hold_seconds=hold)


def outcomes(results) -> Counter:
    reasons = (r.variables.get("callgate_reason", "ACCEPTED") for r in results if r.error is None)
    return Counter("BRIDGED" if reason == "ACCEPTED" else reason for reason in reasons)


@pytest.fixture(scope="module")
def environment(module_pg_url: str, redis_url: str, module_key_prefix: str) -> dict[str, str]:
    # Counting is under test, not latency: generous deadlines so a busy CI machine never turns a
    # slow decision into ENGINE_DEGRADED.
    env = engine_environment(
        module_pg_url,
        redis_url,
        module_key_prefix,
        CALLGATE_REDIS__SOCKET_TIMEOUT="3",
        CALLGATE_ENGINE__DECISION_DEADLINE="5",
    )
    prepare_database(module_pg_url, CATALOGUE)
    publish(env)
    return env


def test_two_engines_sharing_a_limit_admit_exactly_the_limit(environment, tmp_path: Path) -> None:
    engines = [EngineProcess(environment).start(tmp_path / f"serve{i}.log") for i in range(2)]
    try:
        jobs = [
            gevent.spawn(
                run_calls, "127.0.0.1", engine.port, [spec("fifty", 6.0) for _ in range(100)], 100, timeout=20
            )
            for engine in engines
        ]
        gevent.joinall(jobs, raise_error=True)
        results = [result for job in jobs for result in job.value]
    finally:
        for engine in engines:
            engine.stop()
    assert [r.error for r in results if r.error] == []
    assert outcomes(results) == {"BRIDGED": 50, "CONCURRENT_LIMIT": 150}
    refused = [r for r in results if r.variables.get("callgate_reason", "ACCEPTED") != "ACCEPTED"]
    assert {r.sip_response for r in refused} == {(503, "Service Unavailable")}
    assert counted_calls(environment) == 0  # every admitted call was released at its hangup


def test_a_reseller_limit_binds_below_its_customer_s(environment, tmp_path: Path) -> None:
    engine = EngineProcess(environment).start(tmp_path / "serve.log")
    try:
        results = run_calls("127.0.0.1", engine.port, [spec("small", 2.0) for _ in range(6)], 6, timeout=10)
    finally:
        engine.stop()
    assert outcomes(results) == {"BRIDGED": 3, "CONCURRENT_LIMIT": 3}


def test_explain_says_concurrent_limit_while_the_account_is_at_2_of_2(environment, tmp_path: Path) -> None:
    """Issue 15 item 10, through the CLI: explain runs the engine's steps with the limits
    peeked; it refuses as the engine would, and takes nothing."""
    engine = EngineProcess(environment).start(tmp_path / "serve.log")
    explain = ["explain", "--sip-user", "two", "--dest", "441234567890"]
    try:
        calls = gevent.spawn(
            run_calls, "127.0.0.1", engine.port, [spec("two", 8.0) for _ in range(2)], 2, timeout=20
        )
        wait_until(lambda: counted_calls(environment) == 2, what="the two calls admitted")
        refused = run_cli(explain, environment)
        assert refused.returncode == 3, refused.stderr
        assert "REJECT CONCURRENT_LIMIT" in refused.stdout
        assert "limits: account" in refused.stdout and "channels 2/2" in refused.stdout
        assert counted_calls(environment) == 2  # nothing taken
        calls.join(timeout=30)
        assert outcomes(calls.value) == {"BRIDGED": 2}
    finally:
        engine.stop()
    accepted = run_cli(explain, environment)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "ACCEPT" in accepted.stdout
    assert counted_calls(environment) == 0


def test_a_killed_engine_leaves_no_counted_call_once_the_reconciler_has_run(
    environment, tmp_path: Path
) -> None:
    switch = Switch()
    engine = EngineProcess(environment).start(tmp_path / "serve.log")
    with InboundServer(switch, host="127.0.0.1") as inbound:
        calls = gevent.spawn(
            run_calls, "127.0.0.1", engine.port, [spec("two", 1.5) for _ in range(2)], 2, switch=switch
        )
        wait_until(lambda: counted_calls(environment) >= 2, timeout=20, interval=0.05, what="2 counted calls")
        assert counted_calls(environment) == 2
        assert engine.process is not None  # started
        engine.process.kill()  # no hangup will ever be released by it
        engine.process.wait()
        calls.get(timeout=10)  # the calls end on the switch meanwhile
        assert counted_calls(environment) == 2
        port = inbound.address[1]
        result = run_cli(["reconcile", "--switch", f"127.0.0.1:{port}", "--grace", "0"], environment)
    assert result.returncode == 0, result.stderr
    assert "released 2" in result.stdout
    assert counted_calls(environment) == 0


def test_reconcile_releases_nothing_when_a_switch_cannot_be_listed(environment) -> None:
    result = run_cli(["reconcile", "--switch", f"127.0.0.1:{free_port()}"], environment)
    assert result.returncode == 1
    assert "nothing released" in result.stderr


@pytest.fixture
def private_redis(tmp_path: Path):
    """A Redis of this test's own, with persistence, so it can be stopped and restarted."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    command = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes", "--dir", str(tmp_path),
    ]  # fmt: skip

    def start() -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, timeout=10, interval=0.05, what="the private redis-server answering")
        return process

    state = {"process": start()}

    def stop() -> None:
        state["process"].terminate()
        state["process"].wait()

    def restart() -> None:
        state["process"] = start()

    yield f"redis://127.0.0.1:{port}/0", stop, restart
    stop()


def test_redis_restart_degrades_then_counts_correctly(environment, private_redis, tmp_path: Path) -> None:
    url, stop_redis, start_redis = private_redis
    env = {**environment, "CALLGATE_REDIS_URL": url}
    publish(env)
    engine = EngineProcess(env).start(tmp_path / "serve.log")
    try:
        held_spec = spec("two", 4.0)
        held = gevent.spawn(place_call, "127.0.0.1", engine.port, held_spec, timeout=10)
        wait_until(lambda: is_counted(env, held_spec.uuid), what="the held call admitted")
        stop_redis()
        during = place_call("127.0.0.1", engine.port, spec("two", 0.1))
        assert during.variables == {"callgate_reason": "ENGINE_DEGRADED"}
        assert during.sip_response == (503, "Service Unavailable")
        start_redis()
        gevent.sleep(1.5)  # the engine reconnects; the held call is still counted (AOF)
        after = run_calls("127.0.0.1", engine.port, [spec("two", 1.0) for _ in range(2)], 2)
        assert outcomes(after) == {"BRIDGED": 1, "CONCURRENT_LIMIT": 1}
        assert held.get(timeout=10).executed[-1][0] == "bridge"
    finally:
        engine.stop()
    assert counted_calls(env) == 0


def test_a_call_whose_acquire_timed_out_is_refused_and_its_slot_freed(environment, tmp_path: Path) -> None:
    """Issue 12: Redis receives the acquire but answers after the engine gave up. The call
    is refused ENGINE_DEGRADED, and the slot the script took once Redis resumed is freed
    (before the fix it stayed taken until its deadline, hours later)."""
    server = PrivateRedis()
    server.start()
    env = {
        **environment,
        "CALLGATE_REDIS_URL": server.url,
        "CALLGATE_REDIS__SOCKET_TIMEOUT": "0.3",
        "CALLGATE_ENGINE__SNAPSHOT_MAX_AGE": "30",  # the freeze must not make the snapshot stale
    }
    engine = None
    try:
        publish(env)
        engine = EngineProcess(env).start(tmp_path / "serve.log")
        first = place_call("127.0.0.1", engine.port, spec("two", 0.1))  # loads the scripts into Redis
        assert first.executed[-1][0] == "bridge"
        wait_until(lambda: counted_calls(env) == 0, what="the first call released")
        server.freeze()
        try:
            frozen = place_call("127.0.0.1", engine.port, spec("two", 0.1))
        finally:
            server.thaw()
        assert frozen.variables == {"callgate_reason": "ENGINE_DEGRADED"}
        # The queued release frees what the late script took.
        wait_until(lambda: counted_calls(env) == 0, what="the timed-out call's slot released")
        after = run_calls("127.0.0.1", engine.port, [spec("two", 1.0) for _ in range(2)], 2, timeout=20)
        assert outcomes(after) == {"BRIDGED": 2}  # both slots free
    finally:
        if engine is not None:
            engine.stop()
        server.kill()
