"""The engine's whole per-call path in one process, without TCP: CPU per call and a profile.

A real :class:`engine.runtime.Engine` (configuration from ``CALLGATE_*``, snapshot and limits
in Redis) handles calls one after the other over a socket pair; the other end is the load
driver's FreeSWITCH model (:class:`loadtest.driver._Call`) replaying the emulator's bytes.
Nothing else runs, so the CPU time per call is the engine's own (accept and the TCP
handshake excepted), and cProfile attributes it deterministically (a sampling profiler
such as py-spy misattributes much of a gevent process's time to ``Hub.run``).

    python -m loadtest.inprocess --calls 2000 [--profile] [--patches timing] [--concurrent 8]

``--concurrent K`` runs the calls K at a time, each in its own greenlet, so that the engine
works as it does under load: several calls resumed in one turn of the event loop (their
acquires then share a round trip, engine.state.direct).

The dataset is published under a private prefix of the Redis in ``--redis`` first.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from dataclasses import replace
from typing import Any

from loadtest.dataset import CallMix, Scale, ensure_published
from loadtest.driver import CommandSplitter, FsLibrary, _Call

SMALL = Scale(accounts=1_000, rates=10_000, groups=10, termination_rates=10_000)


class InProcessEngine:
    """An Engine whose calls are fed over socket pairs, one at a time."""

    def __init__(self, redis_url: str, prefix: str, lib: FsLibrary) -> None:
        import gevent.socket  # noqa: F401  (the engine's sockets below are gevent's)

        from engine.config import load_config
        from engine.esl.server import listening_socket
        from engine.runtime import Engine

        environ = dict(os.environ)
        environ.pop("CALLGATE_CONFIG", None)
        environ.update(
            CALLGATE_REDIS_URL=redis_url,
            CALLGATE_REDIS__KEY_PREFIX=prefix,
            CALLGATE_METRICS__LISTEN_PORT="0",
            CALLGATE_LOGGING__DECISION_LEVEL="DEBUG",
            CALLGATE_ENGINE__LISTEN_PORT="0",
        )
        config = load_config(environ=environ)
        self._listener = listening_socket("127.0.0.1", 0)
        self.engine = Engine(config, self._listener)
        self.engine.load_initial_snapshot()
        # The snapshot watcher does not run here (its Redis waits would block the hub): the
        # loaded snapshot stays "confirmed" so that calls are decided, not refused as stale.
        self.engine.snapshots.confirmed_age = lambda now=None: 0.0  # type: ignore[method-assign]
        self.handler = self.engine.server._handler
        self.lib = lib

    def _dial(self) -> tuple[Any, Any, Any, Any, str]:
        """A connection to the engine's handler (a socket pair) and the switch model's side."""
        import gevent
        from gevent import socket as gsocket

        from engine.esl.connection import EslConnection

        engine_side, switch_side = gsocket.socketpair()
        conn = EslConnection(engine_side)
        uuid = os.urandom(16).hex()
        uuid = f"{uuid[:8]}-{uuid[8:12]}-4{uuid[13:16]}-8{uuid[17:20]}-{uuid[20:32]}"
        worker = gevent.spawn(self._serve, conn)
        return switch_side, worker, _Call(self.lib, uuid.encode()), CommandSplitter(), uuid

    def _answer(self, plan: Any, uuid: str, model: Any, blocks: list[bytes], first: bool) -> bytes:
        """What the switch model writes back for the engine's ``blocks``; ``first``: the
        ``connect`` leads them, answered with the channel data."""
        if first:
            return self.lib.connect_reply(plan, uuid) + model.feed(blocks[1:])
        return model.feed(blocks)

    def _converse(self, plan: Any, line: tuple[Any, Any, Any, Any], uuid: str, *, hang_up: bool) -> None:
        """Answer the engine until the connection closes, hanging up once bridged when
        ``hang_up``, else until the call is bridged (a rejected call ends either way)."""
        switch_side, _, model, splitter = line
        connected = False
        while hang_up or not model.bridged:
            data = switch_side.recv(65536)
            if not data:
                break
            blocks = splitter.feed(data)
            if not blocks:
                continue
            out = self._answer(plan, uuid, model, blocks, not connected)
            connected = True
            if out:
                switch_side.sendall(out)
            if hang_up and model.bridged and not model.over:
                switch_side.sendall(model.hangup())

    def call(self, plan: Any) -> str:
        """One call through the engine's handler; returns the outcome the switch saw."""
        switch_side, worker, model, splitter, uuid = self._dial()
        try:
            self._converse(plan, (switch_side, worker, model, splitter), uuid, hang_up=True)
        finally:
            switch_side.close()
            worker.join()
        return model.outcome

    def hold(self, plan: Any) -> tuple[Any, Any, Any, Any]:
        """Place a call and leave it up once bridged (a rejected call ends as usual): the
        engine then holds it as it holds a call in conversation. End it with :meth:`hang_up`."""
        import gevent

        switch_side, worker, model, splitter, uuid = self._dial()
        line = (switch_side, worker, model, splitter)
        self._converse(plan, line, uuid, hang_up=False)
        gevent.sleep(0)  # the engine reads the last replies
        return line

    def hang_up(self, line: tuple[Any, Any, Any, Any]) -> str:
        """End a call left up by :meth:`hold` (its CHANNEL_HANGUP_COMPLETE); the outcome."""
        switch_side, worker, model, splitter = line
        try:
            if model.bridged and not model.over:
                switch_side.sendall(model.hangup())
                while True:
                    data = switch_side.recv(65536)
                    if not data:
                        break
                    out = model.feed(splitter.feed(data))
                    if out:
                        switch_side.sendall(out)
        finally:
            switch_side.close()
            worker.join()
        return str(model.outcome)

    def _serve(self, conn: Any) -> None:
        try:
            self.handler(conn, ("127.0.0.1", 0), time.monotonic())  # accepted now, as the server does
        finally:
            conn.close()

    def finish_hangups(self) -> None:
        """Run what the engine's background greenlets would: the queued limit releases and (with
        accounting) the queued settlements, each in its batches."""
        import gevent.event

        self.engine.releases.flush()
        settler = getattr(self.engine, "settler", None)
        if settler is not None:
            done = gevent.event.Event()
            done.set()
            settler.run(done)  # settles everything queued, then returns

    def close(self) -> None:
        self.engine.redis.close()
        self._listener.close()


def run(
    calls: int,
    *,
    redis_url: str,
    scale: Scale,
    kinds: dict[str, float],
    profile: bool,
    concurrent: int = 1,
) -> dict[str, Any]:
    import redis

    from loadtest.driver import record_library

    prefix = f"cginproc:{os.getpid()}:"
    client = redis.Redis.from_url(redis_url)
    ensure_published(client, prefix, scale, log=lambda _m: None)
    lib = record_library()
    engine = InProcessEngine(redis_url, prefix, lib)
    mix = CallMix(scale, kinds, seed=5)
    plans = mix.take(calls + 200)
    try:
        _calls(engine, plans[:200], concurrent)  # warm-up
        engine.finish_hangups()
        profiler = cProfile.Profile(time.process_time) if profile else None
        outcomes: dict[str, int] = {}
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        for outcome in _calls(engine, plans[200:], concurrent):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        engine.finish_hangups()  # the batched hangup side is part of each call's cost
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        engine.close()
        from engine.state.snapshot import delete_prefix

        delete_prefix(client, prefix)
        client.close()
    result: dict[str, Any] = {
        "calls": calls,
        "concurrent": concurrent,
        "cpu_per_call_us": cpu / calls * 1e6,
        "wall_per_call_us": wall / calls * 1e6,
        "outcomes": outcomes,
        "note": "CPU of this process: the engine's handler and the switch model (about 60 us/call)",
    }
    if profiler:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        result["by_part_us"] = by_part(stats, calls)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(45)
        result["profile"] = out.getvalue()
    return result


def _calls(engine: InProcessEngine, plans: list[Any], concurrent: int) -> list[str]:
    """The outcomes of ``plans``, placed ``concurrent`` at a time."""
    if concurrent <= 1:
        return [engine.call(plan) for plan in plans]
    import gevent

    outcomes: list[str] = []
    for start in range(0, len(plans), concurrent):
        group = [gevent.spawn(engine.call, plan) for plan in plans[start : start + concurrent]]
        gevent.joinall(group, raise_error=True)
        outcomes += [glet.value for glet in group]
    return outcomes


# Where each function's own time (tottime) goes, by the part of a call it belongs to (issue 18's
# list); first match wins. The switch model (loadtest/) is this harness's own cost.
PARTS = (
    ("framing and decoding (engine.esl)", ("engine/esl/", "_speedups")),
    ("channel data -> CallRequest", ("engine/call/channel.py",)),
    ("rules", ("engine/rules/", "engine/decider.py")),
    (
        "limits client (redis-py, the script's arguments)",
        ("engine/state/", "redis/", "engine/limits_runtime"),
    ),
    ("rendering", ("engine/call/render.py",)),
    ("metrics and decision log", ("engine/metrics.py", "prometheus_client", "logging/", "engine/logs.py")),
    ("call session and driver", ("engine/call/", "engine/shedding.py", "engine/billing/")),
    ("switch model (harness)", ("loadtest/",)),
    ("gevent, sockets, the rest", ("",)),
)


def by_part(stats: pstats.Stats, calls: int) -> dict[str, float]:
    """Microseconds per call of each part (cProfile's tottime; the profiler's own overhead
    inflates small Python functions, so read these as shares)."""
    totals = dict.fromkeys((name for name, _ in PARTS), 0.0)

    def part(key: tuple[str, int, str]) -> str:
        where = f"{key[0]}:{key[2]}"
        return next(name for name, needles in PARTS if any(needle in where for needle in needles))

    for key, row in stats.stats.items():  # type: ignore[attr-defined]
        if key[0] == "~" and row[4]:  # a built-in: its time belongs to whoever called it
            for caller, from_caller in row[4].items():
                totals[part(caller)] += from_caller[2]
        else:
            totals[part(key)] += row[2]
    return {name: round(seconds / calls * 1e6, 1) for name, seconds in totals.items()}


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m loadtest.inprocess", description=description)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--mix", default="accept", help="'default', 'accept' or class=weight,...")
    parser.add_argument("--no-limits", action="store_true", help="dataset without any limit")
    parser.add_argument("--accounts", type=int, default=SMALL.accounts)
    parser.add_argument("--rates", type=int, default=SMALL.rates)
    parser.add_argument("--groups", type=int, default=SMALL.groups)
    parser.add_argument("--profile", action="store_true", help="cProfile the calls")
    parser.add_argument("--concurrent", type=int, default=1, help="calls placed at a time (greenlets)")
    parser.add_argument(
        "--patches",
        default="",
        help="comma-separated loadtest.patched_engine patches to apply first (e.g. timing, "
        "with $CALLGATE_TIMING_OUT; or a proposal being measured)",
    )
    args = parser.parse_args(argv)
    from loadtest.driver import _parse_mix

    if args.patches:
        from loadtest.patched_engine import apply

        apply([p for p in args.patches.split(",") if p])
    scale = replace(
        SMALL, limits=not args.no_limits, accounts=args.accounts, rates=args.rates, groups=args.groups
    )
    kinds = _parse_mix(args.mix)
    result = run(
        args.calls,
        redis_url=args.redis,
        scale=scale,
        kinds=kinds,
        profile=args.profile,
        concurrent=args.concurrent,
    )
    profile = result.pop("profile", "")
    for key, value in result.items():
        print(f"{key}: {value}")
    if profile:
        print(profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
