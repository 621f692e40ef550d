"""Measurements of the live sync (the numbers in docs/sync.md).

    python -m loadtest.sync_bench lag  [--rate 500] [--seconds 20] [--accounts 10000] [--rates 100000]
    python -m loadtest.sync_bench load [--rates 1000000]

Each run creates a private database (dropped afterwards) on the PostgreSQL server of
``--admin-url`` and a private Redis key prefix, and starts a real ``callgate sync``
worker process. The engine side is a ``SnapshotHolder`` with the rules' ``Catalog``,
in this process, exactly as ``callgate serve`` holds it.

``lag``: writer processes commit single-row balance updates at ``--rate`` per second
(each its own transaction, each a new value); for every change the time from the
writer's COMMIT returning to (a) the change event arriving from Redis and (b) the
value being in the engine's in-memory catalog is recorded (CLOCK_MONOTONIC, shared by
the processes of one host); p50/p90/p99/max are printed.

``load``: imports ``--rates`` origination rates in one COPY transaction with the worker
running, and reports the COPY, the time from COMMIT until the engine's catalog holds
the new deck (the worker's full publish plus the engine's reload), and the parts:
load_catalog, publish, engine fetch and decode+build.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import redis

from engine.db.migrate import migrate
from engine.rules.catalog import Catalog
from engine.state.keys import snapshot_events_channel
from engine.state.snapshot import delete_prefix
from engine.state.watcher import SnapshotHolder

ROOT = Path(__file__).resolve().parents[1]  # the repository checkout


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50_ms": at(0.50) * 1000,
        "p90_ms": at(0.90) * 1000,
        "p99_ms": at(0.99) * 1000,
        "max_ms": ordered[-1] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    name = f"callgate_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{admin_url.rpartition('/')[0]}/{name}"
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(url: str, accounts: int, rates: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO gateways (name) VALUES ('gw-bench')")
        conn.execute("INSERT INTO accounts (number, kind) VALUES ('9000000001', 'provider')")
        conn.execute(
            "INSERT INTO trunks (name, provider_id, gateway_id)"
            " SELECT 'bench', a.id, g.id FROM accounts a, gateways g WHERE a.number = '9000000001'"
        )
        conn.execute("INSERT INTO rate_groups (name) VALUES ('bench')")
        conn.execute(
            "INSERT INTO accounts (number, rate_group_id, balance)"
            " SELECT (3000000000 + n)::text, (SELECT id FROM rate_groups WHERE name = 'bench'), 10"
            " FROM generate_series(1, %s) n",
            [accounts],
        )
        if rates:
            conn.execute(
                "INSERT INTO origination_rates (rate_group_id, prefix, cost_per_minute)"
                " SELECT (SELECT id FROM rate_groups WHERE name = 'bench'), (100000000 + n)::text,"
                " (n %% 500) / 10000.0 FROM generate_series(1, %s) n",
                [rates],
            )
        conn.commit()


@contextlib.contextmanager
def sync_process(url: str, redis_url: str, prefix: str, **settings: str) -> Iterator[Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
    env.update(
        CALLGATE_CONFIG=str(ROOT / "config" / "callgate.toml"),
        CALLGATE_DATABASE_URL=url,
        CALLGATE_REDIS_URL=redis_url,
        CALLGATE_REDIS__KEY_PREFIX=prefix,
        CALLGATE_SYNC__METRICS_PORT="0",
        CALLGATE_SYNC__SWEEP_INTERVAL="0",
        **{f"CALLGATE_SYNC__{k.upper()}": v for k, v in settings.items()},
    )
    log_path = Path(tempfile.mkstemp(prefix="callgate-sync-bench-", suffix=".log")[1])
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "sync"], env=env, cwd=ROOT, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 300
        while "caught up" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"callgate sync did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.05)
        yield log_path
    finally:
        process.terminate()
        process.wait(30)


def drop_prefix(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        delete_prefix(client, prefix)
    finally:
        client.close()


class EngineSide:
    """A SnapshotHolder as the engine holds it, plus a plain subscriber timing the Redis events."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.changed: list[tuple[float, dict[int, Any]]] = []  # (when, {account id: balance then})
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.swaps: list[tuple[float, int]] = []
        self.holder: SnapshotHolder[Catalog] = SnapshotHolder(
            self.client,
            prefix,
            Catalog.build,
            on_change=self._changed,
            on_swap=lambda version, _c: self.swaps.append((time.monotonic(), version)),
        )
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self.holder.run, args=(self._stop, 1.0), daemon=True),
            threading.Thread(target=self._listen, args=(redis_url, prefix), daemon=True),
        ]
        self.lock = threading.Lock()

    def _changed(self, _version: int, catalog: Catalog, keys: dict[str, set[str]]) -> None:
        at = time.monotonic()
        accounts = catalog.accounts
        balances = {int(k): accounts[int(k)].balance for k in keys.get("accounts", ()) if int(k) in accounts}
        self.changed.append((at, balances))

    def _listen(self, redis_url: str, prefix: str) -> None:
        client = redis.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        pubsub.subscribe(snapshot_events_channel(prefix))
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message and message["type"] == "message":
                self.events.append((time.monotonic(), json.loads(message["data"])))
        pubsub.close()
        client.close()

    def start(self) -> EngineSide:
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + 300
        while not self.holder.loaded:
            if time.monotonic() > deadline:
                raise RuntimeError("the holder did not load the snapshot")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.client.close()


def _writer(url: str, ids: list[int], rate: float, seconds: float, start_at: float, out: Any) -> None:
    """One writer process: commits ``rate`` balance updates per second, returns (id, value, commit time)."""
    done: list[tuple[int, str, float, int]] = []
    with psycopg.connect(url, autocommit=True) as conn:
        interval = 1.0 / rate
        n = 0
        while True:
            due = start_at + n * interval
            if due - start_at >= seconds:
                break
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            account = ids[n % len(ids)]
            value = f"{1000 + n}.{os.getpid() % 1000:03d}"
            row = conn.execute(
                "UPDATE accounts SET balance = %s WHERE id = %s RETURNING change_version", [value, account]
            ).fetchone()
            done.append((account, value, time.monotonic(), row[0] if row else 0))
            n += 1
    out.send(done)
    out.close()


def run_lag(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"cgbench:{secrets.token_hex(3)}:"
    with scratch_database(args.admin_url) as url:
        seed(url, args.accounts, args.rates)
        try:
            with sync_process(url, args.redis_url, prefix):
                side = EngineSide(args.redis_url, prefix).start()
                try:
                    with psycopg.connect(url) as conn:
                        ids = [r[0] for r in conn.execute("SELECT id FROM accounts WHERE kind = 'customer'")]
                    writers, pipes = [], []
                    start_at = time.monotonic() + 1.0
                    for index in range(args.writers):
                        mine = ids[index :: args.writers]
                        receive, send = multiprocessing.Pipe(duplex=False)
                        process = multiprocessing.Process(
                            target=_writer,
                            args=(url, mine, args.rate / args.writers, args.seconds, start_at, send),
                        )
                        process.start()
                        writers.append(process)
                        pipes.append(receive)
                    commits = [entry for pipe in pipes for entry in pipe.recv()]
                    for process in writers:
                        process.join()
                    time.sleep(1.0)
                    return _lag_report(side, commits, args)
                finally:
                    side.stop()
        finally:
            drop_prefix(args.redis_url, prefix)


def _lag_report(
    side: EngineSide, commits: list[tuple[int, str, float, int]], args: argparse.Namespace
) -> dict[str, Any]:
    """Match each commit with the first event / in-place change that holds it."""
    from decimal import Decimal

    catalog = side.holder.current[1]
    seen_in_engine: dict[tuple[int, Decimal], float] = {}
    for at, balances in side.changed:
        for account, balance in balances.items():
            seen_in_engine.setdefault((account, balance), at)
    events_by_account: dict[int, list[tuple[float, int]]] = {}
    for at, payload in side.events:
        version = int(payload.get("sync", {}).get("change_version", 0))
        for key in payload.get("upserts", {}).get("accounts", ()):
            events_by_account.setdefault(int(key), []).append((at, version))
    to_engine, to_redis = [], []
    missing = 0
    for account, value, committed, version in commits:
        applied = seen_in_engine.get((account, Decimal(value)))
        if applied is None:
            missing += 1
        else:
            to_engine.append(max(0.0, applied - committed))
        published = [t for t, v in events_by_account.get(account, ()) if v >= version]
        if published:
            to_redis.append(max(0.0, published[0] - committed))
    last: dict[int, tuple[float, str]] = {}
    for account, value, committed, _ in commits:
        if account not in last or committed > last[account][0]:
            last[account] = (committed, value)
    wrong = sum(1 for a, (_, v) in last.items() if catalog.accounts[a].balance != Decimal(v))
    duration = max(c[2] for c in commits) - min(c[2] for c in commits)
    return {
        "changes": len(commits),
        "target_rate_per_s": args.rate,
        "achieved_rate_per_s": round(len(commits) / duration, 1) if duration else None,
        "commit_to_redis_event": _percentiles(to_redis),
        "commit_to_engine_catalog": _percentiles(to_engine),
        "values_never_seen_in_engine": missing,
        "final_values_wrong": wrong,
        "engine_full_loads": side.holder.full_loads,
        "engine_change_batches": side.holder.changes_applied,
    }


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    from engine.db.loader import load_catalog
    from engine.state.snapshot import fetch_snapshot, publish_snapshot

    prefix = f"cgbench:{secrets.token_hex(3)}:"
    report: dict[str, Any] = {"rates": args.rates}
    with scratch_database(args.admin_url) as url:
        seed(url, 1000, 0)
        try:
            with sync_process(url, args.redis_url, prefix):
                side = EngineSide(args.redis_url, prefix).start()
                try:
                    loaded_before = len(side.swaps)
                    with psycopg.connect(url) as conn:
                        group = _one(
                            conn.execute("SELECT id FROM rate_groups WHERE name = 'bench'").fetchone()
                        )
                        deck = "".join(
                            f"{group}\t{100000000 + n}\t0.{n % 500:04d}\tDeck row {n % 50}\n"
                            for n in range(args.rates)
                        )
                        started = time.monotonic()
                        columns = "rate_group_id, prefix, cost_per_minute, description"
                        with (
                            conn.cursor() as cur,
                            cur.copy(f"COPY origination_rates ({columns}) FROM STDIN") as copy,
                        ):
                            for start in range(0, len(deck), 1 << 20):
                                copy.write(deck[start : start + (1 << 20)])
                        conn.commit()
                        committed = time.monotonic()
                    report["copy_and_commit_s"] = round(committed - started, 2)
                    deadline = committed + 600
                    while len(side.swaps) == loaded_before:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the engine never loaded the deck")
                        time.sleep(0.01)
                    report["commit_to_engine_catalog_s"] = round(side.swaps[-1][0] - committed, 2)
                    report["engine_rates_indexed"] = sum(
                        len(t) for t in side.holder.current[1].group_rates.values()
                    )
                finally:
                    side.stop()
        finally:
            drop_prefix(args.redis_url, prefix)
        # the parts, one by one
        with psycopg.connect(url) as conn:
            started = time.monotonic()
            data = load_catalog(conn)
            report["load_catalog_s"] = round(time.monotonic() - started, 2)
        client = redis.Redis.from_url(args.redis_url)
        try:
            started = time.monotonic()
            publish_snapshot(client, prefix, data)
            report["publish_snapshot_s"] = round(time.monotonic() - started, 2)
            started = time.monotonic()
            raw = fetch_snapshot(client, prefix)
            report["engine_fetch_s"] = round(time.monotonic() - started, 2)
            started = time.monotonic()
            decoded = raw.decode()
            catalog = Catalog.build(decoded)
            catalog.track_changes(decoded)
            report["engine_decode_build_s"] = round(time.monotonic() - started, 2)
        finally:
            client.close()
            drop_prefix(args.redis_url, prefix)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.sync_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    commands = parser.add_subparsers(dest="command", required=True)
    lag = commands.add_parser("lag", help="lag of single-row changes under a steady write rate")
    lag.add_argument("--rate", type=float, default=500.0, help="changes per second, all writers together")
    lag.add_argument("--seconds", type=float, default=20.0)
    lag.add_argument("--writers", type=int, default=4, help="writer processes (one connection each)")
    lag.add_argument("--accounts", type=int, default=10_000)
    lag.add_argument("--rates", type=int, default=100_000, help="origination rates in the catalogue")
    load = commands.add_parser("load", help="time to get a big rate deck from COPY to the engines")
    load.add_argument("--rates", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    report = run_lag(args) if args.command == "lag" else run_load(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _one(row: tuple[Any, ...] | None) -> Any:
    assert row is not None, "the bench rate group is missing"
    return row[0]
