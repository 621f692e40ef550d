"""Baseline (b): the same fixed decision as the floor server, written with greenswitch.

A minimal application on greenswitch's ``OutboundESLServer`` (v0.0.19), used the way its
README shows: the server sends ``connect`` and hands the session to the application, which
cancels the frozen-engine guard (``api sched_del <uuid>``, as the engine does first), sends
``myevents``, ``nixevent``, the two ``filter`` commands and ``linger``, sets the floor's variables with one
``call_command('multiset', ...)`` (the engine's commands, engine.esl.commands) and bridges
to the floor's ten targets, then waits for
CHANNEL_HANGUP_COMPLETE; greenswitch then sends ``exit`` and closes.

What greenswitch does per call, by design (see the reference notes, section 2.1): three
greenlets per call, one command at a time (each ``send`` waits for its ``+OK``: one round trip per
command instead of one pipelined write), every event read line by line and fully
URL-decoded, and an accept loop that polls a non-blocking ``accept()`` and sleeps 100 ms
whenever nothing is pending (listen backlog 100). ``max_connections`` is raised from
greenswitch's default of 100 so that held calls are served rather than sent away with
``exit`` (greenswitch's fail-open answer when full).

    python -m loadtest.greenswitch_app --port 8091
"""

from __future__ import annotations

import argparse
import logging
import sys

import gevent
import gevent.event

from engine.call.render import EVENT_FILTERS, UNREAD_EVENTS
from engine.esl.commands import multiset_argument
from loadtest.floor import DIAL_STRING, GUARD_UUID, VARIABLES

HANGUP_TIMEOUT = 4 * 3600.0  # as engine.hangup_timeout


class Authorize:
    """The greenswitch application: one instance per call, ``run`` in its own greenlet."""

    def __init__(self, session) -> None:
        self.session = session
        self.finished = gevent.event.Event()

    def _on_hangup_complete(self, _event) -> None:
        self.finished.set()

    def _on_disconnect(self, event) -> None:
        if event.headers.get("Content-Disposition") != "linger":
            self.finished.set()

    def run(self) -> None:
        session = self.session
        session.register_handle("CHANNEL_HANGUP_COMPLETE", self._on_hangup_complete)
        session.register_handle("DISCONNECT", self._on_disconnect)
        try:
            session.send("api sched_del " + (session.uuid or GUARD_UUID))
            session.myevents()
            session.send("nixevent " + " ".join(UNREAD_EVENTS))
            for name, value in EVENT_FILTERS:
                session.send(f"filter {name} {value}")
            session.linger()
            session.call_command("multiset", multiset_argument(VARIABLES))
            session.call_command("bridge", DIAL_STRING)
        except Exception:  # the caller went away meanwhile (greenswitch raises several kinds)
            return
        self.finished.wait(HANGUP_TIMEOUT)


def make_server(host: str, port: int, max_connections: int = 100_000):
    from greenswitch.esl import OutboundESLServer

    return OutboundESLServer(
        bind_address=host, bind_port=port, application=Authorize, max_connections=max_connections
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.greenswitch_app", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--max-connections", type=int, default=100_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = make_server(args.host, args.port, args.max_connections)
    print(f"greenswitch baseline on {args.host}:{args.port}", flush=True)
    server.listen()
    return 0


if __name__ == "__main__":
    sys.exit(main())
