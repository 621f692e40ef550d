"""Inbound event socket (FreeSWITCH's port 8021) of an emulated switch.

A client connects, gets ``Content-Type: auth/request``, sends ``auth <password>``
(``+OK accepted``; ``-ERR invalid`` and the socket is closed), then may use ``api``
(``show channels`` [``as json``|``count``|``as delim X``], ``uuid_kill``,
``uuid_exists``, ``uuid_getvar``, ``hupall``, ``status``, ``version``), ``bgapi``,
``event plain|json ...``, ``nixevent``, ``noevents``, ``filter``,
``myevents <uuid>``, ``sendmsg <uuid>`` and ``exit``.  It sees the calls that
:func:`loadtest.fsemu.outbound.place_call` runs on the same :class:`Switch`.
"""

from __future__ import annotations

import contextlib
import time

import gevent
from gevent import socket as gsocket
from gevent.server import StreamServer

from . import wire
from .outbound import MYEVENTS, EslConnection, Switch, default_switch

__all__ = ["InboundConnection", "InboundServer"]


class InboundConnection(EslConnection):
    """One client of the inbound socket."""

    outbound = False

    def __init__(self, server: InboundServer, sock: gsocket.socket) -> None:
        super().__init__(server.switch, sock)
        self.server = server
        self.full = True

    def run(self) -> None:
        self.switch.add_listener(self)
        reader = gevent.spawn(self._reader)
        try:
            self._send(wire.auth_request())
            auth_deadline = time.monotonic() + self.server.auth_timeout
            while True:
                self._wake.clear()
                while self._cmds and self.running:
                    cmd, _ = self._cmds.popleft()
                    self._handle(cmd)
                if not self.running:
                    self._flush()
                    self._send(wire.disconnect_notice(None))
                    return
                if not self.parser.has_partial():
                    self._flush()
                if self.peer_closed or self.sock is None:
                    return
                timeout = None
                if not self.authed:
                    timeout = auth_deadline - time.monotonic()
                    if timeout <= 0:
                        self._send(wire.disconnect_notice(None))
                        return
                self._wake.wait(timeout)
        finally:
            self.running = False
            self.switch.remove_listener(self)
            reader.kill(block=False)
            self.close_socket()

    def _handle(self, cmd: wire.Command) -> None:
        line = cmd.line.strip()
        low = line.lower()
        if low.startswith("exit") or low.startswith("..."):
            self._reply("+OK bye")
            self.running = False
            return
        if not self.authed:
            if low.startswith("auth "):
                if line[5:].strip() == self.server.password:
                    self.authed = True
                    self._reply("+OK accepted")
                else:
                    self._reply("-ERR invalid")
                    self.running = False
                return
            self._reply("-ERR command not found")
            return
        if low.startswith("myevents "):
            self._reply(self._myevents(line[9:].strip()))
            return
        reply = self.handle_common(cmd)
        if reply is None:
            reply = "-ERR command not found"
        if reply:
            self._reply(reply)

    def _myevents(self, rest: str) -> str:
        if self.myevents_uuid is not None:
            return "-ERR aready enabled."
        words = rest.split()
        if not words or words[0] not in self.switch.channels:
            return "-ERR invalid uuid"
        self.myevents_uuid = words[0]
        if len(words) > 1 and words[1].lower() == "json":
            self.event_format = "json"
        self.event_names |= MYEVENTS
        self.events_on = True
        return "+OK Events Enabled"


class InboundServer:
    """The inbound event socket of ``switch`` (gevent StreamServer).

    ``port=0`` picks a free port; see :attr:`address` after :meth:`start`."""

    def __init__(
        self,
        switch: Switch | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str = "ClueCon",
        auth_timeout: float = 25.0,
    ) -> None:
        self.switch = switch or default_switch()
        self.password = password
        self.auth_timeout = auth_timeout
        self._server = StreamServer((host, port), self._handle)
        self._connections: set[InboundConnection] = set()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.address[:2]
        return host, self._server.server_port or port

    def start(self) -> InboundServer:
        self._server.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        for conn in list(self._connections):
            conn.running = False
            conn.close_socket()
        with contextlib.suppress(Exception):
            self._server.stop(timeout=1)

    def __enter__(self) -> InboundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handle(self, sock: gsocket.socket, address: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        conn = InboundConnection(self, sock)
        self._connections.add(conn)
        try:
            conn.run()
        finally:
            self._connections.discard(conn)
