"""The chaos run: set up, steady load, the faults one after another, a check after each, the report.

After each fault has been injected and undone, a **checkpoint**: new calls pause (calls up stay
up), one reconciliation runs (``callgate reconcile`` over both switches, grace 0: nothing is being
admitted), then

* counters: the registry of counted calls on the primary equals the switches' live A-legs, and the
  funds reservations equal the live calls (every accepted call of this catalogue reserves);
* ledger: once the CDR stream is drained (nothing undelivered or pending), PostgreSQL's
  ``ledger_mismatches`` view is empty (balance = opening + refills - charges - call debits, to the
  cent, for every account).

At the end, with every call hung up: calls bridged without a complete check (a bridged call whose
uuid the :class:`~loadtest.chaos.load.RegistrySampler` never saw in a registry: its limits and
funds script did not run, or failed), answered calls with no CDR, and the tables.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import gevent
import gevent.subprocess
import psycopg
import redis

from engine.billing.rating import to_micros
from engine.db.fixtures import load_document
from engine.db.migrate import migrate
from engine.state.keys import cdr_stream, funds_account_key, funds_reservations_key, limits_registry_key
from engine.state.snapshot import SnapshotUnavailable, read_snapshot
from engine.sync.cdrs import GROUP
from loadtest.chaos.catalogue import CALLERS, CATALOGUE, PREPAID, SPARE
from loadtest.chaos.cluster import (
    CALLGATE,
    ROOT,
    CallgateProcess,
    PgCluster,
    RedisHa,
    callgate_environment,
    wait_for,
    zset_members,
)
from loadtest.chaos.load import (
    LONG_CALLER,
    NO_ENGINE,
    WRONG,
    CallRecord,
    EmulatedSwitch,
    Load,
    RegistrySampler,
)
from loadtest.chaos.proxy import free_port

log = logging.getLogger("loadtest.chaos")
PREFIX = "chaos:"


@dataclass(frozen=True)
class Timing:
    warmup: float
    steady: float  # load between a fault's undoing and its checkpoint
    engine_down: float
    pg_down: float
    slow_for: float
    slow_delay: float  # seconds added to each chunk, each direction
    burst_calls: int
    burst_changes: int
    hold: tuple[float, float]  # the steady calls' hold time, uniform in this range
    long_hold: float  # one caller per switch holds its calls this long: calls are up at checkpoints


SHORT = Timing(4, 3, 2, 6, 5, 0.05, 40, 20, (1.0, 3.0), 12.0)
FULL = Timing(15, 8, 5, 180, 30, 0.05, 200, 60, (2.0, 5.0), 25.0)


@dataclass
class FaultResult:
    name: str
    what: str
    injected_at: float  # seconds since the start
    window_end: float = 0.0
    calls: int = 0
    bridged: int = 0
    business_rejects: int = 0  # a rule's answer: CONCURRENT_LIMIT, NO_SUFFICIENT_FUND, unknown caller
    unchecked_bridges: int = 0
    wrongly_refused: int = 0
    refused_for_s: float = 0.0  # from the injection to the start of the last wrongly refused call
    recovered_after_s: float | None = None
    recovery: str = ""  # what "recovered" means for this fault
    counters_equal: bool | None = None
    counters_detail: str = ""
    reservations_equal: bool | None = None
    ledger_exact: bool | None = None
    ledger_detail: str = ""
    unbilled_answered: int = 0  # answered calls (billsec >= 1) with no CDR
    spent_over_recorded: list[str] = field(default_factory=list)  # see Chaos.spent_over_recorded
    notes: list[str] = field(default_factory=list)


class Chaos:
    def __init__(self, timing: Timing, workdir: Path) -> None:
        self.timing = timing
        self.dir = workdir
        self.t0 = time.monotonic()
        self.pg = PgCluster()
        self.redis = RedisHa(workdir / "redis", slow_delay=timing.slow_delay)
        self.switches = [EmulatedSwitch(0), EmulatedSwitch(1)]
        self.engine_ports = [free_port(), free_port()]
        self.engines: list[CallgateProcess] = []
        self.sync: CallgateProcess | None = None
        self.env: dict[str, str] = {}
        self.load: Load | None = None
        self.sampler: RegistrySampler | None = None
        self.results: list[FaultResult] = []
        self.final: dict[str, Any] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ set-up and tear-down

    def setup(self) -> None:
        (self.dir / "redis").mkdir(parents=True, exist_ok=True)
        self.pg.init().start()
        migrate(self.pg.url)
        with psycopg.connect(self.pg.url) as conn:
            load_document(conn, CATALOGUE)
        self.redis.start()
        for sw in self.switches:
            sw.open_inbound()
        switches = ",".join(f"127.0.0.1:{sw.port}" for sw in self.switches)
        self.env = callgate_environment(
            self.pg.url, self.redis, PREFIX,
            # A shared 2-core machine: a decision is not refused for being slow (the slow-Redis
            # fault adds latency on purpose). Load shedding off, as in the tests.
            CALLGATE_REDIS__SOCKET_TIMEOUT="1",
            CALLGATE_ENGINE__DECISION_DEADLINE="2",
            CALLGATE_ENGINE__SHED_LOOP_LAG="0",
            CALLGATE_ENGINE__SHED_BACKLOG="0",
            CALLGATE_RULES__CALL_MAX_LENGTH="20",
            CALLGATE_LIMITS__SWITCHES=switches,
            CALLGATE_LIMITS__RECONCILE_INTERVAL="15",
        )  # fmt: skip
        self.sync = CallgateProcess("sync", self.env, self.dir / "sync.log")
        self.sync.start()
        wait_for(self._snapshot_published, 60, "the first snapshot")
        for i, port in enumerate(self.engine_ports):  # listed before started: torn down if interrupted
            self.engines.append(CallgateProcess("serve", self.env, self.dir / f"serve{i}.log", port))
        for engine in self.engines:
            engine.start()
        self.sampler = RegistrySampler([node.client() for node in self.redis.nodes], PREFIX)
        self.sampler.start()
        self.load = Load(self.switches, self.engine_ports, self.t0, self.timing.hold)
        mismatches = self.ledger_mismatches()
        if mismatches:
            raise RuntimeError(f"the ledger does not balance before the run: {mismatches}")

    def teardown(self) -> None:
        if self.load is not None:
            self.load.stop(timeout=10)
        if self.sampler is not None:
            self.sampler.stop()
        for engine in self.engines:
            engine.stop()
        if self.sync is not None:
            self.sync.stop()
        for sw in self.switches:
            sw.close_inbound()
        self.redis.stop()
        self.pg.destroy()

    def _snapshot_published(self) -> bool:
        primary = self.redis.primary()
        if primary is None:
            return False
        try:
            read_snapshot(primary.client(5), PREFIX)
        except (SnapshotUnavailable, redis.RedisError):
            return False
        return True

    # ------------------------------------------------------------------ observations

    def primary_client(self) -> redis.Redis:
        wait_for(lambda: self.redis.primary() is not None, 60, "a Redis primary")
        node = self.redis.primary()
        assert node is not None
        return node.client(5)

    def counted(self) -> set[str]:
        return zset_members(self.primary_client(), limits_registry_key(PREFIX))

    def reserved(self) -> set[str]:
        client = self.primary_client()
        pattern = funds_reservations_key(PREFIX, 0)[:-1] + "*"
        return {member for key in client.scan_iter(match=pattern) for member in zset_members(client, key)}

    def cdr_backlog(self) -> int | None:
        """Entries of the CDR stream not yet written (undelivered + pending); None if unknown."""
        try:
            groups = self.primary_client().xinfo_groups(cdr_stream(PREFIX))
        except redis.RedisError:
            return None
        for group in groups:
            if group["name"] in (GROUP, GROUP.encode()):
                return int(group.get("lag") or 0) + int(group["pending"])
        return None

    def decided_between(self, since: float, until: float) -> set[str]:
        """The calls an engine decided (a CDR is expected) that started after ``since`` (no victim of
        an earlier fault) and ended before ``until``."""
        assert self.load is not None
        return {
            r.uuid
            for r in self.load.records
            if r.outcome not in NOT_DECIDED and r.started >= since and 0 < r.ended < until
        }

    def all_written(self, uuids: set[str]) -> bool:
        try:
            return uuids <= self.cdr_uuids()
        except psycopg.Error:
            return False

    def ledger_mismatches(self) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg.url, connect_timeout=5) as conn:
            return conn.execute("SELECT * FROM ledger_mismatches").fetchall()

    def cdr_uuids(self) -> set[str]:
        with psycopg.connect(self.pg.url, connect_timeout=5) as conn:
            return {row[0] for row in conn.execute("SELECT uuid FROM cdrs")}

    def reconcile(self, grace: float = 0) -> tuple[int, str]:
        """``callgate reconcile`` over both switches. Grace 0 only with new calls paused: under load,
        a call admitted between the listing and the registry read would be released (a first
        version did so in the inbound fault, and the sampler duly reported its bridge unchecked)."""
        switches = [arg for sw in self.switches for arg in ("--switch", f"127.0.0.1:{sw.port}")]
        done = gevent.subprocess.run(
            [*CALLGATE, "reconcile", *switches, "--grace", str(grace)],
            env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return done.returncode, (done.stdout + done.stderr).strip()

    # ------------------------------------------------------------------ the run

    def run(self, faults: list[str]) -> None:
        assert self.load is not None
        self.load.start(CALLERS, self.timing.long_hold)
        gevent.sleep(self.timing.warmup)
        for name in faults:
            fault = FAULTS[name]
            result = FaultResult(
                name, fault.__doc__.strip().split("\n")[0] if fault.__doc__ else name, self.now()
            )
            log.warning("fault %s at %.1fs", name, result.injected_at)
            try:
                fault(self, result)
            except TimeoutError as exc:  # reported, and the run goes on: the report says what failed
                result.notes.append(f"TIMEOUT: {exc}; Redis: {self.redis.describe()}")
            gevent.sleep(self.timing.steady)
            result.window_end = self.now()
            self.checkpoint(result)
            self.results.append(result)
        self.finish()

    def checkpoint(self, result: FaultResult) -> None:
        """One reconciliation with new calls paused; then counters and reservations against the
        switches' live calls, and the ledger once the CDRs are written."""
        assert self.load is not None
        self.load.pause()
        gevent.sleep(2.5)  # nothing is admitted now: grace 0 cannot release a call being admitted
        code, output = self.reconcile()
        if code != 0:
            result.notes.append(f"checkpoint reconcile: {output}")
        self.compare_counters(result)
        self.check_ledger(result)  # paused: the stream drains (under load it is never empty for long)
        self.load.resume()

    def live_calls(self) -> set[str]:
        assert self.load is not None
        return self.load.live()

    def compare_counters(self, result: FaultResult) -> None:
        """Equal within 3 s: a call that ends right now is released by its engine's batch."""
        deadline = time.monotonic() + 3
        while True:
            live, counted, reserved = self.live_calls(), self.counted(), self.reserved()
            ok = counted == live and reserved == live
            if ok or time.monotonic() > deadline:
                break
            gevent.sleep(0.1)
        result.counters_equal = counted == live
        result.reservations_equal = reserved == live
        result.counters_detail = (
            f"{len(live)} live, {len(counted)} counted ({len(counted - live)} not live, "
            f"{len(live - counted)} uncounted), {len(reserved)} reserved ({len(reserved - live)} not live, "
            f"{len(live - reserved)} without reservation)"
        )

    def check_ledger(self, result: FaultResult, timeout: float = 120) -> None:
        try:
            wait_for(lambda: self.cdr_backlog() == 0, timeout, "the CDR stream drained", 0.2)
        except TimeoutError:
            result.ledger_detail = f"CDR backlog {self.cdr_backlog()} after {timeout}s"
        mismatches = self.ledger_mismatches()
        result.ledger_exact = not mismatches and not result.ledger_detail
        if mismatches:
            result.ledger_detail = f"{len(mismatches)} accounts: {mismatches[:3]}"
        result.spent_over_recorded = self.spent_over_recorded()

    def spent_over_recorded(self) -> list[str]:
        """Accounts whose Redis ``spent`` exceeds PostgreSQL's ``calls_debited`` once the stream is
        drained: a debit counted twice in Redis (a hangup settled twice) or a settle whose CDR never
        reached PostgreSQL. Less is allowed: a settle lost in a failover (docs/high-availability.md)."""
        client = self.primary_client()
        with psycopg.connect(self.pg.url, connect_timeout=5) as conn:
            rows = conn.execute("SELECT id, calls_debited FROM accounts").fetchall()
        recorded: dict[int, Decimal] = dict(rows)
        over = []
        for account_id, debited in recorded.items():
            spent = client.hget(funds_account_key(PREFIX, account_id), "spent")
            if spent is not None and int(spent) > to_micros(debited):
                over.append(f"account {account_id}: spent {int(spent)} > recorded {to_micros(debited)}")
        return over

    def finish(self) -> None:
        """Every call hung up, one reconciliation, the CDRs written: the final account."""
        assert self.load is not None and self.sampler is not None
        self.load.stop(timeout=60)
        code, output = self.reconcile()
        self.sampler.stop()
        final = FaultResult("final", "every call ended", self.now())
        self.check_ledger(final)
        records = self.load.records
        cdrs = self.cdr_uuids()
        summarise(self.results, records, self.sampler.seen, cdrs)
        self.final = {
            "calls": len(records),
            "bridged": sum(r.outcome == "BRIDGED" for r in records),
            "outcomes": _tally(r.outcome for r in records),
            "unchecked_bridges": len(unchecked(records, self.sampler.seen)),
            "unbilled_answered": len(unbilled(records, cdrs)),
            "cdrs": len(cdrs),
            "cdrs_expected": len({r.uuid for r in records if r.outcome not in NOT_DECIDED}),
            "final_reconcile": output,
            "final_reconcile_ok": code == 0,
            "counted_after_all_ended": len(self.counted()),
            "reserved_after_all_ended": len(self.reserved()),
            "ledger_exact": final.ledger_exact,
            "ledger_detail": final.ledger_detail,
            "spent_over_recorded": final.spent_over_recorded,
            "unattributed_refusals": [
                (round(r.started, 2), r.outcome)
                for r in records
                if r.outcome in WRONG
                and not any(f.injected_at <= r.started < f.window_end for f in self.results)
            ],
            "prepaid_refused_no_funds": sum(
                r.outcome == "NO_SUFFICIENT_FUND" for r in records if r.user in ("pre1", "pre2")
            ),
        }

    # ------------------------------------------------------------------ helpers for the faults

    def held_calls(self, count: int, user: str = "burst", hold: float = 20.0) -> list[gevent.Greenlet]:
        """``count`` long calls on the first engine, so that it has calls up when it dies."""
        assert self.load is not None
        load = self.load
        return [gevent.spawn(load.call, self.switches[i % 2], user, hold) for i in range(count)]

    def admin_burst(self, changes: int) -> None:
        """Admin changes as the admin service makes them: refills of the prepaid accounts (the
        balance and its ledger entry in one transaction), and max_channels edits of a spare account."""
        with psycopg.connect(self.pg.url, autocommit=True) as conn:
            for i in range(changes):
                with conn.transaction():
                    if i % 2 == 0:
                        number = PREPAID[(i // 2) % len(PREPAID)]
                        refilled = conn.execute(
                            "UPDATE accounts SET balance = balance + 0.50 WHERE number = %s"
                            " RETURNING id, balance, currency", [number],
                        ).fetchone()  # fmt: skip
                        assert refilled is not None, f"prepaid account {number} is not in the catalogue"
                        account, balance, currency = refilled
                        conn.execute(
                            "INSERT INTO balance_changes (account_id, kind, amount, balance_after,"
                            " currency, description, actor)"
                            " VALUES (%s, 'refill', 0.50, %s, %s, 'chaos burst', 'chaos')",
                            [account, balance, currency],
                        )
                    else:
                        conn.execute("UPDATE accounts SET max_channels = %s WHERE number = %s", [i, SPARE])
                gevent.sleep(0.02)

    def snapshot_matches_database(self) -> bool:
        """Redis' snapshot has every account's max_channels and balance as PostgreSQL has them."""
        try:
            data = read_snapshot(self.primary_client(), PREFIX)
            with psycopg.connect(self.pg.url, connect_timeout=5) as conn:
                rows = conn.execute(
                    "SELECT number, max_channels, balance + calls_debited FROM accounts"
                ).fetchall()
        except (SnapshotUnavailable, redis.RedisError, psycopg.Error) as exc:
            log.info("snapshot or database not readable: %r", exc)
            return False
        # balance + calls_debited moves only with refills and charges (a CDR batch moves both by
        # the same debit), so it can be compared while calls keep being billed.
        published = {a.number: (a.max_channels, a.balance + a.calls_debited) for a in data.accounts}
        differ = [(n, published.get(n), (c, f)) for n, c, f in rows if published.get(n) != (c, f)]
        if differ:
            log.info("snapshot differs from PostgreSQL: %s", differ[:3])
        return not differ


# --------------------------------------------------------------------------- the accounting (pure)

NOT_DECIDED = frozenset({NO_ENGINE, "ERROR"})  # no engine answered: no CDR is expected


def unchecked(records: list[CallRecord], seen: set[str]) -> list[CallRecord]:
    """Calls the switch bridged whose uuid no registry sample ever held: bridged without their
    limits/funds script having run and succeeded."""
    return [r for r in records if r.outcome == "BRIDGED" and r.uuid not in seen]


def unbilled(records: list[CallRecord], cdrs: set[str]) -> list[CallRecord]:
    """Answered calls billed at least one second that have no CDR in PostgreSQL."""
    return [r for r in records if r.answered and r.billsec >= 1 and r.uuid not in cdrs]


def summarise(results: list[FaultResult], records: list[CallRecord], seen: set[str], cdrs: set[str]) -> None:
    """Fill each fault's counts. Calls, refusals and recovery: the calls started in the fault's
    window (its injection to its checkpoint). Unchecked bridges and unbilled calls: also the calls
    that were up when the fault was injected (the victims of an engine killed with calls up)."""
    for result in results:
        start, end = result.injected_at, result.window_end
        window = [r for r in records if start <= r.started < end]
        touched = [r for r in records if r.started < end and (r.started >= start or r.ended > start)]
        result.calls = len(window)
        result.bridged = sum(r.outcome == "BRIDGED" for r in window)
        result.business_rejects = sum(r.outcome not in WRONG and r.outcome != "BRIDGED" for r in window)
        result.unchecked_bridges = len(unchecked(touched, seen))
        result.unbilled_answered = len(unbilled(touched, cdrs))
        wrong = [r for r in window if r.outcome in WRONG]
        result.wrongly_refused = len(wrong)
        if wrong:
            last = max(r.started for r in wrong)
            result.refused_for_s = round(last - start, 2)
            after = [r.started for r in window if r.outcome == "BRIDGED" and r.started > last]
            if after and result.recovered_after_s is None:
                result.recovered_after_s = round(min(after) - start, 2)
        elif result.recovered_after_s is None and result.recovery.startswith("first bridged"):
            result.recovered_after_s = 0.0


# --------------------------------------------------------------------------- the faults


def engine_kill(chaos: Chaos, result: FaultResult) -> None:
    """kill -9 of an engine with calls up; started again 'engine_down' seconds later (systemd's Restart=)"""
    engine = chaos.engines[0]
    held = chaos.held_calls(4, hold=chaos.timing.engine_down + chaos.timing.steady + 4)
    wait_for(lambda: sum(g.dead for g in held) == 0 and len(chaos.live_calls()) >= 4, 15, "calls up")
    gevent.sleep(1)
    result.injected_at = chaos.now()
    engine.kill()
    gevent.sleep(chaos.timing.engine_down)
    engine.start()
    result.recovered_after_s = round(chaos.now() - result.injected_at, 2)
    result.recovery = (
        "the killed engine listens again (restarted after engine_down); the other engine took every call"
    )


def redis_failover(chaos: Chaos, result: FaultResult) -> None:
    """Redis primary SIGKILLed: Sentinel promotes the replica; the old primary restarted as a replica (AOF)"""
    old = chaos.redis.primary()
    assert old is not None
    new = chaos.redis.other(old)
    result.injected_at = chaos.now()
    old.kill()
    wait_for(lambda: chaos.redis.primary() is new, 60, "the sentinels promoting the replica", 0.05)
    result.notes.append(f"promoted {chaos.now() - result.injected_at:.2f}s after the kill")
    result.recovery = "first bridged call after the last refusal"
    gevent.sleep(chaos.timing.steady)
    old.start()  # its AOF loads; the sentinels turn it into a replica of the new primary
    wait_for(lambda: chaos.redis.in_sync(old), 60, "the old primary back as a replica", 0.1)


def redis_restart(chaos: Chaos, result: FaultResult) -> None:
    """Redis primary SIGKILLed and restarted at once on its AOF (faster than the sentinels' down-after)"""
    node = chaos.redis.primary()
    assert node is not None
    result.injected_at = chaos.now()
    node.kill()
    node.start()
    result.notes.append(f"redis answered {chaos.now() - result.injected_at:.2f}s after the kill")
    wait_for(lambda: chaos.redis.primary() is not None, 60, "a primary", 0.05)
    result.notes.append(f"primary after it: {'the same' if chaos.redis.primary() is node else 'failed over'}")
    replica = chaos.redis.other(chaos.redis.primary() or node)
    wait_for(lambda: chaos.redis.in_sync(replica), 120, "the replica in sync again", 0.1)
    result.recovery = "first bridged call after the last refusal"


def sync_kill(chaos: Chaos, result: FaultResult) -> None:
    """kill -9 of the sync worker during a burst of admin changes and CDRs; restarted 2 s later"""
    assert chaos.sync is not None and chaos.load is not None
    load = chaos.load
    timing = chaos.timing
    burst = [
        gevent.spawn(_burst_calls, load, chaos.switches, timing.burst_calls),
        gevent.spawn(chaos.admin_burst, timing.burst_changes),
    ]
    gevent.sleep(1.0)
    result.injected_at = chaos.now()
    chaos.sync.kill()
    gevent.sleep(2.0)
    chaos.sync.start()
    restarted = chaos.now()
    gevent.joinall(burst, timeout=120, raise_error=True)
    result.notes.append(
        f"burst of {timing.burst_calls} calls and {timing.burst_changes} changes ended "
        f"{chaos.now() - result.injected_at:.1f}s after the kill"
    )
    burst_over = chaos.now()
    expected = chaos.decided_between(result.injected_at - 1, burst_over)
    try:
        wait_for(lambda: chaos.all_written(expected) and chaos.snapshot_matches_database(), 120,
                 "every change and CDR written", 0.2)  # fmt: skip
        result.recovered_after_s = round(chaos.now() - result.injected_at, 2)
    except TimeoutError as exc:
        result.notes.append(str(exc))
    result.recovery = (
        "every CDR of the calls ended by the burst's end in PostgreSQL, and Redis' snapshot equal to"
        " PostgreSQL (every admin change published)"
    )
    result.notes.append(f"worker restarted {restarted - result.injected_at:.1f}s after the kill")


def _burst_calls(load: Load, switches: list[EmulatedSwitch], count: int) -> None:
    pool = [gevent.spawn(_burst_caller, load, switches[i % 2], count // 10) for i in range(10)]
    gevent.joinall(pool, raise_error=True)


def _burst_caller(load: Load, sw: EmulatedSwitch, count: int) -> None:
    for _ in range(count):
        load.call(sw, "burst", 0.3)


def pg_stop(chaos: Chaos, result: FaultResult) -> None:
    """PostgreSQL stopped (pg_ctl -m fast) for 'pg_down' seconds, then started"""
    result.injected_at = chaos.now()
    chaos.pg.stop()  # gevent's subprocess (monkey-patched): the proxies keep forwarding
    gevent.sleep(chaos.timing.pg_down)
    backlog = chaos.cdr_backlog()
    chaos.pg.start()
    started = chaos.now()
    result.notes.append(f"CDR backlog when PostgreSQL came back: {backlog}")
    expected = chaos.decided_between(result.injected_at, started)
    try:
        wait_for(lambda: chaos.all_written(expected), 180, "the CDRs written", 0.2)
        result.recovered_after_s = round(chaos.now() - started, 2)
    except TimeoutError as exc:
        result.notes.append(str(exc))
    result.recovery = "every CDR of the calls ended while PostgreSQL was down written, from its start"


def inbound_unreachable(chaos: Chaos, result: FaultResult) -> None:
    """switch 2's inbound event socket closed during a reconciliation: nothing may be released"""
    sw = chaos.switches[1]
    before_live, before_counted = chaos.live_calls(), chaos.counted()
    result.injected_at = chaos.now()
    sw.close_inbound()
    code, output = chaos.reconcile(grace=5)
    after_counted = chaos.counted()
    still_live = chaos.live_calls() & before_live & before_counted
    wrongly_released = still_live - after_counted
    result.notes.append(f"reconcile with the socket closed: exit {code}, {output.splitlines()[-1][:160]}")
    result.notes.append(f"live counted calls released by it: {len(wrongly_released)}")
    if code == 0 or wrongly_released:
        result.notes.append("DEFECT: a partial view released calls")
    gevent.sleep(1.0)
    sw.open_inbound()
    code, output = chaos.reconcile(grace=5)
    result.recovered_after_s = round(chaos.now() - result.injected_at, 2)
    result.recovery = "a reconciliation succeeds again (socket reopened after 1 s)"
    if code != 0:
        result.notes.append(f"reconcile after reopening failed: {output}")


def redis_slow(chaos: Chaos, result: FaultResult) -> None:
    """every Redis connection slowed by a delaying TCP proxy ('slow_delay' s each way) for 'slow_for' s"""
    result.injected_at = chaos.now()
    chaos.redis.slow(True)
    gevent.sleep(chaos.timing.slow_for)
    chaos.redis.slow(False)
    result.notes.append(f"{chaos.timing.slow_delay * 1000:.0f} ms each way for {chaos.timing.slow_for:.0f} s")
    result.recovery = "first bridged call after the last refusal"


def duplicate_hangup(chaos: Chaos, result: FaultResult) -> None:
    """CHANNEL_HANGUP_COMPLETE delivered twice for calls under load: each is billed once"""
    assert chaos.load is not None
    load = chaos.load
    result.injected_at = chaos.now()
    calls = [
        gevent.spawn(load.call, chaos.switches[i % 2], LONG_CALLER, 1.5, duplicate=True) for i in range(10)
    ]
    gevent.joinall(calls, timeout=60, raise_error=True)
    uuids = [g.value.uuid for g in calls if g.value.outcome == "BRIDGED"]
    wait_for(lambda: chaos.cdr_backlog() == 0, 60, "the CDRs written", 0.2)
    with psycopg.connect(chaos.pg.url, connect_timeout=5) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM cdrs WHERE uuid = ANY(%s)),"
            " (SELECT count(*) FROM call_debits WHERE uuid = ANY(%s))", [uuids, uuids],
        ).fetchone()  # fmt: skip
        assert counts is not None  # an aggregate SELECT returns one row
        rows, debits = counts
    result.notes.append(f"{len(uuids)} calls with a duplicated hangup: {rows} CDRs, {debits} debits")
    if rows != len(uuids) or debits != len(uuids):
        result.notes.append("DEFECT: a duplicated hangup was billed twice or not at all")
    result.recovery = "nothing to recover"


FAULTS: dict[str, Callable[[Chaos, FaultResult], None]] = {
    "engine_kill": engine_kill,
    "redis_failover": redis_failover,
    "redis_restart": redis_restart,
    "sync_kill": sync_kill,
    "pg_stop": pg_stop,
    "inbound_unreachable": inbound_unreachable,
    "redis_slow": redis_slow,
    "duplicate_hangup": duplicate_hangup,
}


def _tally(values: Iterator[str] | Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- the report


def report(chaos: Chaos, timing: Timing, started_utc: str, elapsed: float, command: str) -> dict[str, Any]:
    return {
        "command": command,
        "started_utc": started_utc,
        "elapsed_s": round(elapsed, 1),
        "timing": dataclasses.asdict(timing),
        "faults": [dataclasses.asdict(r) for r in chaos.results],
        "final": chaos.final,
        "passed": passed(chaos),
    }


def passed(chaos: Chaos) -> bool:
    return (
        chaos.final.get("unchecked_bridges") == 0
        and bool(chaos.final.get("ledger_exact"))
        and not chaos.final.get("spent_over_recorded")
        and all(
            r.unchecked_bridges == 0 and r.ledger_exact and not r.spent_over_recorded for r in chaos.results
        )
        and not any(note.startswith(("DEFECT", "TIMEOUT")) for r in chaos.results for note in r.notes)
    )


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "**NO**")


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"`{data['command']}`, started {data['started_utc']}, {data['elapsed_s']} s.",
        "",
        "| fault | calls | bridged | unchecked bridges | wrongly refused (for) | recovered after "
        "| counters = live after 1 reconciliation | reservations = live | ledger exact "
        "| answered, not billed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in data["faults"]:
        refused = f"{f['wrongly_refused']} ({f['refused_for_s']} s)" if f["wrongly_refused"] else "0"
        recovered = "-" if f["recovered_after_s"] is None else f"{f['recovered_after_s']} s"
        lines.append(
            f"| {f['name']} | {f['calls']} | {f['bridged']} | {f['unchecked_bridges']} | {refused} "
            f"| {recovered} | {_yes(f['counters_equal'])} | {_yes(f['reservations_equal'])} "
            f"| {_yes(f['ledger_exact'])} | {f['unbilled_answered']} |"
        )
    final = data["final"]
    lines += [
        "",
        f"Whole run: {final['calls']} calls, {final['bridged']} bridged, outcomes {final['outcomes']}; "
        f"**{final['unchecked_bridges']} bridged without a complete check**; {final['cdrs']} CDRs for "
        f"{final['cdrs_expected']} decided calls; {final['unbilled_answered']} answered calls not billed; "
        f"after every call ended and one reconciliation, {final['counted_after_all_ended']} calls counted; "
        f"ledger exact for every account: {_yes(final['ledger_exact'])}.",
        "",
        "Notes per fault:",
        "",
    ]
    for f in data["faults"]:
        details = "; ".join([f"recovery = {f['recovery']}", f["counters_detail"], *f["notes"]])
        if f["ledger_detail"]:
            details += f"; ledger: {f['ledger_detail']}"
        if f["spent_over_recorded"]:
            details += f"; Redis spent over PostgreSQL: {f['spent_over_recorded']}"
        lines.append(f"* **{f['name']}** ({f['what']}): {details}")
    return "\n".join(lines) + "\n"


def run(timing: Timing, faults: list[str], out: Path | None, keep: bool, command: str) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="cg-chaos-"))
    started_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    chaos = Chaos(timing, workdir)
    began = time.monotonic()
    try:
        chaos.setup()
        chaos.run(faults)
    finally:
        chaos.teardown()
    data = report(chaos, timing, started_utc, time.monotonic() - began, command)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "chaos.json").write_text(json.dumps(data, indent=2, default=str))
        (out / "chaos.md").write_text(markdown(data))
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log.warning("logs kept in %s", workdir)
    return data
