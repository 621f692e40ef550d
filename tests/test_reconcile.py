"""Reconciliation of the limits registry against FreeSWITCH's live channels (engine/reconcile.py).

The switches are the FreeSWITCH emulator's inbound socket (loadtest.fsemu.inbound),
each served by gevent in a thread of its own; the client under test uses plain sockets.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import cast

import gevent
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from engine.reconcile import (
    ReconcileReport,
    SwitchAddress,
    SwitchUnavailable,
    list_live_channels,
    parse_show_channels,
    reconcile,
)
from engine.state.keys import limits_call_key, limits_channels_key
from engine.state.limits import LevelKind, Limiter, LimitPlan, Subject
from loadtest.fsemu.inbound import InboundServer
from loadtest.fsemu.outbound import SHOW_CHANNELS_COLUMNS, Switch

# --------------------------------------------------------------------------- emulated switches


class LiveChannel:
    """Stands in for an emulated call in the switch's registry: only ``show channels`` reads it."""

    def __init__(self, uuid: str, application_data: str = "") -> None:
        self.uuid = uuid
        self.other_uuid = None
        self.answered = True
        self.application_data = application_data

    def show_rows(self) -> list[dict[str, str]]:
        row = dict.fromkeys(SHOW_CHANNELS_COLUMNS, "")
        row.update(
            uuid=self.uuid,
            direction="inbound",
            name=f"sofia/internal/{self.uuid[:4]}@192.0.2.9",
            state="CS_EXECUTE",
            application="socket",
            application_data=self.application_data,
            call_uuid=self.uuid,
        )
        return [row]


class EmulatedSwitch:
    """An InboundServer on its own thread (and gevent hub), stopped by ``close``."""

    def __init__(self, password: str = "ClueCon") -> None:
        self.switch = Switch()
        self.password = password
        self._started = threading.Event()
        self._stopping = False
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(10)

    def _run(self) -> None:
        server = InboundServer(self.switch, password=self.password).start()
        self.address = server.address
        self._started.set()
        while not self._stopping:
            gevent.sleep(0.02)
        server.stop()

    def up(self, *uuids: str) -> None:
        for uuid in uuids:
            self.switch.channels[uuid] = LiveChannel(uuid)  # type: ignore[assignment]

    def down(self, *uuids: str) -> None:
        for uuid in uuids:
            self.switch.channels.pop(uuid, None)

    def at(self, password: str | None = None) -> SwitchAddress:
        host, port = self.address
        return SwitchAddress(host, port, self.password if password is None else password, timeout=3.0)

    def close(self) -> None:
        self._stopping = True
        self._thread.join(5)


@pytest.fixture
def switches() -> Iterator[list[EmulatedSwitch]]:
    made = [EmulatedSwitch(), EmulatedSwitch()]
    yield made
    for s in made:
        s.close()


def closed_port() -> SwitchAddress:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return SwitchAddress("127.0.0.1", port, timeout=1.0)


class Clock:
    def __init__(self, t: float = 50_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


PLAN = LimitPlan((Subject(LevelKind.ACCOUNT, 1, 100),), (Subject(LevelKind.TRUNK, 10, 100),))


def held(client: redis.Redis, key: str) -> set[str]:
    return {m.decode() for m in cast(list[bytes], client.zrange(key, 0, -1))}


# --------------------------------------------------------------------------- parsing


def test_parse_delimited_listing() -> None:
    text = (
        "uuid|direction|created|name|state\n"
        "aaa-1|inbound|2025-06-01 12:00:00|sofia/internal/100@x|CS_EXECUTE\n"
        "bbb-2|outbound|2025-06-01 12:00:01|sofia/external/200@y|CS_EXCHANGE_MEDIA\n"
        "\n2 total.\n"
    )
    assert parse_show_channels(text) == {"aaa-1", "bbb-2"}


def test_parse_csv_listing_and_values_with_the_delimiter() -> None:
    text = "uuid,direction,application_data\nccc-3,inbound,a,b,c\n\n1 total.\n"
    assert parse_show_channels(text) == {"ccc-3"}


def test_parse_empty_listing() -> None:
    assert parse_show_channels("\n0 total.\n") == set()


@pytest.mark.parametrize(
    "text",
    [
        "-ERR no reply\n",
        "uuid|direction\naaa|inbound\n",  # truncated: no total line
        "uuid|direction\naaa|inbound\n\n2 total.\n",  # fewer rows than the total
        "name|uuid\n\n1 total.\n",  # no uuid header first
    ],
)
def test_parse_rejects_error_and_partial_replies(text: str) -> None:
    with pytest.raises(ValueError):
        parse_show_channels(text)


# --------------------------------------------------------------------------- listing over the inbound socket


def test_list_live_channels_from_the_emulator(switches: list[EmulatedSwitch]) -> None:
    sw = switches[0]
    a = sw.at()
    assert list_live_channels(a.host, a.port, a.password, a.timeout) == set()
    sw.up("11111111-aaaa", "22222222-bbbb")
    sw.switch.channels["33333333-cccc"] = LiveChannel("33333333-cccc", "x|y\nz")  # type: ignore[assignment]
    listed = list_live_channels(a.host, a.port, a.password, a.timeout)
    assert {"11111111-aaaa", "22222222-bbbb", "33333333-cccc"} <= listed  # extra junk may only keep calls


def test_list_live_channels_failures(switches: list[EmulatedSwitch]) -> None:
    a = switches[0].at(password="wrong")
    with pytest.raises(SwitchUnavailable, match="auth"):
        list_live_channels(a.host, a.port, a.password, a.timeout)
    c = closed_port()
    with pytest.raises(SwitchUnavailable, match="connect"):
        list_live_channels(c.host, c.port, c.password, c.timeout)


def test_list_live_channels_times_out_on_a_silent_peer() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(SwitchUnavailable, match="deadline"):
            list_live_channels("127.0.0.1", port, "ClueCon", 0.3)
        assert time.monotonic() - started < 2


# --------------------------------------------------------------------------- reconcile


def test_orphans_of_a_killed_engine_are_released_and_live_calls_kept(
    client, key_prefix: str, switches: list[EmulatedSwitch]
) -> None:
    clock = Clock()
    limiter = Limiter(client, key_prefix, clock=clock)
    calls = [f"call-{n}" for n in range(6)]
    for uuid in calls:
        assert limiter.acquire(uuid, PLAN, 3600).admitted
    # The engine died with the six calls up; three of them are still up on the two switches.
    switches[0].up("call-0", "call-1", "b-leg-of-call-0")
    switches[1].up("call-4", "unrelated")
    clock.t += 10
    report = reconcile(limiter, [s.at() for s in switches], grace_seconds=5)
    assert report.ran and not report.errors
    assert sorted(report.released) == ["call-2", "call-3", "call-5"]
    assert (report.counted, report.orphans, report.kept, report.live_channels) == (6, 3, 0, 5)
    assert held(client, limits_channels_key(key_prefix, "acct", 1)) == {"call-0", "call-1", "call-4"}
    assert held(client, limits_channels_key(key_prefix, "trunk", 10)) == {"call-0", "call-1", "call-4"}
    assert set(limiter.counted_calls()) == {"call-0", "call-1", "call-4"}
    assert not client.exists(limits_call_key(key_prefix, "call-2"))
    # A second run finds nothing more; the engine's own late release is a harmless no-op.
    again = reconcile(limiter, [s.at() for s in switches], grace_seconds=5)
    assert again.ran and again.released == ()
    assert limiter.release("call-2") is False


def test_calls_admitted_within_the_grace_period_are_kept(
    client, key_prefix: str, switches: list[EmulatedSwitch]
) -> None:
    clock = Clock()
    limiter = Limiter(client, key_prefix, clock=clock)
    assert limiter.acquire("old", PLAN, 3600).admitted
    clock.t += 4
    assert limiter.acquire("new", PLAN, 3600).admitted  # not listed yet by the switch
    clock.t += 2
    report = reconcile(limiter, [s.at() for s in switches], grace_seconds=5)
    assert report.released == ("old",) and report.kept == 1
    assert set(limiter.counted_calls()) == {"new"}


def test_nothing_is_released_when_a_switch_cannot_be_listed(
    client, key_prefix: str, switches: list[EmulatedSwitch]
) -> None:
    limiter = Limiter(client, key_prefix, clock=Clock())
    for uuid in ("a", "b"):
        assert limiter.acquire(uuid, PLAN, 3600).admitted
    limiter.clock.t += 60  # type: ignore[union-attr]
    for others in ([closed_port()], [switches[1].at(password="wrong")]):
        report = reconcile(limiter, [switches[0].at(), *others], grace_seconds=5)
        assert isinstance(report, ReconcileReport)
        assert not report.ran and report.released == () and len(report.errors) == 1
        assert set(limiter.counted_calls()) == {"a", "b"}
    empty = reconcile(limiter, [], grace_seconds=5)
    assert not empty.ran and set(limiter.counted_calls()) == {"a", "b"}


def test_reconcile_reports_redis_failure_without_raising(switches: list[EmulatedSwitch]) -> None:
    dead = closed_port()
    client = redis.Redis(
        host="127.0.0.1", port=dead.port, socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0)
    )
    limiter = Limiter(client, "x:")
    report = reconcile(limiter, [s.at() for s in switches], grace_seconds=5)
    assert not report.ran and report.errors and report.errors[0].startswith("redis")
