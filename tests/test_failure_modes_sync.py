"""The failure modes of docs/sync.md ("Failure modes") that no other test proved.

Each test takes a row of that table (a condition, and the decision the worker or the engines
take) and shows the decision with the real parts: PostgreSQL (this module's database), Redis
(the shared server under a key prefix of the test's own, or a redis-server of the test's own
that is stopped, started and restored from a backup: tests/private_redis.py), the real
`SyncWorker` (its loop in a thread, or its steps driven one by one) and the engine's
`SnapshotHolder` and `Decider`.

Rows proven elsewhere (test_sync.py unless said):
* a worker stopped, or killed and replaced by a standby: tests/test_sync_e2e.py;
* another database: test_lost_state_or_another_database_means_a_full_publish;
* a log pruned past a restored state: test_a_pruned_log_behind_the_state_means_a_full_publish;
* a pub/sub message lost, seen by the poll:
  test_holder_applies_changes_in_place_and_fills_gaps_from_the_journal;
* a long-running write transaction: test_a_late_commit_with_a_lower_version_is_not_missed;
* drift: test_sweep_repairs_drift; log growth: test_prune_deletes_applied_changes_only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import cast

import psycopg
import pytest
import redis
from prometheus_client import CollectorRegistry

from engine.config import Config
from engine.decider import Decider
from engine.decision import Decision, Reason, Reject
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.state.codec import encode_entity
from engine.state.events import EventPublisher
from engine.state.keys import events_stream, sync_journal_key, sync_leader_key
from engine.state.snapshot import SnapshotUnavailable, current_stamp, delete_prefix, read_snapshot
from engine.state.watcher import SnapshotHolder
from engine.sync import pg
from engine.sync.metrics import SyncMetrics
from engine.sync.persist import GROUP, EventPersister
from engine.sync.state import read_state
from engine.sync.worker import SyncWorker
from tests.conftest import PG_ADMIN_URL
from tests.private_redis import PrivateRedis, private_redis_fixture, quick_client  # noqa: F401
from tests.support import config_for, prepare_database, wait_until
from tests.test_sync import CATALOGUE, assert_redis_equals_postgres, sync_environment

ALICE, BOB = "1000000001", "1000000002"
# A call of alice's (a rate for 44); without a limiter, the decider answers from the held
# catalogue alone (an accept, or a reject of the rules).
CALL = CallRequest(uuid="failure-modes", destination="442071234567", sip_auth_username="alice")


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database_url(module_pg_url: str) -> str:
    """The module's database holding CATALOGUE. Each test has a Redis prefix (or a redis-server)
    of its own, so its worker starts with a whole snapshot and needs nothing of the log before;
    each test writes balances no other test writes."""
    prepare_database(module_pg_url, CATALOGUE)
    return module_pg_url


def make_config(pg_url: str, redis_url: str, prefix: str, **sync: str) -> Config:
    overrides = {f"CALLGATE_SYNC__{name.upper()}": value for name, value in sync.items()}
    return config_for(sync_environment(pg_url, redis_url, prefix, **overrides))


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database, opened before any fault is injected."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@contextlib.contextmanager
def running(worker: SyncWorker) -> Iterator[None]:
    """`worker.run` in a thread (its lease keeper, event persister and sync loop), stopped after."""
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name=f"run-{worker.worker_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the sync worker did not stop"


@contextlib.contextmanager
def holding(holder: SnapshotHolder[Catalog], interval: float) -> Iterator[SnapshotHolder[Catalog]]:
    """`holder.run` in a thread, as the engine runs it (poll every `interval` s), stopped after."""
    stop = threading.Event()
    thread = threading.Thread(target=holder.run, args=(stop, interval), daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the snapshot holder did not stop"


def set_balance(db: psycopg.Connection, number: str, balance: str) -> None:
    db.execute("UPDATE accounts SET balance = %s WHERE number = %s AND NOT deleted", [balance, number])


def pg_balance(db: psycopg.Connection, number: str) -> Decimal:
    row = db.execute("SELECT balance FROM accounts WHERE number = %s AND NOT deleted", [number]).fetchone()
    assert row is not None
    return Decimal(row[0])


def redis_balance(client: redis.Redis, prefix: str, number: str) -> Decimal | None:
    """The account's balance in the current Redis snapshot (None: no snapshot readable now)."""
    try:
        accounts = read_snapshot(client, prefix).accounts
    except (SnapshotUnavailable, redis.RedisError):
        return None
    return next(a.balance for a in accounts if a.number == number)


def counter(metrics: SyncMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def full_publishes(metrics: SyncMetrics) -> dict[str, float]:
    """reason -> whole snapshots the worker published."""
    found: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "callgate_sync_full_resyncs_total" and sample.value:
                found[sample.labels["reason"]] = sample.value
    return found


def degraded(decision: Decision) -> bool:
    return isinstance(decision, Reject) and decision.reason is Reason.ENGINE_DEGRADED


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# --- PostgreSQL down, or the worker's connection killed ------------------------------------------


def test_postgres_cut_off_releases_the_lease_backs_off_and_catches_up_on_reconnection(
    database_url: str,
    redis_url: str,
    key_prefix: str,
    db: psycopg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reconnects with exponential backoff capped at `reconnect_max_delay`, releases the lease
    while cut off (it does not wait for it to expire), and on reconnecting catches up from the
    state: the change committed meanwhile arrives, with no whole snapshot published."""
    # A lease of 3 s would lapse by itself only 3 s after its last renewal; the keeper renews it
    # every second, and a worker cut off from PostgreSQL releases it at its next turn.
    config = make_config(
        database_url,
        redis_url,
        key_prefix,
        lease_seconds="3",
        reconnect_max_delay="0.2",
        check_interval="0.5",
    )
    client = redis.Redis.from_url(redis_url)
    worker = SyncWorker(config, worker_id="cut-off")
    name = database_url.rpartition("/")[2]
    caplog.set_level(logging.INFO, logger="callgate.sync")
    before = pg_balance(db, ALICE)
    with running(worker), psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        wait_until(lambda: worker.caught_up.is_set() and worker.lease.held, what="the worker leading")
        assert client.get(sync_leader_key(key_prefix)) == b"cut-off"
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name LIKE 'callgate-sync%%'",
                [name],
            )
            set_balance(db, ALICE, "31.00")  # committed while the worker cannot connect
            wait_until(
                lambda: client.get(sync_leader_key(key_prefix)) is None, timeout=10, what="the lease released"
            )
            assert any("lease released" in r.getMessage() for r in caplog.records), "released, not expired"
            # Without the cap the wait after the 9th failure would be 0.1 * 2**8 = 25.6 s; with it, 0.2 s.
            wait_until(lambda: worker.failures >= 9, timeout=15, what="nine failed reconnections")
            assert redis_balance(client, key_prefix, ALICE) == before  # nothing applied meanwhile
            assert counter(worker.metrics, "callgate_sync_errors_total", kind="postgres") >= 9
        finally:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        back = time.monotonic()
        wait_until(
            lambda: redis_balance(client, key_prefix, ALICE) == Decimal("31.00"),
            timeout=15,
            what="the change made while cut off",
        )
        took = time.monotonic() - back
        assert took < 8, f"applied {took:.1f}s after PostgreSQL came back: the backoff is not capped"
        assert worker.lease.held
    client.close()
    # the first start's publish only: it caught up from the state
    assert full_publishes(worker.metrics) == {"no_snapshot": 1}
    assert any("sync recovered after" in r.getMessage() for r in caplog.records)


# --- Redis down -----------------------------------------------------------------------------------


def test_redis_down_the_lease_lapses_and_the_worker_retries_until_it_is_back(
    private_redis: PrivateRedis, database_url: str, db: psycopg.Connection
) -> None:
    config = make_config(
        database_url,
        private_redis.url,
        "cg:",
        lease_seconds="1.5",
        reconnect_max_delay="0.2",
        check_interval="0.3",
    )
    probe = quick_client(private_redis.port)
    worker = SyncWorker(config, worker_id="redis-down")
    with running(worker):
        wait_until(lambda: worker.caught_up.is_set() and worker.lease.held, what="the worker leading")
        private_redis.stop()  # saves its data and exits
        wait_until(lambda: not worker.lease.held, timeout=10, what="the lease lapsing")
        wait_until(lambda: counter(worker.metrics, "callgate_sync_errors_total", kind="redis") >= 1)
        set_balance(db, ALICE, "32.00")  # committed while Redis is down
        private_redis.start()
        wait_until(
            lambda: redis_balance(probe, "cg:", ALICE) == Decimal("32.00"),
            timeout=20,
            what="the change made while Redis was down",
        )
        assert worker.lease.held  # taken again, without a restart
    probe.close()


def test_engines_decide_from_memory_while_redis_is_down_then_answer_engine_degraded(
    private_redis: PrivateRedis, database_url: str
) -> None:
    """Until `snapshot_max_age` the held catalogue decides; past it every call is ENGINE_DEGRADED;
    once Redis is back the holder confirms its snapshot again and the engine decides again.
    (The decider here has no limiter: a call that needs the limits script is refused at once
    while Redis is down, see tests/ha/test_redis_restart.py.)"""
    config = make_config(database_url, private_redis.url, "cg:")
    worker = SyncWorker(config, worker_id="publisher")
    worker.connect()
    try:
        assert worker.catch_up().full
    finally:
        worker.close()
        worker.redis.close()
    client = quick_client(private_redis.port)
    max_age = 1.5
    holder: SnapshotHolder[Catalog] = SnapshotHolder(client, "cg:", Catalog.build, backoff_initial=0.05)
    decider = Decider(holder, RulesConfig(), max_age=max_age)
    with holding(holder, interval=0.2):
        wait_until(lambda: holder.loaded and holder.confirmed_age() < 1, what="the first load")
        assert not degraded(decider(CALL))
        private_redis.stop()
        assert not answers(client)
        decision = decider(CALL)
        if holder.confirmed_age() <= max_age:  # always, unless this machine stalled for seconds
            assert not degraded(decision), decision  # decided from memory

        def refused() -> Decision | None:
            decision = decider(CALL)
            return decision if degraded(decision) else None

        first = wait_until(refused, timeout=15, what="ENGINE_DEGRADED past max_age")
        assert cast(Reject, first).detail.startswith("snapshot unconfirmed for ")
        assert holder.confirmed_age() > max_age
        private_redis.start()
        wait_until(lambda: not degraded(decider(CALL)), timeout=15, what="deciding again")
    client.close()


def test_engine_events_queue_while_redis_is_down_then_are_dropped_and_counted(
    private_redis: PrivateRedis,
) -> None:
    """The batch in flight is retried and the queue fills; past it, events are dropped and
    counted (`callgate_events_dropped_total`); the queued ones reach the stream once Redis is back."""
    client = quick_client(private_redis.port)
    registry = CollectorRegistry()
    publisher = EventPublisher(
        client, "cg:", queue_size=4, batch_size=2, retry_max=0.2, dedupe_seconds=0, registry=registry
    )
    stop = threading.Event()
    drain = threading.Thread(target=publisher.run, args=(stop,), daemon=True)
    drain.start()
    try:
        private_redis.stop()
        assert publisher.call_record("call-0", data={"n": 0})  # taken as the batch in flight
        wait_until(lambda: publisher.failures >= 1, what="the batch failing")
        accepted = [publisher.call_record(f"call-{n}", data={"n": n}) for n in range(1, 8)]
        assert accepted == [True] * 4 + [False] * 3  # the queue holds 4; the rest is dropped
        assert publisher.pending == 5 and publisher.dropped == 3
        dropped = registry.get_sample_value(
            "callgate_events_dropped_total", {"type": "call_record", "reason": "queue_full"}
        )
        assert dropped == 3
        private_redis.start()
        wait_until(lambda: publisher.published == 5, timeout=15, what="the queued events published")
        assert client.xlen(events_stream("cg:")) == 5 and publisher.pending == 0
    finally:
        stop.set()
        drain.join(10)
        client.close()


# --- Redis flushed -----------------------------------------------------------------------------


def test_after_a_flush_engines_keep_their_catalogue_degrade_past_max_age_and_reload_the_new_snapshot(
    database_url: str, redis_url: str, key_prefix: str, client: redis.Redis
) -> None:
    config = make_config(database_url, redis_url, key_prefix)
    worker = SyncWorker(config, worker_id="flush")
    worker.connect()
    max_age = 1.0
    holder: SnapshotHolder[Catalog] = SnapshotHolder(
        client, key_prefix, Catalog.build, backoff_initial=0.05, backoff_max=0.2
    )
    decider = Decider(holder, RulesConfig(), max_age=max_age)
    try:
        assert worker.catch_up().full
        with holding(holder, interval=0.1):
            wait_until(lambda: holder.loaded and holder.confirmed_age() < 1, what="the first load")
            catalog = holder.current[1]
            delete_prefix(client, key_prefix)  # what FLUSHDB does to this deployment
            with pytest.raises(SnapshotUnavailable):
                holder.refresh()
            decision = decider(CALL)
            if holder.confirmed_age() <= max_age:
                assert not degraded(decision), decision  # the held catalogue still decides
            assert holder.current[1] is catalog
            wait_until(lambda: degraded(decider(CALL)), timeout=15, what="ENGINE_DEGRADED past max_age")
            assert holder.current[1] is catalog  # kept, never half-emptied
            result = worker.catch_up()  # the worker notices: no snapshot
            assert result.full and result.reason == "no_snapshot"
            wait_until(lambda: holder.current[1] is not catalog, timeout=15, what="the new snapshot loaded")
            wait_until(lambda: not degraded(decider(CALL)), timeout=15, what="deciding again")
            assert holder.stamp == current_stamp(client, key_prefix)
    finally:
        worker.close()
        worker.redis.close()


def test_a_flush_recreates_the_events_consumer_group(
    database_url: str, redis_url: str, key_prefix: str, client: redis.Redis, db: psycopg.Connection
) -> None:
    """The worker's event persister, reading in its consumer group when the stream and the group
    vanish, makes the group again: events written after the flush still reach PostgreSQL."""
    stream = events_stream(key_prefix)
    persister = EventPersister(
        client, key_prefix, lambda: psycopg.connect(database_url), "flush-test", metrics=SyncMetrics(),
        backoff_max=0.2,
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=persister.run, args=(stop, 200), daemon=True)
    thread.start()

    def record(call_uuid: str) -> None:
        at = datetime.now(UTC).isoformat()
        client.xadd(stream, {"type": "call_record", "v": "1", "uuid": call_uuid, "account_id": "", "at": at,
                             "data": "{}"})  # fmt: skip

    def persisted(call_uuid: str) -> bool:
        return db.execute("SELECT 1 FROM call_records WHERE uuid = %s", [call_uuid]).fetchone() is not None

    try:
        record("before-flush")
        wait_until(lambda: persisted("before-flush"), what="the first event persisted")
        delete_prefix(client, key_prefix)
        record("after-flush")  # on a new stream (with the group only if the persister made it again)
        wait_until(lambda: persisted("after-flush"), timeout=15, what="the event written after the flush")
        assert [g["name"] for g in client.xinfo_groups(stream)] == [GROUP.encode()]
    finally:
        stop.set()
        thread.join(10)


# --- Redis restored from an older backup -------------------------------------------------------


def test_redis_restored_from_an_older_backup_is_caught_up_from_its_state(
    private_redis: PrivateRedis, database_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    """The restored data and state match (one atomic script wrote both): a worker started after the
    restore (which cannot know what was lost) catches up from that state, without a whole
    snapshot, and an engine that held newer data follows. (The worker that wrote the lost changes
    publishes anew instead: the next test.)"""
    config = make_config(database_url, private_redis.url, "cg:")
    client = quick_client(private_redis.port, timeout=5)
    worker = SyncWorker(config, worker_id="restore")
    worker.connect()
    try:
        assert worker.catch_up().full
        set_balance(db, ALICE, "41.00")
        assert worker.catch_up().applied == 1
        client.save()  # the backup: an RDB file taken now
        backup = tmp_path / "backup.rdb"
        shutil.copy(Path(private_redis.dir) / "dump.rdb", backup)
        set_balance(db, BOB, "42.00")
        worker.catch_up()
        set_balance(db, ALICE, "43.00")
        worker.catch_up()
        holder: SnapshotHolder[Catalog] = SnapshotHolder(client, "cg:", Catalog.build, subscribe=False)
        holder.refresh()
        assert holder.stamp is not None and holder.stamp.changes == 3
        private_redis.stop()
        shutil.copy(backup, Path(private_redis.dir) / "dump.rdb")
        private_redis.start()  # Redis as it was at the backup: 1 change applied
        restored = read_state(client, "cg:")
        assert restored is not None and restored.changes == 1
        set_balance(db, BOB, "44.00")  # and one committed after the restore
        worker.close()
        worker.redis.close()
        worker = SyncWorker(config, worker_id="started-after-the-restore")
        worker.connect()
        wait_until(lambda: answers(worker.redis), what="the worker's client connecting")
        result = worker.catch_up()
        assert not result.full and result.version == restored.version, result
        assert result.applied == 2  # alice and bob: what the backup missed, from the log
        assert_redis_equals_postgres(client, config)
        assert holder.refresh() is True  # (version, token, 2) is not the held (…, 3): it reloads
        accounts = holder.current[1].accounts_by_number
        assert (accounts[ALICE].balance, accounts[BOB].balance) == (Decimal(43), Decimal(44))
    finally:
        worker.close()
        worker.redis.close()
        client.close()


def test_an_engine_follows_a_restored_redis_even_when_the_change_count_catches_up_with_its_own(
    database_url: str, redis_url: str, key_prefix: str, client: redis.Redis, db: psycopg.Connection
) -> None:
    """The worker that wrote the changes a restore lost publishes a new version (went_back): had it
    caught up from the restored count, two catch-ups would bring the count back to the engine's
    own (3), with other data, and the engine would keep the changes only it had."""
    config = make_config(database_url, redis_url, key_prefix)
    worker = SyncWorker(config, worker_id="restore-race")
    worker.connect()
    try:
        set_balance(db, BOB, "5.00")
        worker.catch_up()
        set_balance(db, ALICE, "1.00")
        worker.catch_up()
        backup = {key: client.dump(key) for key in client.scan_iter(match=f"{key_prefix}*")}
        set_balance(db, ALICE, "2.00")
        worker.catch_up()
        set_balance(db, ALICE, "3.00")
        worker.catch_up()
        holder: SnapshotHolder[Catalog] = SnapshotHolder(client, key_prefix, Catalog.build, subscribe=False)
        holder.refresh()  # holds changes 3: alice 3
        delete_prefix(client, key_prefix)  # restored from the backup (changes 1: alice 1)
        for key, value in backup.items():
            client.restore(key, 0, cast(bytes, value), replace=True)
        set_balance(db, ALICE, "4.00")
        first = worker.catch_up()  # from changes 1, below what this worker wrote: a new version
        assert first.full and first.reason == "went_back"
        set_balance(db, BOB, "7.00")
        worker.catch_up()
        assert_redis_equals_postgres(client, config)
        holder.refresh()
        accounts = holder.current[1].accounts_by_number
        assert (accounts[ALICE].balance, accounts[BOB].balance) == (Decimal(4), Decimal(7))
    finally:
        worker.close()
        worker.redis.close()


# --- a pub/sub message lost; a NOTIFY lost ----------------------------------------------------


def test_the_next_event_after_a_lost_one_shows_the_gap_and_the_journal_fills_it(
    database_url: str, redis_url: str, key_prefix: str, client: redis.Redis, db: psycopg.Connection
) -> None:
    config = make_config(database_url, redis_url, key_prefix)
    worker = SyncWorker(config, worker_id="gap")
    worker.connect()
    try:
        worker.catch_up()
        holder: SnapshotHolder[Catalog] = SnapshotHolder(client, key_prefix, Catalog.build, subscribe=False)
        holder.refresh()
        catalog = holder.current[1]
        set_balance(db, ALICE, "21.00")
        worker.catch_up()  # change 1: its message is lost
        set_balance(db, BOB, "22.00")
        worker.catch_up()  # change 2: its message arrives
        last = client.xrevrange(sync_journal_key(key_prefix), count=1)
        second = json.loads(cast(list[tuple[bytes, dict[bytes, bytes]]], last)[0][1][b"payload"])
        assert second["changes"] == 2
        assert holder.apply_events([second]) is True
        assert holder.current[1] is catalog and holder.full_loads == 1  # in place, from the journal
        assert catalog.accounts_by_number[ALICE].balance == Decimal(21)  # the lost one too
        assert catalog.accounts_by_number[BOB].balance == Decimal(22)
        assert holder.stamp is not None and holder.stamp.changes == 2
    finally:
        worker.close()
        worker.redis.close()


def test_a_lost_notify_is_picked_up_by_the_check_interval(
    database_url: str,
    redis_url: str,
    key_prefix: str,
    client: redis.Redis,
    db: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that never LISTENs loses every notification: the log still has the changes, and
    the catch-up it runs every `check_interval` applies them."""
    listened: list[psycopg.Connection] = []
    monkeypatch.setattr(pg, "listen", listened.append)  # LISTEN never sent: every NOTIFY is lost
    config = make_config(database_url, redis_url, key_prefix, check_interval="0.3")
    worker = SyncWorker(config, worker_id="deaf")
    with running(worker):
        wait_until(lambda: worker.caught_up.is_set(), what="the first catch-up")
        assert listened  # the worker's LISTEN went nowhere
        set_balance(db, ALICE, "23.00")
        wait_until(
            lambda: redis_balance(client, key_prefix, ALICE) == Decimal("23.00"),
            timeout=10,
            what="the change without its notification",
        )


# --- drift; log growth -----------------------------------------------------------------------


def test_the_worker_loop_sweeps_drift_and_prunes_the_log_on_its_intervals(
    database_url: str,
    redis_url: str,
    key_prefix: str,
    client: redis.Redis,
    db: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweep runs every `sweep_interval` in the worker's loop (a thread) and the next
    catch-up rewrites what it found; the prune runs every `prune_interval`, from the state, with
    `changelog_retention` (what it deletes: test_prune_deletes_in_batches_until_done)."""
    prunes: list[tuple[str, float]] = []
    real_prune = pg.prune

    def prune(conn: psycopg.Connection, applied: str, retention_seconds: float, batch: int = 50_000) -> int:
        prunes.append((applied, retention_seconds))
        return real_prune(conn, applied, retention_seconds, batch)

    monkeypatch.setattr(pg, "prune", prune)
    config = make_config(
        database_url, redis_url, key_prefix,
        sweep_interval="0.5", prune_interval="0.3", changelog_retention="0", check_interval="0.3",
    )  # fmt: skip
    worker = SyncWorker(config, worker_id="housekeeping")
    with running(worker):
        wait_until(lambda: worker.caught_up.is_set(), what="the first catch-up")
        data = read_snapshot(client, key_prefix)
        alice = next(a for a in data.accounts if a.number == ALICE)
        forged = encode_entity(dataclasses.replace(alice, balance=Decimal(999)))
        client.hset(f"{key_prefix}snapshot:{data.version}:accounts", str(alice.id), forged)  # drift
        wait_until(
            lambda: redis_balance(client, key_prefix, ALICE) == pg_balance(db, ALICE),
            timeout=15,
            what="the drift repaired",
        )
        assert worker.metrics.drift_repaired._value.get() >= 1
        wait_until(lambda: len(prunes) >= 3, timeout=15, what="three prunes")
        state = read_state(client, key_prefix)
        assert state is not None
        assert prunes[-1] == (state.pg_snapshot, 0.0)


def test_prune_deletes_in_batches_until_done(database_url: str, db: psycopg.Connection) -> None:
    """Every log row an applied snapshot has seen goes, however many batches it takes, and
    `callgate_sync_state.pruned_through` records how far. (The applied snapshot here is one that
    saw everything committed so far: a real state's xmin may be held back by any session of the
    cluster, other test runs included.)"""
    for n in range(5):
        set_balance(db, ALICE, f"{50 + n}.00")  # five transactions, one log row each
    row = db.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    assert row is not None
    seen_all = f"{row[0]}:{row[0]}:"  # every transaction before xmax has committed
    below = "SELECT count(*), max(txid)::text FROM callgate_changes WHERE txid < %s::xid8"
    found = db.execute(below, [row[0]]).fetchone()
    assert found is not None
    count, newest = int(found[0]), found[1]
    assert count >= 5  # at least three batches of 2
    assert pg.prune(db, seen_all, 0.0, batch=2) == count
    assert db.execute(below, [row[0]]).fetchone() == (0, None)
    through = db.execute("SELECT pruned_through::text FROM callgate_sync_state").fetchone()
    assert through == (newest,)
