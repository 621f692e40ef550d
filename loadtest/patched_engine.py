"""The engine with experimental changes applied in memory: to measure a proposal before it is made.

    python -m loadtest.patched_engine --patches timing

runs ``callgate serve`` (same configuration through ``CALLGATE_*``) after monkey-patching
the engine with the named patches. Nothing in ``engine/`` is modified. The load harness
runs it as ``ServerSpec(kind="callgate-patched")``: ``python -m loadtest.run --patched NAMES``
adds a "callgate+P" server, and the ``phases`` scenario runs the engine with ``timing``.

The proposals measured here earlier were adopted and now live in the engine:

* ``lazy-events``: ``engine/call/session.py`` reads an event's few headers one by one
  (``Frame.event_header``).
* ``lazy-channel-data``: ``engine/call/channel.py`` decodes only the CHANNEL_DATA headers it uses.
* ``multiset``: ``engine/call/render.py`` sets a decision's variables with one ``multiset``.
* ``nixevent``: ``engine/call/render.py`` sends ``nixevent`` for the events the engine never reads.
* ``batch-release``: ``engine.limits_runtime.ReleaseBatcher`` releases slots in pipelined batches.

What remains are the instrumentation patches below, the baseline of a lever the engine
adopted (``alone``: the engine without it, for ``--scenario ab``), the limits of a port not
made (``ceiling``, ``ceiling-no-redis``: what the engine would reach with parts of its work
free), plus whatever proposal is being measured: add it as a ``patch_<name>`` function, an
entry in ``PATCHES`` and ``_APPLY`` and a paragraph here, and remove it once the engine adopts
it.

``timing``
    no behaviour change: records per-call phase durations (channel data read, parse,
    decide + limits, render + write) and writes them as JSON to ``$CALLGATE_TIMING_OUT``
    at exit: a summary per phase (milliseconds) and every sample (``timing_document``).
``yappi``
    no behaviour change: profiles CPU time per function with yappi, greenlet-aware (py-spy
    attributes much of a gevent process's time to ``Hub.run``, having read the stack of the
    wrong greenlet), and writes the top functions to ``$CALLGATE_YAPPI_OUT`` at exit.
``gc-log``
    no behaviour change: records the duration of every cyclic-GC collection by generation
    and writes a summary to ``$CALLGATE_GC_OUT`` at exit.
``hub-lag``
    no behaviour change but one more greenlet: a greenlet asks to wake every millisecond and
    records each wake-up later than 2 ms (wall time, lateness, and the share of the wait the
    engine's own thread was on the CPU), and every cyclic-GC collection (wall and CPU time);
    writes them to ``$CALLGATE_LAG_OUT`` at exit, with a histogram of the lateness and how
    many late wake-ups a collection explains. This tells the engine's own pauses (a
    collection, a long callback: the thread was on the CPU the whole wait) from CPU shared
    with other processes (the thread was waiting for a CPU). Each collection also records
    how many unreachable objects it freed (the cyclic garbage the calls leave), and every
    ``CENSUS_INTERVAL`` seconds the patch counts the objects in each generation and the frozen
    ones (``gc.get_objects``: a few milliseconds with 10,000 calls up, itself a late wake-up).
``slow-runs``
    no behaviour change but a greenlet switch tracer (a few microseconds per switch): every
    time a greenlet (the hub included) uses more than ``SLOW_RUN`` seconds of CPU before
    it switches away, records the wall time, how long it ran (wall and the thread's CPU), what
    it is (its run function), the garbage collections that ran inside it, and the innermost
    frames of the stack where it switched away; writes the summary by kind and the longest
    runs to ``$CALLGATE_SLOW_OUT`` at exit. A late wake-up (``hub-lag``) says the hub was held;
    this says by what. It also counts every switch into each kind of greenlet
    (``switches_into``) and, for the calls' greenlets, where in the engine's code each one
    waited (``call_waits``, the innermost frame under ``engine/``): divided by the calls of the
    run, how many times a call waits, and for what.
``acquire-census``
    no behaviour change: for every per-call acquire (``DirectConnections.execute_gathered``),
    notes the event loop's iteration and how many other acquires were waiting for their reply.
    Writes to ``$CALLGATE_CENSUS_OUT`` at exit (``{pid}`` in the path: one file per server
    process) how many acquires began in the same loop iteration, i.e. the size of the pipelines
    gathering sends (round 9 measured it before gathering was built, with ``alone``'s behaviour),
    and how many were waiting when one began.
``alone``
    the engine as before gathering: each call's acquire makes a round trip of its own
    (``DirectConnections.execute`` in place of ``execute_gathered``). The baseline that
    measures gathering in the same run.
``ceiling``
    not the engine: its limit. After one real accepted call, every call gets that call's
    decision, each piece of the engine's *pure* work replaced by a copy with the call's uuid
    put in: the rules and the limits plan (the acquire's keys and arguments are the first
    call's), the rendered batch (same bytes, same length; its ticket signed for the first
    call), the ticket the session keeps, the rating at hangup and the CDR (the first call's
    settlement, its JSON serialized once). What is left is real: the conversation
    (``CallSession`` and the driver), the framer and the header pickers, the limits round trip
    (gathered, its reply read and ignored), the release and settle batches through Redis, the
    metrics. So callgate+ceiling is what a compiled decision path that did the rules,
    pricing, render and rating in no time at all would reach: the most a port of that work
    can give (issue 18, round 10).
``ceiling-no-redis``
    ``ceiling`` without Redis: the copied calls make no limits round trip and queue no
    release and no settlement. What is left is the conversation with FreeSWITCH alone (the
    session, the driver, the framer, the pickers, the metrics): how far the engine's own
    handling of a call is from the floor's, before its state costs anything.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

PATCHES = (
    "timing",
    "yappi",
    "gc-log",
    "hub-lag",
    "slow-runs",
    "acquire-census",
    "alone",
    "ceiling",
    "ceiling-no-redis",
)

# Patches that were adopted into the engine, and where they live: asking for one is an error.
ADOPTED = {
    "lazy-events": "engine/call/session.py",
    "lazy-channel-data": "engine/call/channel.py",
    "multiset": "engine/call/render.py",
    "nixevent": "engine/call/render.py",
    "batch-release": "engine.limits_runtime.ReleaseBatcher",
}

TIMING_PHASES = ("channel_data_wait", "parse", "decide_and_limits", "render_and_write")
SLOW_RUN = 0.002  # slow-runs: a greenlet holding the CPU longer than this is recorded
CALL_GREENLET = "_handle_and_close_when_done"  # slow-runs: a call's greenlet (gevent's server)
CENSUS_INTERVAL = 10.0  # hub-lag: seconds between counts of the objects in each GC generation


def timing_document(rows: Sequence[Sequence[float]], acquires: Sequence[Sequence[float]]) -> dict[str, Any]:
    """What the ``timing`` patch writes. ``rows``: per call, the wall-clock time (``time.time()``)
    its decision was written, then the seconds of each of ``TIMING_PHASES``; ``acquires``: per
    ``Limiter.acquire``, its wall-clock end and seconds. The summaries (milliseconds, as
    :func:`loadtest.stats.summarize`) sit under each phase's name; the samples under
    ``samples`` (see ``loadtest.run.phase_summary``)."""
    from loadtest.stats import summarize

    out: dict[str, Any] = {
        name: summarize(row[i] for row in rows) for i, name in enumerate(TIMING_PHASES, start=1)
    }
    out["limits_acquire"] = summarize(seconds for _wall, seconds in acquires)
    out["samples"] = {
        "columns": ["wall", *TIMING_PHASES],
        "rows": [[round(row[0], 4), *(round(v, 7) for v in row[1:])] for row in rows],
        "limits_acquire": [[round(wall, 4), round(seconds, 7)] for wall, seconds in acquires],
    }
    return out


def patch_timing() -> None:
    from engine.call import driver as authorize
    from engine.call import session as call_session
    from engine.call.channel import call_request  # what the session module calls
    from engine.esl import connection

    rows: list[tuple[float, float, float, float, float]] = []
    clock = time.perf_counter
    wall = time.time
    original_send = connection.EslConnection.send
    original_read = connection.EslConnection.read_frame
    original_request = call_request
    current_conn: connection.EslConnection | None = None  # whose channel data was read last
    original_decide = authorize.CallHandler._decide_within_deadline

    def send(self, data: bytes) -> None:
        stamps = self.__dict__.setdefault("_t", [])
        if not stamps:
            stamps.append(clock())  # connect sent
        original_send(self, data)
        if len(stamps) == 4:
            stamps.append(clock())  # decision written
            t0, t_reply, t_parsed, t_decided, t_sent = stamps
            rows.append((wall(), t_reply - t0, t_parsed - t_reply, t_decided - t_parsed, t_sent - t_decided))

    def read_frame(self, timeout: float | None):
        nonlocal current_conn
        frame = original_read(self, timeout)
        stamps = self.__dict__.get("_t")
        if stamps is not None and len(stamps) == 1:
            stamps.append(clock())  # channel data read
            current_conn = self
        return frame

    def timed_call_request(headers):
        request = original_request(headers)
        conn = current_conn
        if conn is not None and len(conn.__dict__.get("_t", ())) == 2:
            conn.__dict__["_t"].append(clock())
        return request

    def decide(self, request):
        conn = current_conn
        outcome = original_decide(self, request)
        if conn is not None and len(conn.__dict__.get("_t", ())) == 3:
            conn.__dict__["_t"].append(clock())
        return outcome

    from engine.state import limits

    original_acquire = limits.Limiter.acquire
    acquires: list[tuple[float, float]] = []

    def acquire(self, *args, **kwargs):
        started = clock()
        try:
            return original_acquire(self, *args, **kwargs)
        finally:
            acquires.append((wall(), clock() - started))

    # A patch replaces the engine's methods in place: mypy's method-assign says just that.
    limits.Limiter.acquire = acquire  # type: ignore[method-assign]
    connection.EslConnection.send = send  # type: ignore[method-assign]
    connection.EslConnection.read_frame = read_frame  # type: ignore[method-assign]
    call_session.call_request = timed_call_request  # type: ignore[attr-defined]
    authorize.CallHandler._decide_within_deadline = decide  # type: ignore[method-assign]

    def dump() -> None:
        path = os.environ.get("CALLGATE_TIMING_OUT")
        if not path:
            return
        with open(path, "w") as handle:
            json.dump(timing_document(rows, acquires), handle)

    atexit.register(dump)


def patch_yappi() -> None:
    import yappi

    yappi.set_clock_type("cpu")
    yappi.set_context_backend("greenlet")
    yappi.start(builtins=True)

    def dump() -> None:
        yappi.stop()
        path = os.environ.get("CALLGATE_YAPPI_OUT")
        if not path:
            return
        stats = yappi.get_func_stats()
        rows = []
        for stat in stats:
            module = stat.module.split("/site-packages/")[-1].split("/work/main/")[-1]
            rows.append((stat.tsub, stat.ttot, stat.ncall, f"{stat.name} ({module}:{stat.lineno})"))
        total = sum(r[0] for r in rows) or 1.0
        with open(path, "w") as handle:
            handle.write(f"total CPU {total:.3f}s (yappi, cpu clock)\n\nself%   incl%   calls  function\n")
            for tsub, ttot, ncall, name in sorted(rows, reverse=True)[:60]:
                handle.write(f"{100 * tsub / total:5.1f}  {100 * ttot / total:6.1f}  {ncall:7d}  {name}\n")
            handle.write("\nby inclusive time\n")
            for tsub, ttot, ncall, name in sorted(rows, key=lambda r: -r[1])[:60]:
                handle.write(f"{100 * tsub / total:5.1f}  {100 * ttot / total:6.1f}  {ncall:7d}  {name}\n")

    atexit.register(dump)


def patch_gc_log() -> None:
    import gc

    started: dict[str, float] = {}
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            pauses[info["generation"]].append(time.perf_counter() - started.pop("t"))

    gc.callbacks.append(callback)

    def dump() -> None:
        path = os.environ.get("CALLGATE_GC_OUT")
        if not path:
            return
        from loadtest.stats import summarize

        out = {f"gen{g}": summarize(values) for g, values in pauses.items()}
        out["counts"] = {f"gen{g}": len(values) for g, values in pauses.items()}
        with open(path, "w") as handle:
            json.dump(out, handle, indent=2)

    atexit.register(dump)


def lag_document(
    late: Sequence[tuple[float, float, float]],
    collections: Sequence[tuple[float, int, float, float, int]],
    census: Sequence[Sequence[float]] = (),
) -> dict[str, Any]:
    """What the ``hub-lag`` patch writes. ``late``: per late wake-up, its wall time, how late it
    was, and the share of that wait the process's own thread spent on the CPU (near 1: the hub
    was busy running the engine's own work; near 0: the process was waiting for a CPU other
    processes held). ``collections``: per cyclic-GC collection, its wall time at the end, its
    generation, its wall seconds, its CPU seconds and the unreachable objects it found.
    ``census``: rows of wall time, objects in generations 0, 1, 2 and frozen. A late wake-up
    is explained by a collection that ended inside its lateness window."""
    from loadtest.stats import summarize

    edges = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

    def explained(woke: float, lag: float) -> bool:
        return any(woke - lag - 0.001 <= end <= woke for end, *_rest in collections)

    buckets: dict[str, Any] = {}
    for edge in edges:
        inside = [(w, lag, share) for w, lag, share in late if lag > edge]
        shares = sorted(share for _w, _l, share in inside)
        buckets[f">{int(edge * 1000)}ms"] = {
            "count": len(inside),
            "explained_by_gc": sum(explained(w, lag) for w, lag, _s in inside),
            "median_own_cpu_share": round(shares[len(shares) // 2], 3) if shares else None,
        }
    return {
        "late_wakeups": buckets,
        "collections": {
            f"gen{g}": {
                "count": sum(1 for _e, gen, *_rest in collections if gen == g),
                "max_wall_ms": round(
                    max((w for _e, gen, w, *_rest in collections if gen == g), default=0.0) * 1000, 3
                ),
                "max_cpu_ms": round(
                    max((c for _e, gen, _w, c, _n in collections if gen == g), default=0.0) * 1000, 3
                ),
                "cpu_ms": summarize(c for _e, gen, _w, c, _n in collections if gen == g),
                "total_cpu_ms": round(sum(c for _e, gen, _w, c, _n in collections if gen == g) * 1000, 3),
                "unreachable": sum(n for _e, gen, _w, _c, n in collections if gen == g),
            }
            for g in (0, 1, 2)
        },
        # Every middle and full collection, and the young ones over 2 ms of CPU (the others,
        # hundreds a minute, only summarized above): end time, generation, wall ms, CPU ms,
        # unreachable objects found.
        "collection_rows": [
            [round(e, 4), g, round(w * 1000, 3), round(c * 1000, 3), n]
            for e, g, w, c, n in collections
            if g or c > 0.002
        ],
        "census": {"columns": ["wall", "gen0", "gen1", "gen2", "frozen"], "rows": [list(r) for r in census]},
        "worst": [
            [round(w, 4), round(lag * 1000, 3), round(share, 3)]
            for w, lag, share in sorted(late, key=lambda x: -x[1])[:30]
        ],
        "samples": [[round(w, 4), round(lag * 1000, 3), round(share, 3)] for w, lag, share in late],
    }


def patch_hub_lag() -> None:
    import gc

    import gevent

    late: list[tuple[float, float, float]] = []
    collections: list[tuple[float, int, float, float, int]] = []
    started: dict[str, float] = {}

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"], started["cpu"] = time.perf_counter(), time.thread_time()
        elif "t" in started:
            wall = time.perf_counter() - started.pop("t")
            cpu = time.thread_time() - started.pop("cpu")
            collections.append((time.time(), info["generation"], wall, cpu, info.get("collected", 0)))

    gc.callbacks.append(callback)
    census: list[list[float]] = []

    def count_objects() -> None:
        while True:
            gevent.sleep(CENSUS_INTERVAL)
            sizes = [len(gc.get_objects(generation)) for generation in (0, 1, 2)]
            census.append([round(time.time(), 3), *sizes, gc.get_freeze_count()])

    gevent.spawn(count_objects)

    def watch() -> None:
        interval = 0.001
        while True:
            began, cpu = time.perf_counter(), time.thread_time()
            gevent.sleep(interval)
            now = time.perf_counter()
            lateness = now - began - interval
            if lateness > 0.002:
                share = (time.thread_time() - cpu) / max(1e-9, now - began)
                late.append((time.time(), lateness, min(1.0, share)))

    gevent.spawn(watch)

    def dump() -> None:
        path = os.environ.get("CALLGATE_LAG_OUT")
        if path:
            with open(path, "w") as handle:
                json.dump(lag_document(late, collections, census), handle)

    atexit.register(dump)


def _greenlet_kind(glet: Any) -> str:
    """What a greenlet is, for the ``slow-runs`` table: the hub, or its run function's name."""
    run = getattr(glet, "_run", None) or getattr(glet, "run", None)
    if type(glet).__name__ == "Hub":
        return "Hub"
    target = getattr(run, "__func__", run)
    name = getattr(target, "__qualname__", None) or type(glet).__name__
    return f"{getattr(target, '__module__', '?')}.{name}"


def slow_runs_document(runs: Sequence[tuple[float, float, float, str, int, str]]) -> dict[str, Any]:
    """What the ``slow-runs`` patch writes: per kind of greenlet, how many runs used more CPU
    than ``SLOW_RUN``, their total and largest CPU milliseconds, and how many had a collection
    in them; then the 60 largest runs with the stack where each switched away."""
    kinds: dict[str, dict[str, Any]] = {}
    for _wall, _ms, _cpu, kind, gcs, _stack in runs:
        row = kinds.setdefault(kind, {"count": 0, "total_cpu_ms": 0.0, "max_cpu_ms": 0.0, "with_gc": 0})
        row["count"] += 1
        row["total_cpu_ms"] = round(row["total_cpu_ms"] + _cpu, 3)
        row["max_cpu_ms"] = max(row["max_cpu_ms"], round(_cpu, 3))
        row["with_gc"] += bool(gcs)
    longest = sorted(runs, key=lambda r: -r[2])[:60]
    return {
        "threshold_ms": SLOW_RUN * 1000,
        "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["total_cpu_ms"])),
        "longest": [
            {
                "wall": round(w, 4),
                "ms": round(ms, 3),
                "cpu_ms": round(cpu, 3),
                "kind": kind,
                "gcs": gcs,
                "stack": stack,
            }
            for w, ms, cpu, kind, gcs, stack in longest
        ],
    }


def patch_slow_runs() -> None:
    import gc

    import greenlet

    runs: list[tuple[float, float, float, str, int, str]] = []
    state = {"since": time.perf_counter(), "cpu": time.thread_time(), "gcs": 0}

    def on_gc(phase: str, _info: dict[str, int]) -> None:
        if phase == "stop":
            state["gcs"] += 1

    # The trace function runs once the switch is made, on the target's stack: the origin's
    # own stack is its suspended frame (gr_frame).
    def stack(origin: Any) -> str:
        frame = getattr(origin, "gr_frame", None)
        names: list[str] = []
        while frame is not None and len(names) < 10:
            code = frame.f_code
            names.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno}:{code.co_name}")
            frame = frame.f_back
        return " < ".join(names)

    into: Counter[str] = Counter()
    waits: Counter[str] = Counter()

    def engine_frame(origin: Any) -> str:
        """Where in the engine's own code the switching greenlet waits (its innermost frame
        under engine/), or "-"."""
        marker = f"{os.sep}engine{os.sep}"
        frame = getattr(origin, "gr_frame", None)
        while frame is not None:
            name = frame.f_code.co_filename
            if marker in name:
                return f"{name.rsplit(marker, 1)[1]}:{frame.f_lineno}:{frame.f_code.co_name}"
            frame = frame.f_back
        return "-"

    def trace(event: str, args: Any) -> None:
        if event not in ("switch", "throw"):
            return
        origin, target = args
        into[_greenlet_kind(target)] += 1
        kind = _greenlet_kind(origin)
        if kind.endswith(CALL_GREENLET):
            waits[engine_frame(origin)] += 1
        # CPU time, not wall: the hub's wall time includes its wait in epoll (idle, not a pause).
        cpu = time.thread_time() - state["cpu"]
        if cpu > SLOW_RUN:
            ran = time.perf_counter() - state["since"]
            runs.append((time.time(), ran * 1000, cpu * 1000, kind, int(state["gcs"]), stack(origin)))
        state["since"], state["cpu"], state["gcs"] = time.perf_counter(), time.thread_time(), 0

    gc.callbacks.append(on_gc)
    greenlet.settrace(trace)

    def dump() -> None:
        path = os.environ.get("CALLGATE_SLOW_OUT")
        if path:
            with open(path, "w") as handle:
                document = slow_runs_document(runs)
                document["switches_into"] = dict(into.most_common())
                document["call_waits"] = dict(waits.most_common(30))
                json.dump(document, handle)

    atexit.register(dump)


def census_document(iterations: Sequence[int], in_flight: Sequence[int]) -> dict[str, Any]:
    """What the ``acquire-census`` patch writes. ``iterations``: the loop iteration each round
    trip began in; ``in_flight``: how many others were waiting for their reply at that moment."""
    sizes = Counter(Counter(iterations).values())
    trips = len(iterations)
    return {
        "round_trips": trips,
        "loop_iterations": sum(sizes.values()),
        "per_iteration": {str(size): count for size, count in sorted(sizes.items())},
        "mean_per_iteration": trips / max(1, sum(sizes.values())),
        "share_alone_in_iteration": sizes.get(1, 0) / max(1, trips),
        "in_flight_when_sent": {str(n): c for n, c in sorted(Counter(in_flight).items())},
    }


def patch_acquire_census() -> None:
    import gevent

    from engine.state.direct import DirectConnections

    loop = gevent.get_hub().loop
    iterations: list[int] = []
    in_flight: list[int] = []
    waiting = [0]
    execute = DirectConnections.execute_gathered

    def counted(self: DirectConnections, args: Sequence[Any], *, retry_once: bool = False) -> Any:
        iterations.append(loop.iteration)
        in_flight.append(waiting[0])
        waiting[0] += 1
        try:
            return execute(self, args, retry_once=retry_once)
        finally:
            waiting[0] -= 1

    DirectConnections.execute_gathered = counted  # type: ignore[method-assign]

    def dump() -> None:
        path = os.environ.get("CALLGATE_CENSUS_OUT")
        if path:  # one file per server process: "{pid}" in the path is replaced by its pid
            with open(path.format(pid=os.getpid()), "w") as handle:
                json.dump(census_document(iterations, in_flight), handle)

    atexit.register(dump)


def patch_alone() -> None:
    from engine.state.direct import DirectConnections

    def alone(self: DirectConnections, args: Sequence[Any], *, retry_once: bool = False) -> Any:
        return self.execute(args, retry_once=retry_once)

    DirectConnections.execute_gathered = alone  # type: ignore[method-assign]


CEILING: Any = None  # the applied ceiling's _Template (tests read its counts)


class _Template:
    """ceiling: the first accepted call's pure results, with the places its uuid appears."""

    def __init__(self) -> None:
        self.uuid = ""  # the template call's uuid; "" until one accepted call was captured
        self.limiter: Any = None
        self.decision: Any = None
        self.commands: dict[str, tuple[list[str], list[Any]]] = {}  # uuid -> acquire keys, args
        self.keys: list[str] = []
        self.args: list[Any] = []
        self.uuid_keys: list[int] = []  # indexes of the keys and arguments naming the uuid
        self.uuid_args: list[int] = []
        self.batch: bytes = b""
        self.replies = 0
        self.ticket: Any = None
        self.settlement: Any = None
        self.cdr = ""
        self.copied = 0  # calls answered with the copy
        self.acquires = 0  # limits round trips the copies made

    @property
    def ready(self) -> bool:
        return self.settlement is not None


def patch_ceiling_no_redis() -> None:
    patch_ceiling(with_redis=False)


def _swap(owner: Any, name: str, replacement: Any) -> Any:
    """Put ``replacement`` in ``owner.name`` (a class's method, a module's function); the old one."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    return original


def patch_ceiling(with_redis: bool = True) -> None:
    import dataclasses

    from engine.billing import funds as funds_module
    from engine.billing.settler import Settler
    from engine.call import session as session_module
    from engine.call.driver import CallHandler
    from engine.decision import Accept
    from engine.esl.commands import Batch
    from engine.runtime import Engine
    from engine.state.limits import redis as limits_redis

    global CEILING
    template = CEILING = _Template()
    real: dict[str, Any] = {}  # the replaced functions, filled below

    def copied(decision: Any) -> bool:
        """Whether the call session's ``decision`` is the copy's (its ticket, else itself)."""
        return template.ready and decision is (template.ticket or template.decision)

    def acquire_command(self: Any, call_uuid: str, plan: Any, hold: int, funds: Any = None) -> Any:
        command = real["acquire_command"](self, call_uuid, plan, hold, funds)
        template.limiter = self
        if not template.uuid and command is not None and len(template.commands) < 64:
            template.commands[call_uuid] = (command[0], command[1])
        return command

    def capture(request: Any, decision: Any) -> None:
        """The first accepted call whose acquire was seen becomes the template."""
        if template.uuid or not isinstance(decision, Accept) or request.uuid not in template.commands:
            return
        keys, args = template.commands[request.uuid]
        template.uuid, template.decision, template.keys, template.args = request.uuid, decision, keys, args
        template.uuid_keys = [n for n, key in enumerate(keys) if request.uuid in key]
        template.uuid_args = [n for n, a in enumerate(args) if isinstance(a, str) and request.uuid in a]

    def decide(self: CallHandler, request: Any, queued: float = 0.0) -> tuple[Any, bool]:
        if not template.ready:
            decision, holds = real["decide"](self, request, queued)
            capture(request, decision)
            return decision, holds
        template.copied += 1
        uuid = request.uuid
        keys, args = list(template.keys), list(template.args)
        for n in template.uuid_keys:
            keys[n] = keys[n].replace(template.uuid, uuid)
        for n in template.uuid_args:
            args[n] = args[n].replace(template.uuid, uuid)
        if with_redis:
            template.acquires += 1
            limiter = template.limiter
            limits_redis._ACQUIRE_SCRIPT(limiter.client, keys, args, limiter.direct)  # reply ignored
        return template.decision, True

    def accept_batch(decision: Any, key: Any, uuid: str, *, guard_uuid: Any = None) -> Any:
        if template.ready and decision is template.decision:
            return Batch(template.batch.replace(template.uuid.encode(), uuid.encode()), template.replies)
        batch = real["accept_batch"](decision, key, uuid, guard_uuid=guard_uuid)
        if decision is template.decision and not template.batch:
            template.batch, template.replies = batch.payload, batch.replies_expected
        return batch

    def ticket_of(decision: Any) -> Any:
        if template.ready and decision is template.decision:
            return template.ticket
        ticket = real["ticket_of"](decision)
        if decision is template.decision and template.ticket is None:
            template.ticket = ticket
        return ticket

    def put(self: Settler, item: Any) -> bool:
        if not template.ready and template.uuid and item.uuid == template.uuid:
            template.cdr = real["cdr_json"](item.cdr)
            template.settlement = item
        return bool(real["put"](self, item))

    def cdr_json(cdr: Any) -> str:
        return cdr if isinstance(cdr, str) else str(real["cdr_json"](cdr))

    def bill_call(self: Any, record: Any, may_hold_funds: bool) -> None:
        if not copied(record.decision):
            real["bill_call"](self, record, may_hold_funds)
        elif with_redis:
            uuid = record.request.uuid
            cdr = template.cdr.replace(template.uuid, uuid)
            self.settler.put(dataclasses.replace(template.settlement, uuid=uuid, cdr=cdr))

    def release_call(self: Any, record: Any) -> None:
        if with_redis or not copied(record.decision):
            real["release_call"](self, record)

    real["acquire_command"] = _swap(limits_redis.Limiter, "acquire_command", acquire_command)
    real["decide"] = _swap(CallHandler, "decide", decide)
    real["accept_batch"] = _swap(session_module, "accept_batch", accept_batch)
    real["ticket_of"] = _swap(session_module, "ticket_of", ticket_of)
    real["put"] = _swap(Settler, "put", put)
    real["cdr_json"] = _swap(funds_module, "cdr_json", cdr_json)
    real["bill_call"] = _swap(Engine, "_bill_call", bill_call)
    real["release_call"] = _swap(Engine, "_release_call", release_call)


_APPLY = {
    "acquire-census": patch_acquire_census,
    "alone": patch_alone,
    "ceiling": patch_ceiling,
    "ceiling-no-redis": patch_ceiling_no_redis,
    "slow-runs": patch_slow_runs,
    "hub-lag": patch_hub_lag,
    "timing": patch_timing,
    "yappi": patch_yappi,
    "gc-log": patch_gc_log,
}


def check(names: list[str]) -> None:
    """SystemExit naming the first of ``names`` that is not a patch (adopted ones say where they went)."""
    for name in names:
        if name in ADOPTED:
            raise SystemExit(
                f"patch {name!r} was adopted: it is part of the engine now ({ADOPTED[name]}); "
                f"patches: {', '.join(PATCHES)}"
            )
        if name not in _APPLY:
            raise SystemExit(f"unknown patch {name!r}; patches: {', '.join(PATCHES)}")


def apply(names: list[str]) -> None:
    check(names)  # all of them before applying any
    for name in names:
        _APPLY[name]()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.patched_engine", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--patches", default="", help=f"comma-separated: {', '.join(PATCHES)}")
    args = parser.parse_args(argv)
    from gevent import monkey

    monkey.patch_all()
    apply([p for p in args.patches.split(",") if p])
    from engine.config import load_config
    from engine.runtime import serve

    return serve(load_config())  # returns on SIGTERM; atexit then writes the timing dump


if __name__ == "__main__":
    sys.exit(main())
