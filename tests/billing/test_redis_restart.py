"""Redis restarted with calls up, on a private redis-server: with persistence nothing is lost; without
it the Redis-side debits and the unwritten CDRs go together, and the PostgreSQL ledger still holds."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from decimal import Decimal

import psycopg
import pytest
import redis

from engine.billing.funds import Funds, FundsLevel, cdr_stream
from engine.billing.rating import Tariff
from engine.sync.cdrs import CdrWriter
from tests.billing.conftest import ledger_mismatches, make_account, settlement

D = Decimal
PREFIX = "cg:"
PER_MINUTE = Tariff(D("1.00"), init_inc=60, inc=60)


class PrivateRedis:
    def __init__(self, persistent: bool) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="cg-billing-redis-")
        self.persistent = persistent
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        aof = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", self.dir, "--save", "", *aof],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=1)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # SIGKILL: no save on the way out
            self.proc.wait(10)
            self.proc = None

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=[True, False], ids=["appendonly", "no-persistence"])
def private_redis(request: pytest.FixtureRequest) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(persistent=request.param)
    server.start()
    try:
        yield server
    finally:
        server.remove()


def drain(client: redis.Redis, db_url: str) -> None:
    writer = CdrWriter(client, PREFIX, lambda: psycopg.connect(db_url), "w")
    while writer.process_once(0).entries:
        pass
    writer.close()


def snapshot_level(db: psycopg.Connection, account_id: int) -> FundsLevel:
    row = db.execute("SELECT balance, calls_debited FROM accounts WHERE id = %s", [account_id]).fetchone()
    assert row is not None
    balance, recorded = row
    return FundsLevel(account_id, balance, recorded, PER_MINUTE)


def test_redis_restarted_with_calls_up(
    db: psycopg.Connection, db_url: str, private_redis: PrivateRedis
) -> None:
    account = make_account(db, "901", "100")
    client = private_redis.client()
    funds = Funds(client, PREFIX)
    for i in range(10):  # ten calls ended, written to PostgreSQL
        funds.settle(settlement(f"done{i}", [(account, "1")]))
    drain(client, db_url)
    for i in range(5):  # five more ended, still in the stream
        funds.settle(settlement(f"queued{i}", [(account, "1")]))
    for i in range(3):  # three calls up, holding reservations
        assert funds.reserve(f"up{i}", [snapshot_level(db, account)], cap_seconds=600).granted
    assert funds.available(snapshot_level(db, account)) == D("90") - 5 - 3 * 10

    private_redis.kill()
    private_redis.start()
    client = private_redis.client()
    funds = Funds(client, PREFIX)
    level = snapshot_level(db, account)  # PostgreSQL: balance 90, calls_debited 10
    if private_redis.persistent:
        # Everything came back: the 5 unwritten debits, the 3 reservations.
        assert funds.available(level) == D("90") - 5 - 3 * 10
    else:
        # Redis knows nothing: available restarts from the snapshot; the open calls' reservations
        # and the 5 queued CDRs with their debits are gone together.
        assert funds.available(level) == D("90")
        assert client.exists(cdr_stream(PREFIX)) == 0
    for i in range(3):  # the open calls hang up after the restart: settled and written all the same
        funds.settle(settlement(f"up{i}", [(account, "2")]))
    drain(client, db_url)

    expected_calls = 10 + 3 + (5 if private_redis.persistent else 0)
    assert db.execute("SELECT count(*) FROM cdrs").fetchone() == (expected_calls,)
    assert ledger_mismatches(db) == []
    row = db.execute("SELECT balance FROM accounts").fetchone()
    assert row is not None
    balance = row[0]
    assert balance == D("100") - 10 - 6 - (5 if private_redis.persistent else 0)
    # Redis and PostgreSQL agree again on what is unrecorded (nothing) once the writer caught up.
    assert funds.available(snapshot_level(db, account)) == balance
