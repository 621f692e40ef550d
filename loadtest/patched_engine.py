"""The engine with experimental changes applied in memory: to measure a proposal before it is made.

    python -m loadtest.patched_engine --patches lazy-events,lazy-channel-data

runs ``callgate serve`` (same configuration through ``CALLGATE_*``) after monkey-patching
the engine with the named changes. Nothing in ``engine/`` is modified; each patch here is
the smallest faithful version of a change recommended in README.md (Performance), so that the
load harness can measure its effect with ``ServerSpec(kind="callgate-patched")``:

``timing``
    no behaviour change: records per-call phase durations (channel data read, parse,
    decide + limits, render + write) and writes them as JSON to ``$CALLGATE_TIMING_OUT``
    at exit.
``yappi``
    no behaviour change: profiles CPU time per function with yappi, greenlet-aware (py-spy
    attributes much of a gevent process's time to ``Hub.run``, having read the stack of the
    wrong greenlet), and writes the top functions to ``$CALLGATE_YAPPI_OUT`` at exit.
``gc-log``
    no behaviour change: records the duration of every cyclic-GC collection by generation
    and writes a summary to ``$CALLGATE_GC_OUT`` at exit.
``lazy-events``
    ``CallHandler._handle_frame`` reads the few headers it uses straight from the raw
    event body: ``Application`` of CHANNEL_EXECUTE_COMPLETE (and, for ``bridge`` only,
    ``Answer-State`` and ``variable_originate_disposition``), ``Hangup-Cause`` of
    CHANNEL_HANGUP_COMPLETE. Today every EXECUTE_COMPLETE (one per ``set``) and the
    HANGUP_COMPLETE are fully URL-decoded (~100-150 us each) and mostly thrown away.
``lazy-channel-data``
    ``Frame.channel_data()`` returns a mapping that decodes a value when it is read
    (``call_request`` reads ~10 of the 165 headers) instead of decoding all of them.
``multiset``
    the variables of a decision travel in one ``multiset`` (with a delimiter absent from
    every value) instead of one ``set`` per variable: one reply and one EXECUTE /
    EXECUTE_COMPLETE pair instead of nine of each. Needs checking on a real FreeSWITCH.
``nixevent``
    after ``myevents``, ``nixevent`` the channel events the engine never reads (everything
    but CHANNEL_EXECUTE_COMPLETE and CHANNEL_HANGUP_COMPLETE), so FreeSWITCH neither
    serializes nor sends them. Needs ``full`` (which the dialplan already uses for
    ``linger``) and checking on a real FreeSWITCH.
``batch-release``
    now part of the engine (``engine.limits_runtime.ReleaseBatcher``: the releases at
    hangup go in one pipelined round trip every 2 ms or 256 calls); kept as a no-op so the
    existing patch sets still run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

PATCHES = (
    "timing",
    "yappi",
    "gc-log",
    "lazy-events",
    "lazy-channel-data",
    "multiset",
    "nixevent",
    "batch-release",
)

# Events myevents subscribes to that the engine never reads (see engine.authorize.EVENTS_FOLLOWED).
UNREAD_EVENTS = (
    "CHANNEL_ANSWER CHANNEL_APPLICATION CHANNEL_BRIDGE CHANNEL_CREATE CHANNEL_DATA CHANNEL_DESTROY "
    "CHANNEL_EXECUTE CHANNEL_HANGUP CHANNEL_ORIGINATE CHANNEL_UUID CHANNEL_OUTGOING CHANNEL_PARK "
    "CHANNEL_PROGRESS CHANNEL_PROGRESS_MEDIA CHANNEL_STATE CHANNEL_UNBRIDGE CHANNEL_UNPARK "
    "DETECTED_SPEECH DTMF"
)


def _peek(body: bytes, name: bytes) -> str | None:
    """The decoded value of header ``name`` in a serialized event, without parsing the rest."""
    from engine.esl.protocol import decode_value

    key = b"\n" + name + b": "
    at = body.find(key)
    if at < 0:
        return None
    start = at + len(key)
    end = body.find(b"\n", start)
    return decode_value(body[start : end if end >= 0 else len(body)].decode("utf-8", "replace").rstrip("\r"))


def patch_lazy_events() -> None:
    from engine import authorize

    original = authorize.CallHandler._handle_frame

    def _handle_frame(self, conn, record, frame) -> bool:
        if frame.headers.get("Content-Type") == "text/event-plain":
            body = frame.body
            if body.startswith(b"Event-Name: CHANNEL_HANGUP_COMPLETE\n"):
                record.hangup_cause = _peek(body, b"Hangup-Cause") or ""
                return True
            if body.startswith(b"Event-Name: CHANNEL_EXECUTE_COMPLETE\n"):
                if _peek(body, b"Application") != "bridge":
                    return False
                event = {
                    "Event-Name": "CHANNEL_EXECUTE_COMPLETE",
                    "Application": "bridge",
                    "Answer-State": _peek(body, b"Answer-State") or "",
                    "variable_originate_disposition": _peek(body, b"variable_originate_disposition") or "",
                }
                return self._handle_event(conn, record, event)
            if body.startswith(b"Event-Name: "):
                return False
        return original(self, conn, record, frame)

    authorize.CallHandler._handle_frame = _handle_frame


class _LazyDecoded(Mapping):
    __slots__ = ("_raw",)

    def __init__(self, raw: Mapping[str, str]) -> None:
        self._raw = raw

    def __getitem__(self, name: str) -> str:
        from engine.esl.protocol import decode_value

        return decode_value(self._raw[name])

    def get(self, name: str, default: Any = None) -> Any:  # the hot path: no exception
        raw = self._raw.get(name)
        if raw is None:
            return default
        from engine.esl.protocol import decode_value

        return decode_value(raw)

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def patch_lazy_channel_data() -> None:
    from engine.esl import protocol

    protocol.Frame.channel_data = lambda self: _LazyDecoded(self.headers)


def patch_multiset() -> None:
    from engine.esl import commands, protocol

    def _multiset(variables) -> list[bytes]:
        pairs = [f"{name}={value}" for name, value in variables]
        if not pairs:
            return []
        text = "".join(pairs)
        delimiter = next(c for c in "|~^!;#%&*@" if c not in text)
        return [protocol.sendmsg_execute("multiset", f"^^{delimiter}" + delimiter.join(pairs))]

    def bridge_batch(variables, dial_string):
        cmds = [*commands._preamble(), *_multiset(variables), protocol.sendmsg_execute("bridge", dial_string)]
        return commands._batch(cmds)

    def respond_batch(variables, code, text):
        cmds = [
            *commands._preamble(),
            *_multiset(variables),
            protocol.sendmsg_execute("respond", f"{code} {text}"),
        ]
        return commands._batch(cmds)

    commands.bridge_batch = bridge_batch
    commands.respond_batch = respond_batch
    from engine import authorize

    authorize.bridge_batch = bridge_batch
    authorize.respond_batch = respond_batch


def patch_nixevent() -> None:
    from engine.esl import commands, protocol

    original = commands._preamble

    def _preamble() -> list[bytes]:
        return [*original(), protocol.command(f"nixevent {UNREAD_EVENTS}")]

    commands._preamble = _preamble


class _Timing:
    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float, float]] = []


def patch_timing() -> None:
    from engine import authorize
    from engine.esl import connection

    timing = _Timing()
    clock = time.perf_counter
    original_send = connection.EslConnection.send
    original_read = connection.EslConnection.read_frame
    original_request = authorize.call_request
    original_decide = authorize.CallHandler._decide_within_deadline

    def send(self, data: bytes) -> None:
        stamps = self.__dict__.setdefault("_t", [])
        if not stamps:
            stamps.append(clock())  # connect sent
        original_send(self, data)
        if len(stamps) == 4:
            stamps.append(clock())  # decision written
            t0, t_reply, t_parsed, t_decided, t_sent = stamps
            timing.rows.append((t_reply - t0, t_parsed - t_reply, t_decided - t_parsed, t_sent - t_decided))

    def read_frame(self, timeout: float):
        frame = original_read(self, timeout)
        stamps = self.__dict__.get("_t")
        if stamps is not None and len(stamps) == 1:
            stamps.append(clock())  # channel data read
            authorize._current_conn = self
        return frame

    def call_request(headers):
        request = original_request(headers)
        conn = getattr(authorize, "_current_conn", None)
        if conn is not None and len(conn.__dict__.get("_t", ())) == 2:
            conn._t.append(clock())
        return request

    def decide(self, record) -> None:
        conn = getattr(authorize, "_current_conn", None)
        original_decide(self, record)
        if conn is not None and len(conn.__dict__.get("_t", ())) == 3:
            conn._t.append(clock())

    from engine.state import limits

    original_acquire = limits.Limiter.acquire
    acquires: list[float] = []

    def acquire(self, *args, **kwargs):
        started = clock()
        try:
            return original_acquire(self, *args, **kwargs)
        finally:
            acquires.append(clock() - started)

    limits.Limiter.acquire = acquire
    connection.EslConnection.send = send
    connection.EslConnection.read_frame = read_frame
    authorize.call_request = call_request
    authorize.CallHandler._decide_within_deadline = decide

    def dump() -> None:
        path = os.environ.get("CALLGATE_TIMING_OUT")
        if not path:
            return
        names = ("channel_data_wait", "parse", "decide_and_limits", "render_and_write")
        from loadtest.stats import summarize

        out = {name: summarize(row[i] for row in timing.rows) for i, name in enumerate(names)}
        out["limits_acquire"] = summarize(acquires)
        with open(path, "w") as handle:
            json.dump(out, handle, indent=2)

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


def patch_batch_release() -> None:
    """Nothing to patch: the engine batches its releases itself (limits_runtime.ReleaseBatcher)."""


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


_APPLY = {
    "gc-log": patch_gc_log,
    "batch-release": patch_batch_release,
    "timing": patch_timing,
    "yappi": patch_yappi,
    "lazy-events": patch_lazy_events,
    "lazy-channel-data": patch_lazy_channel_data,
    "multiset": patch_multiset,
    "nixevent": patch_nixevent,
}


def apply(names: list[str]) -> None:
    for name in names:
        if name not in _APPLY:
            raise SystemExit(f"unknown patch {name!r}; known: {', '.join(PATCHES)}")
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
