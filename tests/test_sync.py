"""Live sync, in process: change log, catch-up, full publishes, compare-and-set, sweep, prune, events.

Real PostgreSQL (a fresh database per test) and Redis (a private key prefix); the
worker's steps are driven one by one (``SyncWorker.catch_up`` etc.), without its threads.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import redis
from psycopg.abc import Params, QueryNoTemplate

import engine.model
import engine.rules
from engine.config import Config
from engine.db.loader import load_catalog, load_entities
from engine.model import CatalogData, SipDevice
from engine.rules.catalog import Catalog
from engine.rules.gate import FirstUse
from engine.state.codec import encode_entity
from engine.state.events import EventPublisher
from engine.state.image import ImageStore, code_fingerprint
from engine.state.keys import events_stream, image_blob_key, sync_journal_key, sync_state_key
from engine.state.snapshot import SchemaMismatch, current_stamp, read_snapshot
from engine.state.watcher import SnapshotHolder
from engine.sync import publish_once
from engine.sync.persist import EventPersister
from engine.sync.state import StateMoved, apply_batch, read_state
from engine.sync.worker import SyncWorker
from tests.support import config_for, engine_environment, prepare_database, run_cli, wait_until

# What XRANGE / XREVRANGE return to a client without decode_responses (no deleted entries here).
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]

CATALOGUE: dict[str, Any] = {
    "gateways": [{"name": "gw-1"}, {"name": "gw-2"}],
    "providers": [
        {
            "number": "9000000001",
            "company": "Carrier",
            "trunks": [
                {
                    "name": "carrier",
                    "gateway": "gw-1",
                    "termination_rates": [{"prefix": "44", "cost_per_minute": "0.0050"}],
                },
                {"name": "spare", "gateway": "gw-2"},
            ],
        }
    ],
    "rate_groups": [
        {
            "name": "retail",
            "trunks": ["carrier"],
            "rates": [
                {"prefix": "44", "cost_per_minute": "0.0100"},
                {"prefix": "33", "cost_per_minute": "0.02"},
            ],
        }
    ],
    "customers": [
        {
            "number": "1000000001",
            "email": "alice@example.com",
            "password": "Alice2024x",
            "balance": "10.00",
            "rate_group": "retail",
            "sip_devices": [{"username": "alice", "password": "Secret123x"}],
            "blocked_codes": ["449"],
            "speed_dials": [{"key": "1", "number": "442079460000"}],
        },
        {
            "number": "1000000002",
            "email": "bob@example.com",
            "password": "Bobby2024x",
            "balance": "5.00",
            "rate_group": "retail",
            "sip_devices": [{"username": "bob", "password": "Secret123x"}],
        },
    ],
}


def sync_environment(pg_url: str, redis_url: str, prefix: str, **overrides: str) -> dict[str, str]:
    return engine_environment(
        pg_url,
        redis_url,
        prefix,
        CALLGATE_SYNC__METRICS_PORT="0",
        CALLGATE_SYNC__BULK_THRESHOLD="50",
        **overrides,
    )


@pytest.fixture
def env(fresh_pg_url: str, redis_url: str, key_prefix: str) -> dict[str, str]:
    prepare_database(fresh_pg_url, CATALOGUE)
    return sync_environment(fresh_pg_url, redis_url, key_prefix)


@pytest.fixture
def config(env: dict[str, str]) -> Config:
    return config_for(env)


@pytest.fixture
def db(config: Config) -> Iterator[psycopg.Connection]:
    with psycopg.connect(config.database.url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def new_worker(config: Config) -> Iterator[Callable[..., SyncWorker]]:
    made: list[SyncWorker] = []

    def make(**sync: Any) -> SyncWorker:
        cfg = dataclasses.replace(config, sync=dataclasses.replace(config.sync, **sync)) if sync else config
        worker = SyncWorker(cfg, worker_id=f"test-{len(made)}")
        worker.connect()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.close()
        worker.redis.close()


@pytest.fixture
def worker(new_worker: Callable[..., SyncWorker]) -> SyncWorker:
    w = new_worker()
    first = w.catch_up()
    assert first.full and first.reason == "no_snapshot"
    return w


def snapshot(client: redis.Redis, config: Config) -> CatalogData:
    return read_snapshot(client, config.redis.key_prefix)


def by_key(items: list[Any], **match: Any) -> Any:
    found = [i for i in items if all(getattr(i, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def scalar(conn: psycopg.Connection, query: QueryNoTemplate, params: Params | None = None) -> Any:
    """The first column of the query's row, which must exist."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row[0]


def account_id(db: psycopg.Connection, number: str) -> int:
    row = db.execute("SELECT id FROM accounts WHERE number = %s AND NOT deleted", [number]).fetchone()
    assert row is not None
    return int(row[0])


def assert_redis_equals_postgres(client: redis.Redis, config: Config) -> None:
    stored = snapshot(client, config)
    with psycopg.connect(config.database.url) as conn:
        truth = load_catalog(conn)
    for field in dataclasses.fields(CatalogData):
        if field.name != "version":

            def key(o: Any) -> tuple[Any, str]:
                return (getattr(o, "id", None), str(o))

            assert sorted(getattr(stored, field.name), key=key) == sorted(
                getattr(truth, field.name), key=key
            ), field.name


# --- the change log --------------------------------------------------------------------------


def test_triggers_log_entities_with_their_snapshot_keys(db: psycopg.Connection) -> None:
    alice = account_id(db, "1000000001")
    db.execute("DELETE FROM callgate_changes")
    db.execute("UPDATE accounts SET balance = balance WHERE id = %s", [alice])  # changes nothing: not logged
    db.execute("UPDATE blocked_codes SET prefix = '448' WHERE account_id = %s", [alice])
    db.execute("DELETE FROM rate_group_trunks")
    rows = db.execute("SELECT entity, key FROM callgate_changes ORDER BY version").fetchall()
    group = scalar(db, "SELECT id FROM rate_groups WHERE name = 'retail'")
    assert sorted(rows) == sorted(
        [("blocked_codes", f"{alice}:448"), ("blocked_codes", f"{alice}:449"), ("rate_groups", str(group))]
    )
    # the new row keeps its version, the old key gets a fresh one; one transaction id per statement's txn
    versions: dict[str, int] = dict(
        db.execute("SELECT key, version FROM callgate_changes WHERE entity = 'blocked_codes'").fetchall()
    )
    current = scalar(db, "SELECT change_version FROM blocked_codes WHERE account_id = %s", [alice])
    assert versions[f"{alice}:448"] == current and versions[f"{alice}:449"] > current


def test_notifications_carry_entity_key_version_and_txid(config: Config, db: psycopg.Connection) -> None:
    with psycopg.connect(config.database.url, autocommit=True) as listener:
        listener.execute("LISTEN callgate_changes")
        alice = account_id(db, "1000000001")
        with db.transaction():
            db.execute("UPDATE accounts SET balance = 11 WHERE id = %s", [alice])
            txid = scalar(db, "SELECT pg_current_xact_id()::text")
        version = scalar(db, "SELECT change_version FROM accounts WHERE id = %s", [alice])
        group = scalar(db, "SELECT id FROM rate_groups WHERE name = 'retail'")
        db.execute(
            "INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute)"
            " SELECT %s, (500000 + n)::text, 0.01 FROM generate_series(1, 150) n",
            [group],
        )
        received = [n.payload for n in listener.notifies(timeout=2, stop_after=2)]
    assert received[0] == f"accounts,{alice},{version},{txid}"
    entity, key, _top, _txid, count = received[1].split(",")
    assert (entity, key, count) == ("origination_rates", "*", "150")  # a big statement: one summary
    assert all(len(p.encode()) < 8000 for p in received)


# --- catching up -----------------------------------------------------------------------------


def test_single_changes_are_applied_in_place_of_the_current_version(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    version = snapshot(client, config).version
    alice = account_id(db, "1000000001")
    db.execute("UPDATE accounts SET balance = 42.5 WHERE id = %s", [alice])
    result = worker.catch_up()
    assert not result.full and result.applied == 1 and result.version == version
    assert by_key(snapshot(client, config).accounts, id=alice).balance == Decimal("42.5")
    state = read_state(client, config.redis.key_prefix)
    assert state is not None and state.changes == 1 and state.version == version
    entries = cast(StreamEntries, client.xrange(sync_journal_key(config.redis.key_prefix)))
    payload = json.loads(entries[-1][1][b"payload"])
    assert payload["upserts"] == {"accounts": [str(alice)]} and payload["changes"] == 1
    assert worker.catch_up().applied == 0  # nothing new
    assert worker.metrics.changes_applied.labels("accounts")._value.get() == 1


def test_a_late_commit_with_a_lower_version_is_not_missed(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    """Versions are assigned at write time: a transaction may commit after a later-numbered one."""
    alice, bob = account_id(db, "1000000001"), account_id(db, "1000000002")
    with psycopg.connect(config.database.url) as slow:
        slow.execute("UPDATE accounts SET balance = 1.11 WHERE id = %s", [alice])  # lower version, open
        db.execute("UPDATE accounts SET balance = 2.22 WHERE id = %s", [bob])  # higher version, committed
        assert worker.catch_up().applied == 1
        slow_version = scalar(slow, "SELECT change_version FROM accounts WHERE id = %s", [alice])
        bob_version = scalar(db, "SELECT change_version FROM accounts WHERE id = %s", [bob])
        assert slow_version < bob_version
        slow.commit()
    assert worker.catch_up().applied == 1
    accounts = snapshot(client, config).accounts
    assert by_key(accounts, id=alice).balance == Decimal("1.11")
    assert by_key(accounts, id=bob).balance == Decimal("2.22")


def test_hard_deletes_key_changes_and_link_tables_reach_redis(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    alice = account_id(db, "1000000001")
    with db.transaction():
        db.execute("DELETE FROM sip_devices WHERE username = 'bob'")
        db.execute("UPDATE blocked_codes SET prefix = '448' WHERE account_id = %s", [alice])
        db.execute("DELETE FROM speed_dials WHERE account_id = %s", [alice])
        db.execute(
            "INSERT INTO rate_group_trunks (rate_group_id, trunk_id)"
            " SELECT g.id, t.id FROM rate_groups g, trunks t WHERE g.name = 'retail' AND t.name = 'spare'"
        )
        db.execute(
            "INSERT INTO trunk_failover_gateways (trunk_id, position, gateway_id)"
            " SELECT t.id, 1, g.id FROM trunks t, gateways g WHERE t.name = 'carrier' AND g.name = 'gw-2'"
        )
        db.execute(
            "INSERT INTO origination_rate_trunks (rate_id, trunk_id) SELECT r.id, t.id"
            " FROM origination_rates r, trunks t WHERE r.prefix = '33' AND t.name = 'spare'"
        )
    result = worker.catch_up()
    assert not result.full
    data = snapshot(client, config)
    assert [d.username for d in data.sip_devices] == ["alice"]
    assert [(b.account_id, b.prefix) for b in data.blocked_codes] == [(alice, "448")]
    assert data.speed_dials == []
    trunks = {t.name: t for t in data.trunks}
    assert set(by_key(data.rate_groups, name="retail").trunk_ids) == {
        trunks["carrier"].id,
        trunks["spare"].id,
    }
    assert len(trunks["carrier"].failover_gateway_ids) == 1
    assert by_key(data.origination_rates, prefix="33").forced_trunk_ids == (trunks["spare"].id,)
    assert_redis_equals_postgres(client, config)


def test_a_bulk_change_publishes_a_whole_new_version(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    before = snapshot(client, config).version
    group = scalar(db, "SELECT id FROM rate_groups WHERE name = 'retail'")
    db.execute(
        "INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute)"
        " SELECT %s, (700000 + n)::text, 0.01 FROM generate_series(1, 60) n",
        [group],
    )
    result = worker.catch_up()
    assert result.full and result.reason == "bulk" and result.version > before
    assert len(snapshot(client, config).origination_rates) == 62
    assert worker.catch_up().applied == 0  # and it goes on from the published snapshot


def test_truncate_or_a_huge_statement_publishes_a_whole_new_version(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    db.execute("TRUNCATE speed_dials")
    assert db.execute("SELECT key FROM callgate_changes WHERE entity = 'speed_dials'").fetchall()[-1] == (
        "*",
    )
    result = worker.catch_up()
    assert result.full and result.reason == "whole_table"
    assert snapshot(client, config).speed_dials == []
    # more than 10000 rows in one statement: logged as one '*' row, not one row each
    db.execute("DELETE FROM callgate_changes")
    group = scalar(db, "SELECT id FROM rate_groups WHERE name = 'retail'")
    db.execute(
        "INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute)"
        " SELECT %s, (800000 + n)::text, 0.01 FROM generate_series(1, 10001) n",
        [group],
    )
    assert db.execute("SELECT entity, key FROM callgate_changes").fetchall() == [("origination_rates", "*")]
    result = worker.catch_up()
    assert result.full and result.reason == "whole_table"
    assert len(snapshot(client, config).origination_rates) == 10003


def test_flushed_redis_is_rebuilt(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    for key in client.scan_iter(match=f"{config.redis.key_prefix}*"):
        client.delete(key)
    result = worker.catch_up()
    assert result.full and result.reason == "no_snapshot"
    assert_redis_equals_postgres(client, config)


def test_lost_state_or_another_database_means_a_full_publish(
    worker: SyncWorker, client: redis.Redis, config: Config
) -> None:
    client.delete(sync_state_key(config.redis.key_prefix))
    assert worker.catch_up().reason == "no_state"
    client.hset(sync_state_key(config.redis.key_prefix), "source", "another/1/db")
    assert worker.catch_up().reason == "other_database"
    publish_once(config)  # `callgate sync --once` records its state: no full publish needed after it
    assert not worker.catch_up().full


def test_a_pruned_log_behind_the_state_means_a_full_publish(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    old_state = cast(dict[bytes, bytes], client.hgetall(sync_state_key(config.redis.key_prefix)))
    db.execute("UPDATE accounts SET balance = 3 WHERE number = '1000000002'")
    assert worker.catch_up().applied == 1
    # a prune (by this deployment or another one) went past what the old state needs
    db.execute(
        "UPDATE callgate_sync_state SET pruned_through = pg_snapshot_xmax(%s::pg_snapshot)",
        [old_state[b"pg_snapshot"].decode()],
    )
    client.hset(
        sync_state_key(config.redis.key_prefix), mapping={field: value for field, value in old_state.items()}
    )  # Redis restored from an old backup
    client.hset(f"{config.redis.key_prefix}snapshot:{int(old_state[b'version'])}:meta", "changes", 0)
    assert worker.catch_up().reason == "log_pruned"
    assert_redis_equals_postgres(client, config)


def test_prune_deletes_applied_changes_only(
    new_worker: Callable[..., SyncWorker], client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    worker = new_worker(changelog_retention=0.0)
    worker.catch_up()
    db.execute("UPDATE accounts SET balance = 4 WHERE number = '1000000002'")  # not applied yet
    worker.prune()
    state = read_state(client, config.redis.key_prefix)
    assert state is not None
    # (other sessions of the cluster may hold the state's xmin back: only rows below it may go)
    below = "SELECT count(*) FROM callgate_changes WHERE txid < pg_snapshot_xmin(%s::pg_snapshot)"
    assert scalar(db, below, [state.pg_snapshot]) == 0
    pending = scalar(db, "SELECT count(*) FROM callgate_changes WHERE entity = 'accounts'")
    assert pending >= 1
    through = scalar(
        db,
        "SELECT pruned_through < pg_snapshot_xmin(%s::pg_snapshot) FROM callgate_sync_state",
        [state.pg_snapshot],
    )
    assert through
    assert worker.catch_up().applied == 1


def test_a_stale_writer_never_applies_over_a_newer_state(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    prefix = config.redis.key_prefix
    stale = read_state(client, prefix)
    assert stale is not None
    db.execute("UPDATE accounts SET balance = 9 WHERE number = '1000000001'")
    worker.catch_up()
    with psycopg.connect(config.database.url) as conn:
        old_alice = load_entities(conn, "accounts", [str(account_id(db, "1000000001"))])
    old = dataclasses.replace(next(iter(old_alice.values())), balance=Decimal(1))
    with pytest.raises(StateMoved):
        apply_batch(client, prefix, stale, pg_snapshot=stale.pg_snapshot, upserts=[old])
    assert by_key(snapshot(client, config).accounts, number="1000000001").balance == Decimal(9)


def test_two_workers_take_turns_without_double_application(
    new_worker: Callable[..., SyncWorker], client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    first, second = new_worker(), new_worker()
    assert first.catch_up().full
    for balance in range(1, 6):
        db.execute("UPDATE accounts SET balance = %s WHERE number = '1000000002'", [balance])
        (first if balance % 2 else second).catch_up()
        assert (first if balance % 2 == 0 else second).catch_up().applied == 0
    state = read_state(client, config.redis.key_prefix)
    assert state is not None and state.changes == 5
    assert_redis_equals_postgres(client, config)


def test_leader_lease_is_exclusive_and_expires(new_worker: Callable[..., SyncWorker], config: Config) -> None:
    # No step depends on how fast this machine runs: the exclusive part holds a lease no stall
    # outlasts, and the expiry is waited for (Redis dropping the key), not slept through.
    first, second = new_worker(lease_seconds=60), new_worker(lease_seconds=60)
    assert first.lease.renew() and first.lease.held
    assert not second.lease.renew() and not second.lease.held
    assert second.lease.holder()[0] == first.worker_id
    # The leader renews one last time, for 0.3 s, then stops renewing.
    first.lease.lease_ms = 300
    assert first.lease.renew()
    wait_until(lambda: second.lease.holder() == (None, -2), what="Redis to expire the lease")
    # Judged locally, the lease ended (2/3 of its length after the renewal was asked) no later
    # than Redis expired it: the old leader knows it lost it before anyone else can take it.
    assert not first.lease.held
    assert second.lease.renew() and second.lease.held
    first.lease.release()  # a release by a non-holder does nothing
    assert second.lease.holder()[0] == second.worker_id
    assert not first.lease.renew()  # and the old leader cannot take it back


def test_sweep_repairs_drift(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    prefix = config.redis.key_prefix
    data = snapshot(client, config)
    alice = by_key(data.accounts, number="1000000001")
    hashes = f"{prefix}snapshot:{data.version}"
    client.hset(
        f"{hashes}:accounts", str(alice.id), encode_entity(dataclasses.replace(alice, balance=Decimal(999)))
    )
    client.hdel(f"{hashes}:sip_devices", str(by_key(data.sip_devices, username="bob").id))
    client.hset(f"{hashes}:sip_devices", "99999", encode_entity(SipDevice(99999, alice.id, "ghost")))
    db.execute("UPDATE accounts SET balance = 7 WHERE number = '1000000002'")  # pending: the catch-up's
    assert worker.sweep() == 3  # found, queued for the next catch-up
    result = worker.catch_up()
    assert not result.full and result.applied == 4
    assert worker.sweep() == 0
    assert worker.metrics.drift_repaired._value.get() == 3
    assert_redis_equals_postgres(client, config)


# --- the engine side: SnapshotHolder with the rules' Catalog --------------------------------


def test_holder_applies_changes_in_place_and_fills_gaps_from_the_journal(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    prefix = config.redis.key_prefix
    holder: SnapshotHolder[Catalog] = SnapshotHolder(client, prefix, Catalog.build, subscribe=False)
    holder.refresh()
    version, catalog = holder.current
    db.execute("UPDATE accounts SET balance = 20 WHERE number = '1000000001'")
    worker.catch_up()
    db.execute("DELETE FROM origination_rates WHERE prefix = '33'")
    worker.catch_up()
    assert holder.refresh() is True  # two changes, no events seen: both read back from the journal
    assert holder.current[1] is catalog and holder.full_loads == 1 and holder.changes_applied == 2
    assert catalog.accounts_by_number["1000000001"].balance == Decimal(20)
    group = scalar(db, "SELECT id FROM rate_groups WHERE name = 'retail'")
    assert set(catalog.group_rates[group]) == {"44"}
    db.execute("UPDATE accounts SET balance = 21 WHERE number = '1000000001'")
    worker.catch_up()
    client.delete(sync_journal_key(prefix))  # the journal lost it: the holder loads the version whole
    assert holder.refresh() is True and holder.full_loads == 2 and holder.current[0] == version
    assert holder.current[1].accounts_by_number["1000000001"].balance == Decimal(21)


def test_restart_maps_the_image_and_catches_up_from_the_journal(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection, tmp_path: Path
) -> None:
    """A restarted engine maps the catalogue image its predecessor wrote, then applies the
    changes made since from the journal; without them in the journal it loads from Redis."""
    prefix = config.redis.key_prefix
    fingerprint = code_fingerprint([engine.model, engine.rules])

    def holder() -> SnapshotHolder[Catalog]:
        images = ImageStore(tmp_path, prefix, fingerprint)
        return SnapshotHolder(client, prefix, Catalog.build, subscribe=False, images=images)

    def image_changes() -> int:
        stamp = current_stamp(client, prefix)
        assert stamp is not None
        loaded = ImageStore(tmp_path, prefix, fingerprint).load(stamp)
        assert loaded is not None
        return loaded.stamp.changes

    first = holder()
    first.refresh()  # built from Redis, image written, and served mapped from the image
    assert (
        isinstance(first.current[1].accounts._records, memoryview) and len(list(tmp_path.glob("*.img"))) == 1
    )
    assert image_changes() == 0
    db.execute("UPDATE accounts SET balance = 30 WHERE number = '1000000001'")
    worker.catch_up()
    restarted = holder()
    assert restarted.refresh() is True and restarted.full_loads == 1
    catalog = restarted.current[1]
    assert isinstance(catalog.accounts._records, memoryview)  # mapped, not decoded
    assert catalog.accounts_by_number["1000000001"].balance == Decimal(30)  # from the journal
    assert restarted.stamp == current_stamp(client, prefix) and restarted.confirmed_age() < 5
    assert image_changes() == 0  # mapped, not rebuilt
    db.execute("UPDATE accounts SET balance = 31 WHERE number = '1000000001'")
    worker.catch_up()
    client.delete(sync_journal_key(prefix))  # the changes since the image are lost
    again = holder()
    assert again.refresh() is True
    assert image_changes() == 2  # loaded from Redis and written again
    assert again.current[1].accounts_by_number["1000000001"].balance == Decimal(31)


def test_holder_follows_events_in_place(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    changed = threading.Event()
    holder: SnapshotHolder[Catalog] = SnapshotHolder(
        client, config.redis.key_prefix, Catalog.build, on_change=lambda *_: changed.set()
    )
    stop = threading.Event()
    thread = threading.Thread(target=holder.run, args=(stop, 3600), daemon=True)
    thread.start()
    try:
        wait_until(lambda: holder.loaded, timeout=10, interval=0.01, what="the holder's first load")
        catalog = holder.current[1]
        db.execute("UPDATE accounts SET status = 'inactive' WHERE number = '1000000002'")
        worker.catch_up()
        assert changed.wait(5)
        assert holder.current[1] is catalog and not catalog.accounts_by_number["1000000002"].active
        assert holder.full_loads == 1
    finally:
        stop.set()
        thread.join(5)


# --- engine events -> PostgreSQL -------------------------------------------------------------


def test_first_use_and_call_records_are_persisted_once(
    client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    prefix = config.redis.key_prefix
    alice = account_id(db, "1000000001")
    publisher = EventPublisher(client, prefix, dedupe_seconds=0)
    stop = threading.Event()
    drain = threading.Thread(target=publisher.run, args=(stop,), daemon=True)
    drain.start()
    used = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    publisher.first_use(FirstUse(alice, used, used + timedelta(days=30)))
    publisher.first_use(FirstUse(alice, used + timedelta(seconds=5), None))  # a second engine, later
    publisher.call_record("uuid-1", account_id=alice, data={"billsec": 12, "cost": Decimal("0.01")})
    publisher.call_record("uuid-1", account_id=alice, data={"billsec": 99})  # delivered twice
    client.xadd(events_stream(prefix), {"type": "nonsense"})
    stop.set()
    drain.join(5)
    assert publisher.published == 4 and publisher.dropped == 0
    persister = EventPersister(client, prefix, lambda: psycopg.connect(config.database.url), "test")
    assert persister.process_once() == 5
    assert persister.process_once() == 0
    row = db.execute("SELECT first_used, expiry FROM accounts WHERE id = %s", [alice]).fetchone()
    assert row == (used, used + timedelta(days=30))
    records = db.execute("SELECT uuid, account_id, data FROM call_records").fetchall()
    assert records == [("uuid-1", alice, {"billsec": 12, "cost": "0.01"})]
    pending = client.xpending(events_stream(prefix), "callgate-sync")
    assert pending["pending"] == 0


def test_event_publisher_never_blocks_a_call_when_redis_is_down(config: Config) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.2, socket_connect_timeout=0.2)
    publisher = EventPublisher(dead, config.redis.key_prefix, queue_size=3, dedupe_seconds=3600)
    stop = threading.Event()
    drain = threading.Thread(target=publisher.run, args=(stop,), daemon=True)
    drain.start()
    now = datetime.now(UTC)
    started = time.perf_counter()
    for account in range(100):
        publisher.first_use(FirstUse(account, now, None))
    elapsed = time.perf_counter() - started
    assert elapsed < 0.05, elapsed  # microseconds each, whatever Redis does
    assert publisher.dropped >= 90
    dropped = publisher.dropped
    publisher.first_use(FirstUse(99, now, None))  # a dropped first use is not deduplicated: offered again
    assert publisher.dropped == dropped + 1
    stop.set()
    drain.join(5)


# --- callgate sync --status ------------------------------------------------------------------


def test_status_prints_lag_and_version(
    worker: SyncWorker, env: dict[str, str], db: psycopg.Connection
) -> None:
    db.execute("UPDATE accounts SET balance = 5.5 WHERE number = '1000000001'")
    time.sleep(0.2)
    result = run_cli(["sync", "--status", "--json"], env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pending_changes"] == 1 and report["lag_seconds"] >= 0.2
    worker.catch_up()
    report = json.loads(run_cli(["sync", "--status", "--json"], env).stdout)
    assert report["pending_changes"] == 0 and report["lag_seconds"] == 0
    assert (
        report["snapshot_version"] >= 1
        and report["applied_change_version"] == report["database_change_version"]
    )
    text = run_cli(["sync", "--status"], env).stdout
    assert f"snapshot version {report['snapshot_version']}" in text and "lag 0.000 s" in text


def test_big_batches_and_before_images_of_rates(
    new_worker: Callable[..., SyncWorker], client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    worker = new_worker(bulk_threshold=5000)
    worker.catch_up()
    group = scalar(db, "SELECT id FROM rate_groups WHERE name = 'retail'")
    db.execute(
        "INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute)"
        " SELECT %s, (900000 + n)::text, 0.01 FROM generate_series(1, 3000) n",
        [group],
    )
    result = worker.catch_up()
    assert not result.full and result.applied == 3000  # in place, in one script run
    journal = sync_journal_key(config.redis.key_prefix)
    payload = json.loads(cast(StreamEntries, client.xrevrange(journal, count=1))[0][1][b"payload"])
    assert len(payload["upserts"]["origination_rates"]) == 3000
    assert set(payload["before"]["origination_rates"].values()) == {None}  # none existed
    rate = by_key(snapshot(client, config).origination_rates, prefix="900001")
    db.execute("UPDATE origination_rates SET cost_per_minute = 0.5 WHERE id = %s", [rate.id])
    worker.catch_up()
    payload = json.loads(cast(StreamEntries, client.xrevrange(journal, count=1))[0][1][b"payload"])
    assert payload["before"] == {"origination_rates": {str(rate.id): encode_entity(rate).decode()}}
    assert by_key(snapshot(client, config).origination_rates, id=rate.id).cost_per_minute == Decimal("0.5")


def test_a_version_written_with_other_fields_is_not_written_into(
    worker: SyncWorker, client: redis.Redis, config: Config, db: psycopg.Connection
) -> None:
    prefix = config.redis.key_prefix
    data = snapshot(client, config)
    alice = by_key(data.accounts, number="1000000001")
    layout = "id,number"  # an older engine's field list
    client.hset(f"{prefix}snapshot:{data.version}:meta", "schema:accounts", layout)
    state = read_state(client, prefix)
    assert state is not None
    with pytest.raises(SchemaMismatch):
        apply_batch(client, prefix, state, pg_snapshot=state.pg_snapshot, upserts=[alice])
    assert read_state(client, prefix) == state  # nothing written


def test_each_full_snapshot_gets_its_catalogue_image_published(
    config: Config, client: redis.Redis, db: psycopg.Connection
) -> None:
    """The leader's child process builds the image of each full snapshot it publishes; an
    engine with no local image then starts from it (tests/test_image_blob.py: the failures)."""
    from engine.imagejob import image_fingerprint, produce_in_child
    from engine.state.imageblob import read_manifest

    prefix = config.redis.key_prefix
    worker = SyncWorker(config, worker_id="test-images", image_job=produce_in_child)
    worker.connect()
    try:
        first = worker.catch_up()
        assert first.full
        wait_until(
            lambda: read_manifest(client, prefix, first.version, image_fingerprint()) is not None,
            timeout=60,
            what="the image of the first version",
        )
        db.execute("UPDATE accounts SET balance = 40 WHERE number = '1000000001'")
        second = worker.full_resync()
        wait_until(
            lambda: read_manifest(client, prefix, second.version, image_fingerprint()) is not None,
            timeout=60,
            what="the image of the second version",
        )
        assert not client.exists(image_blob_key(prefix, first.version))  # only the current one is kept
        db.execute("UPDATE accounts SET balance = 41 WHERE number = '1000000001'")
        assert worker.catch_up().applied == 1  # live sync: in place, after the image was built
    finally:
        worker._stop_image_child()
        worker.close()
    images = ImageStore(None, prefix, image_fingerprint())
    holder = SnapshotHolder(client, prefix, Catalog.build, subscribe=False, images=images, image_blobs=True)
    assert holder.refresh() and holder.blob_fetches == 1 and holder.blob_failures == 0
    catalog = holder.current[1]
    assert isinstance(catalog.accounts._records, memoryview)  # from the image, not decoded rows
    assert catalog.accounts_by_number["1000000001"].balance == Decimal(41)  # the journal on top
    assert holder.stamp is not None
    assert holder.stamp == current_stamp(client, prefix) and holder.stamp.changes == 1


def test_engines_switching_to_a_new_version_wait_for_its_image(
    config: Config, client: redis.Redis, db: psycopg.Connection
) -> None:
    """The leader marks a new version's image as being built before its child starts: an engine
    switching to it waits (engine.snapshot_image_wait) and fetches the image instead of building
    from rows; a live change made during the wait comes from the journal on top, exactly."""
    from engine.imagejob import image_fingerprint, produce_in_child
    from engine.state.imageblob import poll_image, read_manifest

    prefix = config.redis.key_prefix
    fingerprint = image_fingerprint()
    worker = SyncWorker(
        config, worker_id="test-image-wait", image_job=produce_in_child, image_fingerprint=fingerprint
    )
    worker.connect()
    images = ImageStore(None, prefix, fingerprint)
    holder = SnapshotHolder(
        client,
        prefix,
        Catalog.build,
        subscribe=False,
        images=images,
        image_blobs=True,
        image_wait=120.0,
        image_poll=0.05,
    )
    try:
        first = worker.catch_up()
        wait_until(
            lambda: read_manifest(client, prefix, first.version, fingerprint) is not None,
            timeout=60,
            what="the image of the first version",
        )
        assert holder.refresh() and isinstance(holder.current[1].accounts._records, memoryview)
        db.execute("UPDATE accounts SET balance = 40 WHERE number = '1000000001'")
        second = worker.full_resync()
        assert poll_image(client, prefix, second.version, fingerprint).building  # marked at once
        errors: list[BaseException] = []

        def switch() -> None:
            try:
                holder.refresh()
            except BaseException as exc:  # reported below
                errors.append(exc)

        engine_thread = threading.Thread(target=switch)
        engine_thread.start()
        db.execute("UPDATE accounts SET balance = 41 WHERE number = '1000000001'")
        assert worker.catch_up().applied == 1  # live, while the engine waits (or just fetched)
        engine_thread.join(120)
        assert not engine_thread.is_alive() and not errors
    finally:
        worker._stop_image_child()
        worker.close()
    holder.refresh()  # the run loop's recheck after a fetch: the rest of the journal
    catalog = holder.current[1]
    assert holder.current[0] == second.version and isinstance(catalog.accounts._records, memoryview)
    assert holder.blob_waits.get("ready") == 1 and holder.blob_failures == 0
    assert catalog.accounts_by_number["1000000001"].balance == Decimal(41)
    assert holder.stamp is not None
    assert holder.stamp == current_stamp(client, prefix) and holder.stamp.changes == 1
