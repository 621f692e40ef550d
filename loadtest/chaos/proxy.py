"""A TCP proxy whose latency can be turned up and down while connections are open (gevent).

Every chunk read in either direction is written ``delay`` seconds after it was read, in order;
chunks are not held behind one another (a latency, not a bandwidth cap), which is what a slow or
congested network path looks like to Redis' clients. With ``delay`` 0 it forwards at once. When the
target cannot be reached, or closes, the client's connection is closed: as a dead server would.
"""

from __future__ import annotations

import contextlib
import socket
import time

import gevent
import gevent.queue
from gevent import socket as gsocket
from gevent.server import StreamServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DelayProxy:
    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self._server = StreamServer(("127.0.0.1", 0), self._handle)
        self._sockets: set[gsocket.socket] = set()

    @property
    def port(self) -> int:
        port: int = self._server.server_port
        return port

    def start(self) -> DelayProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(timeout=1)
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _handle(self, client: gsocket.socket, _address: object) -> None:
        try:
            upstream = gsocket.create_connection(("127.0.0.1", self.target_port), timeout=2)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            self._sockets.add(sock)
        try:
            pumps = [gevent.spawn(self._pump, client, upstream), gevent.spawn(self._pump, upstream, client)]
            gevent.wait(pumps, count=1)  # one side closed: close both
        finally:
            for sock in (client, upstream):
                self._sockets.discard(sock)
                with contextlib.suppress(OSError):
                    sock.close()
            gevent.killall(pumps, block=False)

    def _pump(self, source: gsocket.socket, target: gsocket.socket) -> None:
        chunks: gevent.queue.Queue[tuple[float, bytes] | None] = gevent.queue.Queue()
        writer = gevent.spawn(self._write, chunks, target)
        try:
            while data := source.recv(65536):
                chunks.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        finally:
            chunks.put(None)
            writer.join(timeout=self.delay + 1)

    @staticmethod
    def _write(chunks: gevent.queue.Queue[tuple[float, bytes] | None], target: gsocket.socket) -> None:
        while (item := chunks.get()) is not None:
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                gevent.sleep(wait)
            try:
                target.sendall(data)
            except OSError:
                return
