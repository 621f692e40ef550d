"""The gevent shell: accept FreeSWITCH's outbound-socket connections, one greenlet per call.

gevent's StreamServer accepts as soon as the listening socket is readable (no
polling interval), and every accepted socket gets TCP_NODELAY so the decision's
single write leaves at once.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from gevent.server import StreamServer

from engine.esl.connection import EslConnection

log = logging.getLogger("callgate.server")

Handler = Callable[[EslConnection, tuple], None]
LISTEN_BACKLOG = 4096


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class CallServer:
    def __init__(self, listener: socket.socket, handler: Handler, *, max_frame_bytes: int = 1048576) -> None:
        self._handler = handler
        self._max_frame_bytes = max_frame_bytes
        self._server = StreamServer(listener, self._accept)

    def _accept(self, sock: socket.socket, peer: tuple) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = EslConnection(sock, self._max_frame_bytes)
        try:
            self._handler(conn, peer)
        finally:
            conn.close()

    def start(self) -> None:
        self._server.start()

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self, timeout: float | None = None) -> None:
        self._server.stop(timeout=timeout)
