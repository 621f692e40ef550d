"""Observability end to end: real `callgate serve` processes scraped over HTTP while the emulator calls.

Every scrape is parsed with prometheus_client's own parser; the metrics must move by exactly
what each call did (an accepted call, each reject reason, a degraded decision, a snapshot
change), the decision log must carry one JSON line per call without secrets, several
processes sharing a port must serve the same totals, and 10,000 distinct accounts calling
must not add a single series.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import gevent.pool
import gevent.server
import gevent.socket
import psycopg
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from engine.state.snapshot import delete_prefix
from loadtest import dataset
from loadtest.fsemu import CallResult, CallSpec, place_call, run_calls
from tests.support import (
    EngineProcess,
    config_for,
    engine_environment,
    free_port,
    prepare_database,
    publish,
    wait_until,
)
from tests.test_metrics import promtool_binary

SIP_PASSWORD = "Secret123x"
ACCOUNT_PASSWORD = "Alice2024x"

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
        {
            "name": "retail",
            "trunks": ["carrier"],
            "rates": [
                {"prefix": "44", "cost_per_minute": "0.01"},
                {"prefix": "49", "cost_per_minute": "0.01"},  # no trunk terminates 49
            ],
        },
    ],
    "resellers": [
        {
            "number": "2000000001",
            "email": "reseller@example.com",
            "password": "Reseller2024",
            "status": "inactive",
            "balance": "100.00",
            "rate_group": "retail",
            "customers": [
                {
                    "number": "2000000101",
                    "email": "resold@example.com",
                    "password": "Resold2024",
                    "balance": "10.00",
                    "rate_group": "retail",
                    "sip_devices": [{"username": "resold", "password": SIP_PASSWORD}],
                }
            ],
        }
    ],
    "customers": [
        {
            "number": "1000000001",
            "email": "alice@example.com",
            "password": ACCOUNT_PASSWORD,
            # funds for the concurrent calls of the multi-process test: each call reserves its whole
            # duration (call_max_length, 100 min at 0.01 = 1.00) until its hangup is settled (issue 13)
            "balance": "1000.00",
            "rate_group": "retail",
            "sip_devices": [{"username": "alice", "password": SIP_PASSWORD}],
        },
        {
            "number": "1000000003",
            "email": "broke@example.com",
            "password": "Broke2024x",
            "balance": "0.0050",
            "rate_group": "retail",
            "sip_devices": [{"username": "broke", "password": SIP_PASSWORD}],
        },
        {
            "number": "1000000004",
            "email": "expired@example.com",
            "password": "Expired2024",
            "balance": "10.00",
            "rate_group": "retail",
            "expiry": "2020-01-01T00:00:00Z",
            "sip_devices": [{"username": "expired", "password": SIP_PASSWORD}],
        },
        {
            "number": "1000000005",
            "email": "blocker@example.com",
            "password": "Blocker2024",
            "balance": "10.00",
            "rate_group": "retail",
            "blocked_codes": [{"prefix": "449"}],
            "sip_devices": [{"username": "blocker", "password": SIP_PASSWORD}],
        },
        {
            "number": "1000000006",
            "email": "strict@example.com",
            "password": "Strict2024x",
            "balance": "10.00",
            "rate_group": "retail",
            "cli_pool": 8,
            "caller_ids": [{"number": "441111111111"}],
            "sip_devices": [{"username": "strict", "password": SIP_PASSWORD}],
        },
        {
            "number": "1000000007",
            "email": "misconf@example.com",
            "password": "Misconf2024",
            "balance": "10.00",
            "rate_group": "retail",
            "cli_pool": 1,
            "sip_devices": [{"username": "misconf", "password": SIP_PASSWORD}],
        },
        {
            "number": "1000000008",
            "email": "one@example.com",
            "password": "OneLine2024",
            "balance": "10.00",
            "rate_group": "retail",
            "max_channels": 1,
            "sip_devices": [{"username": "one", "password": SIP_PASSWORD}],
        },
        {
            "number": "1000000009",
            "email": "slow@example.com",
            "password": "SlowCps2024",
            "balance": "10.00",
            "rate_group": "retail",
            "cps": 1,
            "sip_devices": [{"username": "slow", "password": SIP_PASSWORD}],
        },
    ],
}

# One call for each reject reason the rules give on this catalogue (the limits and
# ENGINE_DEGRADED have tests of their own below).
REJECTS = {
    "AUTHENTICATION_FAIL": ({"sip_auth_username": "mallory", "destination": "441234567890"}, ""),
    "ACCOUNT_INACTIVE": ({"sip_auth_username": "resold", "destination": "441234567890"}, "2000000101"),
    "ACCOUNT_EXPIRED": ({"sip_auth_username": "expired", "destination": "441234567890"}, "1000000004"),
    "NO_SUFFICIENT_FUND": ({"sip_auth_username": "broke", "destination": "441234567890"}, "1000000003"),
    "ORIGINATION_RATE_NOT_FOUND": (
        {"sip_auth_username": "alice", "destination": "81312345678"},
        "1000000001",
    ),
    "TERMINATION_RATE_NOT_FOUND": ({"sip_auth_username": "alice", "destination": "4930123456"}, "1000000001"),
    "NO_ROUTE_DESTINATION": ({"sip_auth_username": "alice", "destination": "44${x}"}, "1000000001"),
    "DESTINATION_BLOCKED": ({"sip_auth_username": "blocker", "destination": "449012345678"}, "1000000005"),
    "CLI_NOT_ALLOWED": (
        {"sip_auth_username": "strict", "destination": "441234567890", "caller_id_number": "449999999"},
        "1000000006",
    ),
    "CLI_POOL_MISCONFIGURED": ({"sip_auth_username": "misconf", "destination": "441234567890"}, "1000000007"),
}


# --------------------------------------------------------------------------- scraping


@dataclass
class Scrape:
    samples: dict[tuple[str, frozenset], float]
    text: str
    families: list = field(default_factory=list)

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over every series of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, lab), v in self.samples.items() if n == name and wanted <= lab)

    def series(self, prefix: str = "callgate_") -> int:
        return sum(1 for (name, _labels) in self.samples if name.startswith(prefix))


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> Scrape:
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    families = list(text_string_to_metric_families(text))  # the client library's own parser
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return Scrape(samples, text, families)


@dataclass
class Engine:
    process: EngineProcess
    metrics_port: int

    @property
    def port(self) -> int:
        return self.process.port

    def scrape(self) -> Scrape:
        return scrape(self.metrics_port)

    def log_entries(self) -> list[dict]:
        entries = []
        for line in self.process.log().splitlines():
            if line.startswith("{"):
                entries.append(json.loads(line))
        return entries

    def decision_lines(self, call_uuid: str) -> list[dict]:
        return [
            e for e in self.log_entries() if e["logger"] == "callgate.decision" and e.get("uuid") == call_uuid
        ]

    def stop(self) -> None:
        self.process.stop()


def start_engine(
    env: dict[str, str],
    log_path: Path,
    *,
    port: int | None = None,
    metrics_port: int | None = None,
    **extra: str,
) -> Engine:
    metrics_port = metrics_port or free_port()
    process = EngineProcess({**env, "CALLGATE_METRICS__LISTEN_PORT": str(metrics_port), **extra})
    if port is not None:
        process.port = port
    process.start(log_path)
    return Engine(process, metrics_port)


def call(engine: Engine, **spec: Any) -> CallResult:
    spec.setdefault("hold_seconds", 0.05)
    result = place_call("127.0.0.1", engine.port, CallSpec(**spec), timeout=10)
    assert result.error is None, (result.error, engine.process.log()[-3000:])
    return result


def decisions(s: Scrape) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["result"], dict(labels)["reason"]): v
        for (name, labels), v in s.samples.items()
        if name == "callgate_decisions_total"
    }


def delta(before: dict, after: dict) -> dict:
    return {
        key: after.get(key, 0) - before.get(key, 0)
        for key in set(before) | set(after)
        if after.get(key, 0) != before.get(key, 0)
    }


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def environment(module_pg_url: str, redis_url: str, module_key_prefix: str) -> dict[str, str]:
    env = engine_environment(
        module_pg_url,
        redis_url,
        module_key_prefix,
        CALLGATE_LOGGING__JSON="true",
        CALLGATE_ENGINE__CONNECT_TIMEOUT="0.5",
    )
    prepare_database(module_pg_url, CATALOGUE)
    publish(env)
    return env


@pytest.fixture(scope="module")
def engine(environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    started = start_engine(environment, tmp_path_factory.mktemp("obs") / "serve.log")
    yield started
    started.stop()


# --------------------------------------------------------------------------- health


def test_health_endpoints_and_promtool_check_metrics(engine: Engine) -> None:
    assert http_get(engine.metrics_port, "/healthz") == (200, "ok\n")
    pings = engine.scrape().get("callgate_redis_request_duration_seconds_count", operation="ping")
    status, body = http_get(engine.metrics_port, "/readyz")
    assert status == 200 and "Redis reachable" in body, body
    assert engine.scrape().get("callgate_redis_request_duration_seconds_count", operation="ping") == pings + 1
    call(engine, sip_auth_username="alice", destination="442071234567")
    s = engine.scrape()
    assert s.get("callgate_ready") == 1
    assert s.get("callgate_snapshot_version") > 0
    assert 0 <= s.get("callgate_snapshot_age_seconds") < 5
    assert s.get("callgate_engine_processes") == 1
    assert s.total("callgate_build_info") == 1
    assert s.get("process_open_fds") > 0  # the standard process metrics, single-process mode
    promtool = promtool_binary()
    run = subprocess.run(
        [promtool, "check", "metrics"], input=s.text, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert not [line for line in (run.stdout + run.stderr).splitlines() if "callgate_" in line], run.stdout


# --------------------------------------------------------------------------- decisions


def test_an_accepted_call_moves_the_decision_metrics_and_logs_one_line(engine: Engine) -> None:
    before = engine.scrape()
    result = call(engine, sip_auth_username="alice", destination="442071234567", hold_seconds=0.3)
    assert result.executed[-1][0] == "bridge"
    wait_until(lambda: engine.scrape().get("callgate_active_calls") == 0, what="active calls back to 0")
    after = engine.scrape()
    assert delta(decisions(before), decisions(after)) == {("accept", ""): 1}
    count = "callgate_decision_duration_seconds_count"
    assert after.get(count) - before.get(count) == 1
    assert (
        0
        < after.get("callgate_decision_duration_seconds_sum")
        - before.get("callgate_decision_duration_seconds_sum")
        < 0.5
    )
    assert after.total("callgate_degraded_decisions_total") == before.total(
        "callgate_degraded_decisions_total"
    )
    [line] = engine.decision_lines(result.uuid)
    assert line["result"] == "accept" and line["account"] == "1000000001" and line["reason"] == ""
    assert isinstance(line["latency_ms"], float) and 0 < line["latency_ms"] < 500
    assert engine.process.process is not None
    assert line["level"] == "INFO" and line["pid"] == engine.process.process.pid


def test_active_calls_counts_calls_up(engine: Engine) -> None:
    job = gevent.spawn(call, engine, sip_auth_username="alice", destination="442071234567", hold_seconds=1.5)
    wait_until(lambda: engine.scrape().get("callgate_active_calls") == 1, what="one active call")
    job.get(timeout=10)
    wait_until(lambda: engine.scrape().get("callgate_active_calls") == 0, what="no active call")


def test_greenlets_count_the_connections_and_the_background_tasks(engine: Engine) -> None:
    def greenlets(kind: str) -> float:
        return engine.scrape().get("callgate_greenlets", kind=kind)

    # The snapshot watcher, the release batcher, the settler, the event publisher, the full
    # collections (and the reconciler or fail-open resync when configured).
    background = greenlets("background")
    assert background >= 5
    job = gevent.spawn(call, engine, sip_auth_username="alice", destination="442071234567", hold_seconds=1.5)
    wait_until(lambda: greenlets("connection") == 1, what="one connection greenlet")
    job.get(timeout=10)
    wait_until(lambda: greenlets("connection") == 0, what="no connection greenlet")
    assert greenlets("background") == background


@pytest.mark.parametrize("reason", sorted(REJECTS))
def test_each_reject_reason_moves_its_own_series(engine: Engine, reason: str) -> None:
    spec, account = REJECTS[reason]
    before = engine.scrape()
    result = call(engine, **spec)
    assert result.variables.get("callgate_reason") == reason
    after = engine.scrape()
    assert delta(decisions(before), decisions(after)) == {("reject", reason): 1}
    [line] = engine.decision_lines(result.uuid)
    assert (line["result"], line["reason"]) == ("reject", reason)
    # A reject names the account (its id) once the caller was identified.
    assert bool(line["account"]) == bool(account), line


def test_concurrent_and_cps_limits_count_their_level_and_kind(engine: Engine) -> None:
    before = engine.scrape()
    jobs = [
        gevent.spawn(call, engine, sip_auth_username="one", destination="441234567890", hold_seconds=1.0)
        for _ in range(2)
    ]
    gevent.joinall(jobs, raise_error=True)
    assert sorted(j.value.variables.get("callgate_reason") for j in jobs) == [
        "ACCEPTED",
        "CONCURRENT_LIMIT",
    ]
    first = call(engine, sip_auth_username="slow", destination="441234567890", hold_seconds=0)
    second = call(engine, sip_auth_username="slow", destination="441234567890", hold_seconds=0)
    assert first.executed[-1][0] == "bridge" and second.variables.get("callgate_reason") == "CPS_LIMIT"
    after = engine.scrape()
    assert delta(decisions(before), decisions(after)) == {
        ("accept", ""): 2,
        ("reject", "CONCURRENT_LIMIT"): 1,
        ("reject", "CPS_LIMIT"): 1,
    }
    limit = "callgate_limit_rejections_total"
    assert (
        after.get(limit, level="account", kind="channels")
        - before.get(limit, level="account", kind="channels")
        == 1
    )
    assert after.get(limit, level="account", kind="cps") - before.get(limit, level="account", kind="cps") == 1


def test_no_secret_reaches_the_log(engine: Engine) -> None:
    call(engine, sip_auth_username="alice", destination="442071234567")
    log = engine.process.log()
    assert "callgate.decision" in log
    for secret in (SIP_PASSWORD, ACCOUNT_PASSWORD, "ClueCon"):
        assert secret not in log
    for entry in engine.log_entries():  # every line is one JSON object
        assert {"ts", "level", "logger", "message"} <= set(entry)


# --------------------------------------------------------------------------- degraded, snapshot


def test_a_degraded_decision_is_counted_with_its_cause(environment: dict[str, str], tmp_path: Path) -> None:
    empty = {
        **environment,
        "CALLGATE_REDIS__KEY_PREFIX": environment["CALLGATE_REDIS__KEY_PREFIX"] + "empty:",
    }
    engine = start_engine(empty, tmp_path / "serve.log")
    try:
        status, body = http_get(engine.metrics_port, "/readyz")
        assert status == 503 and "no snapshot loaded" in body
        assert http_get(engine.metrics_port, "/healthz")[0] == 200
        before = engine.scrape()
        assert before.get("callgate_ready") == 0
        assert before.get("callgate_snapshot_age_seconds") == 1e9
        result = call(engine, sip_auth_username="alice", destination="442071234567")
        assert result.variables == {"callgate_reason": "ENGINE_DEGRADED"}
        after = engine.scrape()
    finally:
        engine.stop()
    assert delta(decisions(before), decisions(after)) == {("reject", "ENGINE_DEGRADED"): 1}
    degraded = "callgate_degraded_decisions_total"
    assert after.total(degraded) - before.total(degraded) == 1
    assert after.get(degraded, cause="no_snapshot") - before.get(degraded, cause="no_snapshot") == 1


def test_a_published_snapshot_moves_the_snapshot_metrics(
    environment: dict[str, str], module_pg_url: str, tmp_path: Path
) -> None:
    engine = start_engine(environment, tmp_path / "serve.log")
    try:
        before = engine.scrape()
        refused = call(engine, sip_auth_username="broke", destination="441234567890")
        assert refused.variables.get("callgate_reason") == "NO_SUFFICIENT_FUND"
        with psycopg.connect(module_pg_url) as conn:
            conn.execute("UPDATE accounts SET balance = 10 WHERE number = '1000000003'")
        publish(environment)  # `callgate sync --once`: a whole new snapshot
        version = before.get("callgate_snapshot_version")
        wait_until(lambda: engine.scrape().get("callgate_snapshot_version") > version, what="the new version")
        after = engine.scrape()
        accepted = call(engine, sip_auth_username="broke", destination="441234567890")
        assert accepted.executed[-1][0] == "bridge"
    finally:
        engine.stop()
        with psycopg.connect(module_pg_url) as conn:
            conn.execute("UPDATE accounts SET balance = 0.005 WHERE number = '1000000003'")
        publish(environment)
    updates = "callgate_snapshot_updates_total"
    assert after.get(updates, kind="full") - before.get(updates, kind="full") == 1
    assert after.get("callgate_ready") == 1 and after.get("callgate_snapshot_age_seconds") < 5


def sync_samples(worker) -> Scrape:
    from prometheus_client import generate_latest

    text = generate_latest(worker.metrics.registry).decode()
    families = list(text_string_to_metric_families(text))
    return Scrape({(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}, text)


def test_a_live_sync_change_moves_the_sync_and_engine_metrics(
    environment: dict[str, str], module_pg_url: str, tmp_path: Path
) -> None:
    from engine.sync.worker import SyncWorker

    env = {**environment, "CALLGATE_REDIS__KEY_PREFIX": environment["CALLGATE_REDIS__KEY_PREFIX"] + "live:"}
    worker = SyncWorker(config_for(env), worker_id="observability-test")
    worker.connect()
    try:
        assert worker.catch_up().full  # the worker's first publication
        engine = start_engine(env, tmp_path / "serve.log")
        try:
            before, sync_before = engine.scrape(), sync_samples(worker)
            refused = call(engine, sip_auth_username="broke", destination="441234567890")
            assert refused.variables.get("callgate_reason") == "NO_SUFFICIENT_FUND"
            with psycopg.connect(module_pg_url) as conn:
                conn.execute("UPDATE accounts SET balance = 10 WHERE number = '1000000003'")
            applied = worker.catch_up()
            assert not applied.full and applied.applied == 1
            updates = "callgate_snapshot_updates_total"
            wait_until(
                lambda: engine.scrape().get(updates, kind="change") > before.get(updates, kind="change"),
                what="the engine to apply the change",
            )
            after, sync_after = engine.scrape(), sync_samples(worker)
            accepted = call(engine, sip_auth_username="broke", destination="441234567890")
            assert accepted.executed[-1][0] == "bridge"
        finally:
            engine.stop()
    finally:
        with psycopg.connect(module_pg_url) as conn:
            conn.execute("UPDATE accounts SET balance = 0.005 WHERE number = '1000000003'")
        worker.close()
        worker.redis.close()
    # The engine applied one change in place: same version, no reload.
    assert after.get(updates, kind="change") - before.get(updates, kind="change") == 1
    assert after.get(updates, kind="full") == before.get(updates, kind="full")
    assert after.get("callgate_snapshot_version") == before.get("callgate_snapshot_version")
    # The worker counted it, with its lag.
    changes = "callgate_sync_changes_applied_total"
    assert sync_after.get(changes, entity="accounts") - sync_before.get(changes, entity="accounts") == 1
    lag = "callgate_sync_lag_seconds_count"
    assert sync_after.get(lag) - sync_before.get(lag) == 1
    assert 0 <= sync_after.get("callgate_sync_lag_seconds_sum") < 30
    assert sync_after.total("callgate_sync_full_resyncs_total") == sync_before.total(
        "callgate_sync_full_resyncs_total"
    )
    assert sync_after.total("callgate_sync_errors_total") == 0


# --------------------------------------------------------------------------- several processes


def test_processes_sharing_a_port_serve_the_same_totals(environment: dict[str, str], tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    shared = {
        "CALLGATE_ENGINE__REUSE_PORT": "true",
        "CALLGATE_METRICS__MULTIPROCESS_DIR": str(tmp_path / "metrics"),
    }
    engines = [
        start_engine(environment, tmp_path / f"serve{n}.log", port=port, metrics_port=metrics_port, **shared)
        for n in range(2)
    ]
    try:
        results = run_calls(
            "127.0.0.1",
            port,
            [
                CallSpec(destination="441234567890", sip_auth_username="alice", hold_seconds=0)
                for _ in range(30)
            ],
            10,
        )
        assert [r.error for r in results if r.error] == []
        handled = [e for e in engines if '"logger":"callgate.decision"' in e.process.log()]
        assert len(handled) == 2, "SO_REUSEPORT gave every call to one process"
        pids = set()
        for _ in range(40):  # each scrape may land on either process: all must show the host's totals
            s = scrape(metrics_port)
            assert s.get("callgate_decisions_total", result="accept", reason="") == 30
            assert s.get("callgate_decision_duration_seconds_count") == 30
            assert s.get("callgate_engine_processes") == 2
            assert s.get("callgate_ready") == 1
            assert s.get("callgate_active_calls") == 0
            assert s.total("callgate_build_info") == 1
            pids.add(http_get(metrics_port, "/readyz")[1].rsplit("pid ", 1)[1].rstrip(")\n"))
            if len(pids) == 2:
                break
        assert len(pids) == 2, "every scrape reached the same process"

        victim = engines[0].process.process
        assert victim is not None
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        s = scrape(metrics_port)
        assert s.get("callgate_engine_processes") == 1
        assert s.get("callgate_decisions_total", result="accept", reason="") == 30  # counters survive
        more = run_calls(
            "127.0.0.1",
            port,
            [CallSpec(destination="441234567890", sip_auth_username="alice") for _ in range(5)],
            5,
        )
        assert [r.error for r in more if r.error] == []
        assert scrape(metrics_port).get("callgate_decisions_total", result="accept", reason="") == 35
    finally:
        for engine in engines:
            engine.stop()


# --------------------------------------------------------------------------- cardinality


PLACEHOLDER_USER, PLACEHOLDER_DEST = "zzplaceholderzz", "44999999999999"
PLACEHOLDER_UUID = "00000000-0000-4000-8000-00000000cafe"


def captured_channel_data() -> bytes:
    """The CHANNEL_DATA frame the emulator sends for a call, with placeholders to fill in."""
    captured: dict[str, bytes] = {}

    def handle(sock, _address) -> None:
        sock.sendall(b"connect\n\n")
        data = b""
        while b"\n\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        captured["frame"] = data[: data.index(b"\n\n") + 2]
        sock.close()

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        spec = CallSpec(
            destination=PLACEHOLDER_DEST, sip_auth_username=PLACEHOLDER_USER, uuid=PLACEHOLDER_UUID
        )
        place_call("127.0.0.1", server.address[1], spec, timeout=5)
    finally:
        server.stop()
    return captured["frame"]


def quick_call(port: int, frame: bytes) -> bytes:
    """FreeSWITCH's side up to the decision only: connect, channel data, read the bridge or
    respond, hang up the socket (the engine then releases the call as after a hangup)."""
    sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        data = b""
        while b"connect\n\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, "the engine closed before connect"
            data += chunk
        sock.sendall(frame)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            app = max(data.find(b"execute-app-name: bridge"), data.find(b"execute-app-name: respond"))
            if app >= 0 and data.find(b"\n\n", app) >= 0:
                break
        return data
    finally:
        sock.close()


def test_ten_thousand_distinct_accounts_add_no_series(redis_url: str, tmp_path: Path) -> None:
    """Every call from another account (accepted, or refused for what that account is): the
    decision log names them all, the metrics must not gain a series."""
    scale = dataset.Scale(
        accounts=12_500, rates=2_000, trunks=4, groups=4, termination_rates=500, resellers=100
    )
    callers = [i for i in range(scale.reseller_count, scale.accounts) if i % 100 not in dataset.ROLE_IP_MAP][
        :10_000
    ]
    assert len(callers) == 10_000
    template = captured_channel_data()
    mix = dataset.CallMix(scale, dataset.ACCEPT_ONLY, seed=3)
    frames = [
        template.replace(PLACEHOLDER_USER.encode(), dataset.device_username(index).encode())
        .replace(PLACEHOLDER_DEST.encode(), mix.next().destination.encode())
        .replace(PLACEHOLDER_UUID.encode(), str(uuid.uuid4()).encode())
        for index in callers
    ]
    prefix = f"cgtest:cardinality:{os.getpid()}:{time.monotonic_ns()}:"
    client = redis.Redis.from_url(redis_url)
    try:
        dataset.ensure_published(client, prefix, scale, log=lambda _message: None)
        env = engine_environment("postgresql://unused@127.0.0.1:1/unused", redis_url, prefix)
        engine = start_engine(env, tmp_path / "serve.log", CALLGATE_LOGGING__DECISION_LEVEL="DEBUG")
        try:
            before = engine.scrape()
            answers = list(gevent.pool.Pool(50).imap(lambda frame: quick_call(engine.port, frame), frames))
            wait_until(lambda: engine.scrape().get("callgate_active_calls") == 0, what="every call released")
            after = engine.scrape()
        finally:
            engine.stop()
    finally:
        delete_prefix(client, prefix)
        client.close()
    assert sum(b"execute-app-name: bridge" in answer for answer in answers) > 9_000
    assert after.total("callgate_decisions_total") - before.total("callgate_decisions_total") == 10_000
    moved = {key for key, count in delta(decisions(before), decisions(after)).items() if count}
    assert ("accept", "") in moved and len(moved) >= 3  # accepted, and refused for several reasons
    assert after.series() == before.series(), sorted(
        {name for name, _ in after.samples} ^ {name for name, _ in before.samples}
    )
    assert set(after.samples) == set(before.samples)  # not one new label value
    for index in callers[::1000]:
        assert dataset.account_number(index) not in after.text
        assert dataset.device_username(index) not in after.text
    assert after.get("callgate_socket_errors_total", kind="protocol") == 0
