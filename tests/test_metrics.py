"""Metrics, health endpoints, logs, alert rules and dashboard, without an engine process.

Multiprocess mode is process-wide in prometheus_client, so its tests run the metric
writers as child processes and read their files from here, as a scrape does.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from engine.config import ConfigError, LoggingSettings, load_config
from engine.decider import Decider
from engine.decision import Accept, Decision, Reason, Reject
from engine.logs import JsonFormatter, level_number, mask_secrets, setup_logging
from engine.metrics import (
    DEGRADED_CAUSES,
    LATENCY_BUCKETS,
    REDIS_OPERATIONS,
    EngineMetrics,
    SharedDirectory,
    degraded_cause,
    wsgi_app,
)
from engine.rules.config import RulesConfig
from engine.state.funds import FundsRequest
from engine.state.limits import (
    LevelKind,
    LevelUsage,
    LimitPlan,
    LimitResult,
    LimitsBackend,
    LimitsCatalog,
    LimitsUnavailable,
    Subject,
)
from tests.rules.builders import World, call

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "config" / "grafana" / "callgate.json"
OPERATING = ROOT / "docs" / "operations.md"  # the operations runbook: metrics, alerts

# Labels that would grow with the customer base, never allowed on a metric.
FORBIDDEN_LABELS = {"account", "account_id", "number", "uuid", "call_uuid", "ip", "address", "destination"}


# --------------------------------------------------------------------------- helpers


def promtool_binary() -> str:
    """promtool's path; installs it with scripts/tools.sh when missing and possible (root + apt-get).

    Skips only when it is missing and cannot be installed here; fails when installing should work
    but did not.
    """
    found = shutil.which("promtool")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            "promtool is not installed and cannot be installed here (needs root and apt-get): "
            "run `sudo bash scripts/tools.sh` or `apt-get install prometheus`"
        )
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "tools.sh")], capture_output=True, text=True, timeout=900
    )
    found = shutil.which("promtool")
    if not found:
        pytest.fail(f"scripts/tools.sh did not install promtool (exit {run.returncode}):\n{run.stderr}")
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    return promtool_binary()


def exposition(metrics: EngineMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def value(metrics: EngineMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def engine_metric_names() -> set[str]:
    """Every callgate_ family the engine exposes (names as in PromQL, counters with _total)."""
    names = set()
    for family in text_string_to_metric_families(exposition(EngineMetrics())):
        if family.name.startswith("callgate_"):
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def sync_metric_names() -> set[str]:
    """The sync worker's metrics (served by `callgate sync` on its own port, not by the engine)."""
    from engine.sync.metrics import SyncMetrics

    names = set()
    for family in text_string_to_metric_families(generate_latest(SyncMetrics().registry).decode()):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def fsxml_metric_names() -> set[str]:
    """`callgate fsxml`'s metrics (engine.fsxml.metrics, served on [fsxml] metrics_port)."""
    from engine.fsxml.metrics import FsxmlMetrics

    names = set()
    for family in text_string_to_metric_families(generate_latest(FsxmlMetrics().registry).decode()):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def billing_metric_names() -> set[str]:
    """Accounting's metrics (engine.billing.metrics), served by the sync worker, described in docs/."""
    from engine.billing.metrics import BillingMetrics

    names = set()
    for family in text_string_to_metric_families(generate_latest(BillingMetrics().registry).decode()):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def promql_metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"(?<![\w:])(callgate_[a-z0-9_]+)(?![\w:])", expr))  # not recording rules
    return {
        re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count")) else n
        for n in names
    }


def call_app(app, path: str, accept: str = "") -> tuple[str, dict[str, str], bytes]:
    seen: dict[str, object] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app({"PATH_INFO": path, "HTTP_ACCEPT": accept}, start_response))
    return str(seen["status"]), seen["headers"], body  # type: ignore[return-value]


# --------------------------------------------------------------------------- naming and series


def test_every_metric_follows_the_naming_practice() -> None:
    metrics = EngineMetrics()
    families = list(text_string_to_metric_families(exposition(metrics)))
    ours = [f for f in families if f.name.startswith("callgate_")]
    assert len(ours) >= 15
    # Only the standard process_/python_ collectors besides ours, in single-process mode.
    assert {f.name.split("_")[0] for f in families} <= {"callgate", "process", "python"}
    for family in ours:
        assert not family.name.startswith("callgate_callgate"), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        else:
            assert not family.name.endswith("_total"), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            assert not FORBIDDEN_LABELS & set(sample.labels), (family.name, sample.labels)
    info = [s for f in ours if f.name == "callgate_build_info" for s in f.samples]
    assert len(info) == 1 and info[0].value == 1 and info[0].labels["version"]


def test_latency_buckets_resolve_below_one_millisecond() -> None:
    assert LATENCY_BUCKETS[0] < 0.0005 and sum(b < 0.001 for b in LATENCY_BUCKETS) >= 2
    assert 0.02 in LATENCY_BUCKETS  # the p99 budget of the alert is a bucket edge
    text = exposition(EngineMetrics())
    assert 'callgate_decision_duration_seconds_bucket{le="0.00025"} 0.0' in text


def test_known_label_combinations_exist_before_any_call() -> None:
    metrics = EngineMetrics()
    for reason in Reason:
        assert (
            metrics.registry.get_sample_value(
                "callgate_decisions_total", {"result": "reject", "reason": reason.value}
            )
            == 0
        )
    assert (
        metrics.registry.get_sample_value("callgate_decisions_total", {"result": "accept", "reason": ""}) == 0
    )
    for cause in DEGRADED_CAUSES:
        assert metrics.registry.get_sample_value("callgate_degraded_decisions_total", {"cause": cause}) == 0
    for operation in REDIS_OPERATIONS:
        assert (
            metrics.registry.get_sample_value(
                "callgate_redis_request_duration_seconds_count", {"operation": operation}
            )
            == 0
        )


def test_accepted_and_rejected_calls_move_only_their_own_series() -> None:
    metrics = EngineMetrics()
    metrics.observe_decision("accept", "", 0.0004)
    for reason in Reason:
        metrics.observe_decision("reject", reason.value, 0.0007)
    assert value(metrics, "callgate_decisions_total", result="accept", reason="") == 1
    for reason in Reason:
        assert value(metrics, "callgate_decisions_total", result="reject", reason=reason.value) == 1
    assert value(metrics, "callgate_decision_duration_seconds_count") == 1 + len(Reason)
    assert value(metrics, "callgate_decision_duration_seconds_bucket", le="0.0005") == 1
    assert value(metrics, "callgate_decision_duration_seconds_bucket", le="0.001") == 1 + len(Reason)
    # Only the ENGINE_DEGRADED reject counts as degraded.
    assert sum(value(metrics, "callgate_degraded_decisions_total", cause=c) for c in DEGRADED_CAUSES) == 1


class _Source:
    def __init__(self, loaded: bool, age: float, catalog=None) -> None:
        self.loaded, self._age, self._catalog = loaded, age, catalog

    @property
    def current(self):
        return 1, self._catalog

    def confirmed_age(self) -> float:
        return self._age

    switching_since: float | None = None


class _DownLimiter(LimitsBackend):
    """Limits whose Redis refuses connections: planning (no Redis) works, everything else raises."""

    def subjects_for(self, accept: Accept, catalog: LimitsCatalog) -> LimitPlan:
        return LimitPlan(levels=(Subject(LevelKind.ACCOUNT, accept.account_id, max_channels=1),))

    def acquire(
        self, call_uuid: str, plan: LimitPlan, hold_seconds: int, funds: FundsRequest | None = None
    ) -> LimitResult:
        raise LimitsUnavailable("ConnectionError: refused")

    def peek(self, plan: LimitPlan) -> LimitResult:
        raise LimitsUnavailable("ConnectionError: refused")

    def usage(self, plan: LimitPlan) -> list[LevelUsage]:
        raise LimitsUnavailable("ConnectionError: refused")

    def release(self, call_uuid: str) -> bool:
        raise LimitsUnavailable("ConnectionError: refused")

    def release_many(self, call_uuids: Sequence[str]) -> int:
        raise LimitsUnavailable("ConnectionError: refused")

    def counted_calls(self) -> dict[str, float]:
        raise LimitsUnavailable("ConnectionError: refused")

    def release_orphans(self, call_uuids: Iterable[str], grace_seconds: float) -> list[str]:
        raise LimitsUnavailable("ConnectionError: refused")


def _detail(decision: Decision) -> str:
    """The detail of a reject (failing when the call was accepted)."""
    assert isinstance(decision, Reject), decision
    return decision.detail


def test_degraded_cause_is_read_from_the_engine_s_own_details() -> None:
    """The details written by the decider and the call handler map to their causes."""
    catalog = World().catalog()
    empty = Decider(_Source(False, float("inf")), RulesConfig(), max_age=5)
    assert degraded_cause(_detail(empty(call()))) == "no_snapshot"
    stale = Decider(_Source(True, 9.0, catalog), RulesConfig(), max_age=5)
    assert degraded_cause(_detail(stale(call()))) == "stale_snapshot"
    switching = _Source(True, 9.0, catalog)
    switching.switching_since = 1.0  # the next version is being loaded: the held one still decides
    graced = Decider(switching, RulesConfig(), max_age=5, switch_max_age=600)
    assert getattr(graced(call()), "reason", None) is not Reason.ENGINE_DEGRADED
    ungraced = Decider(switching, RulesConfig(), max_age=5, switch_max_age=8)
    assert degraded_cause(_detail(ungraced(call()))) == "stale_snapshot"
    down = Decider(_Source(True, 0.1, catalog), RulesConfig(), max_age=5, limiter=_DownLimiter())
    assert degraded_cause(_detail(down(call()))) == "limits_unavailable"
    # Written by engine.call.driver.CallHandler.
    assert degraded_cause("decision deadline exceeded") == "deadline"
    assert degraded_cause("over engine.max_connections") == "overload"
    assert degraded_cause("internal error") == "internal_error"
    assert degraded_cause("") == "other"


def test_degraded_decision_counts_its_cause() -> None:
    metrics = EngineMetrics()
    metrics.observe_decision("reject", "ENGINE_DEGRADED", 0.001, detail="limits unavailable: timeout")
    metrics.observe_decision("reject", "ENGINE_DEGRADED", 0.5, detail="decision deadline exceeded")
    assert value(metrics, "callgate_degraded_decisions_total", cause="limits_unavailable") == 1
    assert value(metrics, "callgate_degraded_decisions_total", cause="deadline") == 1
    assert value(metrics, "callgate_decisions_total", result="reject", reason="ENGINE_DEGRADED") == 2


def test_label_values_outside_the_known_sets_are_counted_as_other() -> None:
    metrics = EngineMetrics()
    before = exposition(metrics).count("\n")
    for n in range(10_000):
        metrics.observe_decision("reject", f"ACCOUNT {1_000_000 + n}", 0.001)
        metrics.socket_error(f"peer 10.0.{n // 256}.{n % 256}")
        metrics.limit_rejection(f"account {n}", "channels")
    after = exposition(metrics)
    assert value(metrics, "callgate_decisions_total", result="reject", reason="other") == 10_000
    assert value(metrics, "callgate_socket_errors_total", kind="other") == 10_000
    assert value(metrics, "callgate_limit_rejections_total", level="other", kind="channels") == 10_000
    assert after.count("\n") <= before + 3 * 2  # one new series (+ its _created line) per metric
    assert "1000000" not in after and "10.0." not in after


def test_redis_call_times_the_round_trip_and_counts_failures() -> None:
    import redis

    metrics = EngineMetrics()
    with metrics.redis_call("limits"):
        pass
    with pytest.raises(LimitsUnavailable), metrics.redis_call("limits"):
        raise LimitsUnavailable("down")
    with pytest.raises(redis.ConnectionError), metrics.redis_call("release"):
        raise redis.ConnectionError("refused")
    with pytest.raises(ValueError), metrics.redis_call("release"):
        raise ValueError("not a Redis failure")
    assert value(metrics, "callgate_redis_request_duration_seconds_count", operation="limits") == 2
    assert value(metrics, "callgate_redis_request_duration_seconds_count", operation="release") == 2
    assert value(metrics, "callgate_redis_errors_total", operation="limits") == 1
    assert value(metrics, "callgate_redis_errors_total", operation="release") == 1
    # The plain prometheus_client timer works too: metrics.redis_latency.labels("limits").time()
    with metrics.redis_latency.labels("snapshot").time():
        pass
    assert value(metrics, "callgate_redis_request_duration_seconds_count", operation="snapshot") == 1


def test_snapshot_gauges_and_readiness() -> None:
    metrics = EngineMetrics()
    metrics.set_snapshot(loaded=False, version=0, age=float("inf"), ready=False)
    assert value(metrics, "callgate_snapshot_age_seconds") == 1e9
    assert value(metrics, "callgate_ready") == 0
    metrics.set_snapshot(loaded=True, version=42, age=0.3, ready=True)
    assert value(metrics, "callgate_snapshot_version") == 42
    assert value(metrics, "callgate_snapshot_age_seconds") == 0.3
    assert value(metrics, "callgate_ready") == 1
    assert value(metrics, "callgate_engine_processes") == 1


def test_greenlet_census_is_set_per_kind() -> None:
    metrics = EngineMetrics()
    assert value(metrics, "callgate_greenlets", kind="connection") == 0  # exists before any scrape
    metrics.set_greenlets(connections=12, background=5)
    assert value(metrics, "callgate_greenlets", kind="connection") == 12
    assert value(metrics, "callgate_greenlets", kind="background") == 5
    metrics.set_greenlets(connections=0, background=5)
    assert value(metrics, "callgate_greenlets", kind="connection") == 0


def test_snapshot_updates_follow_the_holder_s_running_counts() -> None:
    metrics = EngineMetrics()
    metrics.count_snapshot_updates(full=1, change=0)
    metrics.count_snapshot_updates(full=1, change=3)
    metrics.count_snapshot_updates(full=2, change=3)
    assert value(metrics, "callgate_snapshot_updates_total", kind="full") == 2
    assert value(metrics, "callgate_snapshot_updates_total", kind="change") == 3


# --------------------------------------------------------------------------- the endpoint


def test_endpoint_paths_and_status_codes() -> None:
    metrics = EngineMetrics()
    readiness = (False, "no snapshot loaded")
    scrapes = 0

    def before_scrape() -> None:
        nonlocal scrapes
        scrapes += 1
        if scrapes == 2:
            raise RuntimeError("a refresh failed")

    app = wsgi_app(metrics.registry, lambda: readiness, before_scrape)
    status, headers, body = call_app(app, "/metrics")
    assert status == "200 OK" and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert any(f.name == "callgate_decisions" for f in text_string_to_metric_families(body.decode()))
    status, _, body = call_app(app, "/metrics")  # the failing refresh does not cost the scrape
    assert status == "200 OK" and b"callgate_decisions_total" in body
    status, headers, body = call_app(app, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert call_app(app, "/healthz")[:1] == ("200 OK",)
    status, _, body = call_app(app, "/readyz")
    assert status.startswith("503") and b"no snapshot loaded" in body
    readiness = (True, "ready: snapshot 3, Redis reachable")
    assert call_app(app, "/readyz")[0] == "200 OK"

    def broken() -> tuple[bool, str]:
        raise OSError("boom")

    status, _, body = call_app(wsgi_app(metrics.registry, broken, lambda: None), "/readyz")
    assert status.startswith("503") and b"boom" in body
    assert call_app(app, "/nope")[0].startswith("404")


# --------------------------------------------------------------------------- multiprocess mode

WRITER = textwrap.dedent(
    """
    import sys
    from engine.metrics import EngineMetrics

    directory, accepted, active, version, age = sys.argv[1:6]
    m = EngineMetrics(multiprocess_dir=directory)
    for _ in range(int(accepted)):
        m.observe_decision("accept", "", 0.0004)
    m.observe_decision("reject", "ENGINE_DEGRADED", 0.001, "no snapshot loaded")
    m.active_calls.inc(int(active))
    m.set_snapshot(loaded=True, version=int(version), age=float(age), ready=True)
    print("ready", flush=True)
    if sys.stdin.readline().strip() == "exit":
        sys.exit(0)  # atexit: the process leaves the shared directory
    """
)


class Writer:
    def __init__(self, directory: Path, accepted: int, active: int, version: int, age: float) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(directory),
                str(accepted),
                str(active),
                str(version),
                str(age),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def exit(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("exit\n")
        self.process.stdin.flush()
        assert self.process.wait(timeout=10) == 0

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    started: list[Writer] = []
    yield started
    for writer in started:
        if writer.process.poll() is None:
            writer.kill()


def scrape_directory(directory: Path) -> CollectorRegistry:
    SharedDirectory(str(directory)).reap()  # what a serving process does before each scrape
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_multiprocess_totals_survive_a_killed_and_a_restarted_process(tmp_path: Path, writers) -> None:
    directory = tmp_path / "metrics"
    writers += [
        Writer(directory, 5, 2, 10, 0.5),
        Writer(directory, 7, 3, 12, 1.5),
        Writer(directory, 11, 4, 12, 0.2),
    ]
    reg = scrape_directory(directory)
    assert sample(reg, "callgate_decisions_total", result="accept", reason="") == 23
    assert sample(reg, "callgate_degraded_decisions_total", cause="no_snapshot") == 3
    assert sample(reg, "callgate_decision_duration_seconds_count") == 26
    assert sample(reg, "callgate_active_calls") == 9
    assert sample(reg, "callgate_engine_processes") == 3
    assert sample(reg, "callgate_snapshot_version") == 10  # the oldest process
    assert sample(reg, "callgate_snapshot_age_seconds") == 1.5  # the worst process
    assert sample(reg, "callgate_ready") == 1
    text = generate_latest(reg).decode()
    assert text.count("callgate_build_info{") == 1
    assert "pid=" not in text  # no per-process series

    writers[0].kill()  # SIGKILL: no chance to clean up
    reg = scrape_directory(directory)
    assert sample(reg, "callgate_decisions_total", result="accept", reason="") == 23  # counters kept
    assert sample(reg, "callgate_active_calls") == 7
    assert sample(reg, "callgate_engine_processes") == 2
    assert sample(reg, "callgate_snapshot_version") == 12

    writers[1].exit()  # clean exit
    reg = scrape_directory(directory)
    assert sample(reg, "callgate_active_calls") == 4
    assert sample(reg, "callgate_engine_processes") == 1
    assert sample(reg, "callgate_decisions_total", result="accept", reason="") == 23

    writers.append(Writer(directory, 1, 0, 13, 0.1))  # another process is alive: nothing is wiped
    reg = scrape_directory(directory)
    assert sample(reg, "callgate_decisions_total", result="accept", reason="") == 24
    assert sample(reg, "callgate_engine_processes") == 2

    writers[2].exit()
    writers[3].exit()
    writers.append(Writer(directory, 2, 1, 14, 0.1))  # the first of a new fleet starts afresh
    reg = scrape_directory(directory)
    assert sample(reg, "callgate_decisions_total", result="accept", reason="") == 2
    assert sample(reg, "callgate_engine_processes") == 1
    assert sample(reg, "callgate_active_calls") == 1


def test_shared_directory_recognises_dead_processes_by_their_free_lock(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    directory.mkdir()
    # Leftovers of a process that died long ago (pid 999999 cannot be running: above pid_max).
    (directory / "alive_999999.lock").write_text("")
    (directory / "gauge_livesum_999999.db").write_bytes(b"")
    (directory / "counter_999999.db").write_bytes(b"")
    first = SharedDirectory(str(directory))
    first.join()
    try:
        assert first.wiped  # nobody else alive: a fresh start
        assert not list(directory.glob("*.db"))
        assert not (directory / "alive_999999.lock").exists()
        assert (directory / f"alive_{os.getpid()}.lock").exists()
        # Another process (not joined) sees this one alive through its held lock.
        assert SharedDirectory(str(directory), pid=999998).live_pids() == {os.getpid()}
    finally:
        first.leave()
    assert not (directory / f"alive_{os.getpid()}.lock").exists()


def test_multiprocess_dir_is_a_metrics_setting(tmp_path: Path) -> None:
    config = load_config(environ={"CALLGATE_METRICS__MULTIPROCESS_DIR": str(tmp_path)})
    assert config.metrics.multiprocess_dir == str(tmp_path)
    toml = tmp_path / "c.toml"
    toml.write_text('[metrics]\nmultiprocess_dir = "/run/callgate/metrics"\n')
    assert load_config(toml, environ={}).metrics.multiprocess_dir == "/run/callgate/metrics"
    assert load_config(ROOT / "config" / "callgate.toml", environ={}).metrics.multiprocess_dir == ""
    toml.write_text("[metrics]\nmultiprocess_dir = 3\n")
    with pytest.raises(ConfigError):
        load_config(toml, environ={})


# --------------------------------------------------------------------------- logs


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield root
    root.handlers[:], level = saved
    root.setLevel(level)


def test_secrets_are_masked_wherever_they_appear() -> None:
    cases = {
        "login password=Secret123x ok": "Secret123x",
        "sip_auth_password: Secret123x": "Secret123x",
        '{"password": "hunter2"}': "hunter2",
        "redis://:s3cr3t@10.0.0.5:6379/0": "s3cr3t",
        "postgresql://callgate:dbpass@db/callgate": "dbpass",
        "Authorization: Bearer eyJhbGciOi": "eyJhbGciOi",
        "X-Api-Key: k-123456": "k-123456",
        "auth ClueCon": "ClueCon",
        "voicemail_pin=4321": "4321",
        "token=abc&x=1": "abc",
    }
    for text, secret in cases.items():
        masked = mask_secrets(text)
        assert secret not in masked and "***" in masked, (text, masked)
    assert mask_secrets("auth failed for alice") == "auth failed for alice"
    assert (
        mask_secrets("uuid=abc result=reject reason=CPS_LIMIT") == "uuid=abc result=reject reason=CPS_LIMIT"
    )


def test_json_log_line_carries_the_decision_fields_and_no_secret(root_logger) -> None:
    stream = io.StringIO()
    setup_logging(LoggingSettings(json=True, level="INFO"), stream=stream)
    decision = logging.getLogger("callgate.decision")
    decision.info(
        "uuid=%s result=%s reason=%s account=%s latency_ms=%.3f",
        "a1b2",
        "reject",
        "NO_SUFFICIENT_FUND",
        "1000000003",
        0.412,
        extra={"uuid": "a1b2", "result": "reject", "reason": "NO_SUFFICIENT_FUND", "account": "1000000003",
               "latency_ms": 0.412, "password": "Secret123x"},
    )  # fmt: skip
    try:
        raise RuntimeError("connect to redis://:topsecret@redis:6379 failed")
    except RuntimeError:
        logging.getLogger("callgate.serve").exception("token=abc123 went wrong")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["logger"] == "callgate.decision" and first["level"] == "INFO"
    assert (first["uuid"], first["account"], first["reason"], first["latency_ms"]) == (
        "a1b2",
        "1000000003",
        "NO_SUFFICIENT_FUND",
        0.412,
    )
    assert first["pid"] == os.getpid() and first["ts"].endswith("+00:00")
    assert first["password"] == "***"
    text = stream.getvalue()
    for secret in ("Secret123x", "topsecret", "abc123"):
        assert secret not in text
    assert "Traceback" in lines[1]["exception"]


def test_plain_log_masks_secrets_and_decision_level_is_configurable(root_logger) -> None:
    stream = io.StringIO()
    setup_logging(LoggingSettings(json=False, level="INFO", decision_level="DEBUG"), stream=stream)
    logging.getLogger("callgate.limits").warning("switch 10.0.0.1:8021 password=ClueCon refused")
    # decision_level DEBUG under level INFO: the decision lines are silenced.
    assert not logging.getLogger("callgate.decision").isEnabledFor(level_number("DEBUG"))
    text = stream.getvalue()
    assert "ClueCon" not in text and "password=***" in text and f"[{os.getpid()}]" in text
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging(LoggingSettings(level="LOUD"), stream=stream)


def test_json_formatter_includes_any_structured_field() -> None:
    record = logging.LogRecord("callgate.x", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    record.destination = "441234567890"
    record.sip_auth_password = "Secret123x"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello world"
    assert entry["destination"] == "441234567890"
    assert entry["sip_auth_password"] == "***"


# --------------------------------------------------------------------------- alert rules


def load_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_pass_promtool_check_rules(promtool: str) -> None:
    run = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_alert_rules_cover_the_required_alerts_and_name_real_metrics() -> None:
    rules = load_rules()
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    required = {
        "CallgateEngineDown",
        "CallgateRejectRatioSpike",
        "CallgateDecisionLatencyHigh",
        "CallgateSyncLagHigh",
        "CallgateDegradedDecisions",
        "CallgateReconcilerRemovingCalls",
    }
    assert required <= set(alerts)
    known = engine_metric_names() | sync_metric_names() | billing_metric_names() | fsxml_metric_names()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        unknown = promql_metric_names(rule["expr"]) - known
        assert not unknown, (rule.get("alert") or rule.get("record"), unknown)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        document, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert anchor == name.lower(), name
        assert f"### {name}" in (ROOT / document).read_text(), f"{document} has no runbook entry for {name}"
        for used in re.findall(r"\b[a-z]+:callgate_[a-z0-9_:]+", rule["expr"]):
            assert used in recorded, (name, used)


E1 = 'job="callgate",instance="e1"'
X1 = 'job="callgate-fsxml",instance="x1"'
HEALTHY_SERIES = {
    f"up{{{E1}}}": "1x180",
    f"callgate_ready{{{E1}}}": "1x180",
    f'callgate_decisions_total{{{E1},result="accept",reason=""}}': "0+540x180",
    f'callgate_decisions_total{{{E1},result="reject",reason="CPS_LIMIT"}}': "0+60x180",
    f'callgate_degraded_decisions_total{{{E1},cause="no_snapshot"}}': "0x180",
    f'callgate_decision_duration_seconds_bucket{{{E1},le="0.001"}}': "0+590x180",
    f'callgate_decision_duration_seconds_bucket{{{E1},le="0.02"}}': "0+600x180",
    f'callgate_decision_duration_seconds_bucket{{{E1},le="+Inf"}}': "0+600x180",
    f"callgate_reconciler_removals_total{{{E1}}}": "0x180",
    'callgate_sync_lag_seconds_bucket{job="callgate-sync",instance="s1",le="1"}': "0+10x180",
    'callgate_sync_lag_seconds_bucket{job="callgate-sync",instance="s1",le="+Inf"}': "0+10x180",
    'callgate_sync_leader{job="callgate-sync",instance="s1"}': "1x180",
    'callgate_sync_last_apply_timestamp_seconds{job="callgate-sync",instance="s1"}': "0+60x180",
    'callgate_cdr_backlog{job="callgate-sync",instance="s1"}': "0x180",
    'callgate_cdr_lag_seconds{job="callgate-sync",instance="s1"}': "0x180",
    # one 503 (a Redis blip) retried and billed: no alert
    f'callgate_fsxml_cdr_posts_total{{{X1},outcome="unavailable"}}': "0x90 1x90",
    f'callgate_fsxml_cdr_posts_total{{{X1},outcome="billed"}}': "0+30x180",
}
# Two healthy hours, then the engine stops answering, rejects jump from 10% to 60%, decisions
# slow down, calls are answered ENGINE_DEGRADED, the reconciler releases many calls, the sync lags.
TROUBLE_SERIES = {
    f"up{{{E1}}}": "1x120 0x30",
    f"callgate_ready{{{E1}}}": "1x120 0x30",
    f'callgate_decisions_total{{{E1},result="accept",reason=""}}': "0+540x120 64800+240x30",
    f'callgate_decisions_total{{{E1},result="reject",reason="CPS_LIMIT"}}': "0+60x120 7200+360x30",
    f'callgate_degraded_decisions_total{{{E1},cause="limits_unavailable"}}': "0x120 0+30x30",
    f'callgate_decision_duration_seconds_bucket{{{E1},le="0.02"}}': "0+600x120 72000+100x30",
    f'callgate_decision_duration_seconds_bucket{{{E1},le="0.05"}}': "0+600x120 72000+600x30",
    f'callgate_decision_duration_seconds_bucket{{{E1},le="+Inf"}}': "0+600x120 72000+600x30",
    f"callgate_reconciler_removals_total{{{E1}}}": "0x120 0+5x30",
    'callgate_sync_lag_seconds_bucket{job="callgate-sync",instance="s1",le="1"}': "0+10x120 1200x30",
    'callgate_sync_lag_seconds_bucket{job="callgate-sync",instance="s1",le="30"}': "0+10x120 1200+10x30",
    'callgate_sync_lag_seconds_bucket{job="callgate-sync",instance="s1",le="+Inf"}': "0+10x120 1200+10x30",
    'callgate_sync_leader{job="callgate-sync",instance="s1"}': "1x120 0x30",
    'callgate_sync_last_apply_timestamp_seconds{job="callgate-sync",instance="s1"}': "0+60x120 7200x30",
    'callgate_cdr_backlog{job="callgate-sync",instance="s1"}': "0x120 0+2000x30",
    'callgate_cdr_lag_seconds{job="callgate-sync",instance="s1"}': "0x120 0+60x30",
    f'callgate_fsxml_cdr_posts_total{{{X1},outcome="unavailable"}}': "0x120 0+6x30",
}
ENGINE = {"job": "callgate", "instance": "e1"}
# alert -> (its labels besides severity, the summary rendered for TROUBLE_SERIES at 135m)
EXPECTED_ALERTS = {
    "CallgateEngineDown": (ENGINE, "callgate engine e1 does not answer scrapes"),
    "CallgateNotReady": (ENGINE, "callgate on e1 cannot decide calls"),
    "CallgateRejectRatioSpike": (
        {"job": "callgate"},
        "60% of calls rejected, over twice the last hour's share",
    ),
    "CallgateDecisionLatencyHigh": (
        ENGINE,
        "callgate p99 decision latency on e1 is 49.64ms (budget 20ms)",
    ),
    "CallgateDegradedDecisions": (ENGINE, "callgate on e1 answers ENGINE_DEGRADED (0.50/s)"),
    "CallgateReconcilerRemovingCalls": (
        {"job": "callgate"},
        "The reconciler released 70 counted calls in 15 minutes",
    ),
    "CallgateSyncNoLeader": (
        {"job": "callgate-sync"},
        "No callgate sync worker holds the leader lease: PostgreSQL changes are not applied",
    ),
    "CallgateSyncStalled": ({"job": "callgate-sync"}, "The sync worker has not reached Redis for 15m 0s"),
    "CallgateSyncLagHigh": ({"job": "callgate-sync"}, "PostgreSQL changes take 29.71s (p99) to reach Redis"),
    "CallgateCdrBacklogGrowing": (
        {"job": "callgate-sync"},
        "28k CDRs wait for PostgreSQL and the backlog keeps growing",
    ),
    "CallgateCdrLagHigh": ({"job": "callgate-sync"}, "The oldest CDR not yet in PostgreSQL ended 14m 0s ago"),
    "CallgateCdrPostsUnavailable": (
        {"job": "callgate-fsxml", "instance": "x1"},
        "callgate fsxml on x1 answered 30 CDR posts 503 in 5 minutes",
    ),
}


def alert_unit_tests() -> dict:
    alerts = {rule["alert"]: rule for rule in load_rules() if "alert" in rule}
    quiet = [{"eval_time": "170m", "alertname": name, "exp_alerts": []} for name in EXPECTED_ALERTS]
    firing = []
    for name, (labels, summary) in EXPECTED_ALERTS.items():
        rule = alerts[name]
        expected: dict = {"exp_labels": {**labels, "severity": rule["labels"]["severity"]}}
        if summary is not None:
            expected["exp_annotations"] = {**rule["annotations"], "summary": summary}
        firing.append({"eval_time": "135m", "alertname": name, "exp_alerts": [expected]})

    def series(spec: dict[str, str]) -> list[dict[str, str]]:
        return [{"series": name, "values": values} for name, values in spec.items()]

    return {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": series(HEALTHY_SERIES), "alert_rule_test": quiet},
            {"interval": "1m", "input_series": series(TROUBLE_SERIES), "alert_rule_test": firing},
        ],
    }


def test_alerts_fire_on_trouble_and_stay_quiet_when_healthy(promtool: str, tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(yaml.safe_dump(alert_unit_tests(), sort_keys=False))
    run = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_metrics_output_passes_promtool_check_metrics(promtool: str) -> None:
    metrics = EngineMetrics()
    metrics.observe_decision("accept", "", 0.0003)
    metrics.observe_decision("reject", "ENGINE_DEGRADED", 0.001, "no snapshot loaded")
    with metrics.redis_call("limits"):
        pass
    run = subprocess.run(
        [promtool, "check", "metrics"], input=exposition(metrics), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # Lint findings (e.g. "counter metrics should have _total suffix") are printed even at exit 0.
    assert not [line for line in (run.stdout + run.stderr).splitlines() if "callgate_" in line], run.stdout


# --------------------------------------------------------------------------- dashboard


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def test_dashboard_is_valid_grafana_json_over_real_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance", "sync_job"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel.get("description"), panel["title"]
    queries = dashboard_queries(dashboard)
    used = set().union(*(promql_metric_names(expr) for _, expr in queries))
    known = engine_metric_names() | sync_metric_names()
    assert not used - known, used - known
    # The panels an SRE needs at a glance.
    for name in (
        "callgate_decisions_total",
        "callgate_decision_duration_seconds",
        "callgate_active_calls",
        "callgate_degraded_decisions_total",
        "callgate_limit_rejections_total",
        "callgate_snapshot_age_seconds",
        "callgate_sync_lag_seconds",
        "callgate_reconciler_removals_total",
        "callgate_socket_errors_total",
        "callgate_redis_request_duration_seconds",
    ):
        assert name in used, name


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, as a recording rule for promtool."""
    dashboard = json.loads(DASHBOARD.read_text())
    substitutions = {"$__rate_interval": "5m", "$job": "callgate", "$instance": ".*", "$sync_job": ".*"}
    rules = []
    for n, (title, expr) in enumerate(dashboard_queries(dashboard)):
        for variable, filled in substitutions.items():
            expr = expr.replace(variable, filled)
        assert "$" not in expr, (title, expr)
        rules.append({"record": f"dashboard:panel_{n}:query", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# --------------------------------------------------------------------------- docs


def test_operating_doc_lists_every_metric() -> None:
    text = OPERATING.read_text()
    for name in sorted(engine_metric_names() | sync_metric_names()):
        assert f"`{name}`" in text, f"docs/operations.md does not describe {name}"
