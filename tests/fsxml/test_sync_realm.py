"""The sync publishes SIP devices as a1-hashes for its configured realm ([fsxml] domain).

Real PostgreSQL and Redis; the worker's steps are driven one by one (as tests/test_sync.py
does). The hashes PostgreSQL computes are compared with hand-computed MD5s.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from engine.config import Config
from engine.db.loader import load_catalog
from engine.fsxml.server import RealmCheck, snapshot_realm
from engine.model import CatalogData
from engine.state.snapshot import read_snapshot
from engine.sync import publish_once
from engine.sync.state import read_state
from engine.sync.worker import SyncWorker
from tests.support import config_for, engine_environment, prepare_database

REALM = "voice.example.net"
CATALOGUE: dict[str, Any] = {
    "gateways": [{"name": "gw-1", "username": "trunk", "password": "Gw-Secret-1", "register": True}],
    "rate_groups": [{"name": "retail"}],
    "customers": [
        {
            "number": "1000000001",
            "email": "alice@example.com",
            "rate_group": "retail",
            "sip_devices": [
                {"username": "alice", "password": "Al1ce-Pw"},
                {"username": "bob", "password": "pässwörd-1"},  # UTF-8 bytes, as FreeSWITCH hashes them
            ],
        }
    ],
}


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@pytest.fixture
def config(fresh_pg_url: str, redis_url: str, key_prefix: str) -> Config:
    prepare_database(fresh_pg_url, CATALOGUE)
    return config_for(
        engine_environment(
            fresh_pg_url, redis_url, key_prefix, CALLGATE_SYNC__METRICS_PORT="0", CALLGATE_FSXML__DOMAIN=REALM
        )
    )


def with_realm(config: Config, realm: str) -> Config:
    return dataclasses.replace(config, fsxml=dataclasses.replace(config.fsxml, domain=realm))


@pytest.fixture
def workers(config: Config) -> Iterator[list[SyncWorker]]:
    made: list[SyncWorker] = []
    yield made
    for worker in made:
        worker.close()
        worker.redis.close()


def start(workers: list[SyncWorker], config: Config) -> SyncWorker:
    worker = SyncWorker(config, worker_id=f"test-realm-{len(workers)}")
    worker.connect()
    workers.append(worker)
    return worker


def hashes(data: CatalogData) -> dict[str, str]:
    return {d.username: d.a1_hash for d in data.sip_devices}


def test_devices_are_published_as_a1_hashes_of_the_configured_realm_never_with_the_password(
    config: Config, client: redis.Redis, workers: list[SyncWorker]
) -> None:
    worker = start(workers, config)
    assert worker.catch_up().full
    published = read_snapshot(client, config.redis.key_prefix)
    assert hashes(published) == {
        "alice": md5(f"alice:{REALM}:Al1ce-Pw"),
        "bob": md5(f"bob:{REALM}:pässwörd-1"),
    }
    assert not any(hasattr(g, "password") for g in published.gateways)
    state = read_state(client, config.redis.key_prefix)
    assert state is not None and state.sip_realm == REALM
    # the live path: a changed password is re-hashed
    with psycopg.connect(config.database.url, autocommit=True) as conn:
        conn.execute("UPDATE sip_devices SET password = 'N3w-Pw' WHERE username = 'alice'")
    result = worker.catch_up()
    assert not result.full and result.applied == 1
    assert hashes(read_snapshot(client, config.redis.key_prefix))["alice"] == md5(f"alice:{REALM}:N3w-Pw")
    # and the sweep compares like with like: no drift where there is none
    assert worker.sweep() == 0


def test_without_a_realm_no_credential_is_published(
    config: Config, client: redis.Redis, workers: list[SyncWorker]
) -> None:
    publish_once(with_realm(config, ""))
    assert set(hashes(read_snapshot(client, config.redis.key_prefix)).values()) == {""}
    with psycopg.connect(config.database.url) as conn:
        assert set(hashes(load_catalog(conn)).values()) == {""}  # the loader's default: no realm


def test_another_configured_realm_publishes_a_whole_new_snapshot(
    config: Config, client: redis.Redis, workers: list[SyncWorker]
) -> None:
    publish_once(config)
    assert not start(workers, config).catch_up().full  # same realm: goes on from the publish
    moved = start(workers, with_realm(config, "other.example.org"))
    result = moved.catch_up()
    assert result.full and result.reason == "sip_realm"
    assert hashes(read_snapshot(client, config.redis.key_prefix))["alice"] == md5(
        "alice:other.example.org:Al1ce-Pw"
    )
    assert not moved.catch_up().full


def test_a_snapshot_written_with_the_old_fields_is_replaced_whole(
    config: Config, client: redis.Redis, workers: list[SyncWorker]
) -> None:
    # An upgrade: the current version was written by a release whose devices had a password
    # field; the live sync cannot write the new field list into it, so it publishes anew.
    version = publish_once(config)[0]
    old = "id,account_id,username,active,codecs,password,caller_id_name,caller_id_number,context"
    client.hset(f"{config.redis.key_prefix}snapshot:{version}:meta", "schema:sip_devices", old)
    worker = start(workers, config)
    with psycopg.connect(config.database.url, autocommit=True) as conn:
        conn.execute("UPDATE sip_devices SET password = 'Upgr4ded' WHERE username = 'alice'")
    result = worker.catch_up()
    assert result.full and result.reason == "schema" and result.version > version
    assert hashes(read_snapshot(client, config.redis.key_prefix))["alice"] == md5(f"alice:{REALM}:Upgr4ded")


def test_the_service_tells_when_the_snapshots_realm_is_not_its_domain(
    config: Config, client: redis.Redis
) -> None:
    prefix = config.redis.key_prefix
    version = publish_once(with_realm(config, "other.example.org"))[0]
    assert snapshot_realm(client, prefix, version) == "other.example.org"
    assert snapshot_realm(client, prefix, version + 1) is None  # state of another version
    version = publish_once(config)[0]
    assert snapshot_realm(client, prefix, version) == REALM
    assert snapshot_realm(client, prefix, version + 1) is None  # not recorded (yet)


class _Later:
    """``gevent.spawn_later`` for RealmCheck, run by hand: the delays asked and the calls due."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.due: list[Any] = []

    def __call__(self, delay: float, fn: Any) -> None:
        self.delays.append(delay)
        self.due.append(fn)

    def run(self) -> None:
        due, self.due = self.due, []
        for fn in due:
            fn()


def realm_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    return [message for message in messages if "a1-hashes" in message]


def test_a_load_before_the_sync_recorded_its_realm_is_checked_again(caplog: pytest.LogCaptureFixture) -> None:
    """The sync makes a version current, then records its state: a load in between still gets
    its ERROR, once the state describes the version."""
    recorded: dict[int, str] = {}
    later = _Later()
    check = RealmCheck(recorded.get, REALM, later, tries=5, every=0.5)
    check(7)
    assert realm_errors(caplog) == [] and later.delays == [0.5]
    later.run()  # still not recorded: looks again
    recorded[7] = "other.example.org"
    later.run()
    [error] = realm_errors(caplog)
    assert "snapshot 7" in error and "'other.example.org'" in error and repr(REALM) in error
    assert later.due == []  # done
    recorded[8] = REALM
    check(8)  # the same realm: nothing to say
    assert len(realm_errors(caplog)) == 1 and later.due == []


def test_the_realm_check_gives_up_and_yields_to_a_newer_version(caplog: pytest.LogCaptureFixture) -> None:
    later = _Later()
    check = RealmCheck(lambda _version: None, REALM, later, tries=3)
    check(7)
    later.run()
    later.run()
    assert later.due == [] and len(later.delays) == 2  # three looks in all, then it stops
    recorded = {8: "other.example.org", 9: "other.example.org"}

    def failing_then_recorded(version: int) -> str | None:
        if version == 8 and not later.delays[2:]:
            raise redis.ConnectionError("Redis down")  # as not recorded yet: looks again
        return recorded.get(version)

    check = RealmCheck(failing_then_recorded, REALM, later, tries=3)
    check(8)
    assert len(later.due) == 1
    check(9)  # a newer version loaded before version 8's next look
    later.run()
    assert [e for e in realm_errors(caplog) if "snapshot 8" in e] == []
    assert len([e for e in realm_errors(caplog) if "snapshot 9" in e]) == 1
