"""Steady load from emulated switches, and the registry sampler that proves every bridge was checked.

Each switch runs a few callers in a loop: a call, held for a few seconds and hung up by the caller
(CHANNEL_HANGUP_COMPLETE follows, so the engine rates and settles it), then the next one. A switch
tries its engines in turn and moves to the next when one does not accept the connection, as a
dialplan with one ``socket`` line per engine does (FreeSWITCH continues to the next application
when ``socket`` cannot connect).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from dataclasses import dataclass, field

import gevent
import gevent.event
import redis

from engine.state.keys import limits_registry_key
from loadtest.chaos.catalogue import DESTINATION
from loadtest.chaos.cluster import zset_members
from loadtest.fsemu import CallSpec, InboundServer, Switch, place_call

# Refusals that are the engine's fault (not a rule's answer): these are "wrongly refused".
NO_ENGINE = "NO_ENGINE"  # no engine accepted the connection
WRONG = frozenset({"ENGINE_DEGRADED", NO_ENGINE, "ERROR"})
LONG_CALLER = "burst"  # the account with room for the long calls and the bursts


@dataclass
class CallRecord:
    uuid: str
    user: str
    switch: int
    started: float  # seconds since the run's start
    ended: float = 0.0
    outcome: str = ""  # BRIDGED, a callgate reason, NO_ENGINE or ERROR
    answered: bool = False
    billsec: int = 0
    error: str | None = None


@dataclass
class EmulatedSwitch:
    index: int
    switch: Switch = field(default_factory=Switch)
    inbound: InboundServer | None = None
    port: int = 0

    def open_inbound(self) -> None:
        self.inbound = InboundServer(self.switch, host="127.0.0.1", port=self.port).start()
        self.port = self.inbound.address[1]

    def close_inbound(self) -> None:
        if self.inbound is not None:
            self.inbound.stop()
            self.inbound = None


class Load:
    def __init__(
        self,
        switches: list[EmulatedSwitch],
        engine_ports: list[int],
        started: float,
        hold: tuple[float, float],
        seed: int = 17,
    ) -> None:
        self.switches = switches
        self.engine_ports = engine_ports
        self.t0 = started
        self.hold = hold
        self.records: list[CallRecord] = []
        self.running = gevent.event.Event()  # set: callers place calls; clear: paused
        self.stopping = gevent.event.Event()
        self._greenlets: list[gevent.Greenlet] = []
        self._random = random.Random(seed)
        self._rotation = itertools.count()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self, callers: tuple[tuple[str, int], ...], long_hold: float) -> None:
        """``callers`` hold calls ``hold`` seconds; one more per switch holds them ``long_hold``
        seconds, so that calls are up at every checkpoint."""
        self.running.set()
        for sw in self.switches:
            for user, count in callers:
                for _ in range(count):
                    self._greenlets.append(gevent.spawn(self._caller, sw, user))
            self._greenlets.append(gevent.spawn(self._caller, sw, LONG_CALLER, long_hold))

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    def stop(self, timeout: float = 30) -> None:
        self.stopping.set()
        self.running.set()
        gevent.joinall(self._greenlets, timeout=timeout)
        gevent.killall(self._greenlets, timeout=5)

    def _caller(self, sw: EmulatedSwitch, user: str, hold: float | None = None) -> None:
        while not self.stopping.is_set():
            self.running.wait()
            if self.stopping.is_set():
                return
            record = self.call(sw, user, hold or self._random.uniform(*self.hold))
            if record.outcome != "BRIDGED":
                gevent.sleep(0.5 if record.outcome in WRONG else 1.5)  # no busy loop on refusals

    def call(self, sw: EmulatedSwitch, user: str, hold: float, *, duplicate: bool = False) -> CallRecord:
        spec = CallSpec(
            destination=DESTINATION,
            sip_auth_username=user,
            hold_seconds=hold,
            duplicate_hangup_complete=duplicate,
        )
        record = CallRecord(spec.uuid, user, sw.index, self.now())
        self.records.append(record)
        first = next(self._rotation)
        result = None
        for attempt in range(len(self.engine_ports)):
            port = self.engine_ports[(first + attempt) % len(self.engine_ports)]
            result = place_call("127.0.0.1", port, spec, timeout=hold + 30, switch=sw.switch)
            if result.connected:
                break
        record.ended = self.now()
        assert result is not None
        if not result.connected:
            record.outcome = NO_ENGINE
        elif result.bridged_target is not None:
            record.outcome = "BRIDGED"
        else:
            reason = result.variables.get("callgate_reason")
            record.outcome = reason or "ERROR"
            if reason is None:
                record.error = result.error or "no decision"
        record.answered = result.answered
        record.billsec = result.billsec
        return record

    def live(self) -> set[str]:
        """Every A-leg up on every switch."""
        return {uuid for sw in self.switches for uuid in sw.switch.live_uuids()}


class RegistrySampler:
    """Reads the registry of counted calls on every live data node every 100 ms, directly (not
    through the proxies). A uuid seen there had its limits/funds script run and succeed on a
    primary (a replica only holds what a primary wrote)."""

    def __init__(self, clients: list[redis.Redis], prefix: str, interval: float = 0.1) -> None:
        self.clients = clients
        self.key = limits_registry_key(prefix)
        self.interval = interval
        self.seen: set[str] = set()
        self._stop = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for client in self.clients:
            with contextlib.suppress(redis.RedisError, OSError):
                self.seen.update(zset_members(client, self.key))

    def stop(self) -> None:
        self._stop.set()
        if self._greenlet is not None:
            self._greenlet.join(timeout=5)
        self.sample()
