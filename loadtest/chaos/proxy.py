"""A TCP proxy whose latency can be turned up and down while connections are open (gevent).

The chaos run starts one per Redis data node as a process of its own (``python -m
loadtest.chaos.proxy``): in the run's own process, any pause of its event loop (a busy machine,
a long collection) stalled every Redis connection at once, and the sentinels saw both data nodes
down (found in the first full run). SIGUSR1 turns the delay on, SIGUSR2 off.

Every chunk read in either direction is written ``delay`` seconds after it was read, in order;
chunks are not held behind one another (a latency, not a bandwidth cap), which is what a slow or
congested network path looks like to Redis' clients. With ``delay`` 0 it forwards at once. When the
target cannot be reached, or closes, the client's connection is closed: as a dead server would.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import time

import gevent
import gevent.event
import gevent.queue
from gevent import socket as gsocket
from gevent.server import StreamServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DelayProxy:
    def __init__(self, target_port: int, delay: float = 0.0, listen_port: int = 0) -> None:
        self.target_port = target_port
        self.delay = delay
        self._server = StreamServer(("127.0.0.1", listen_port), self._handle)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos.proxy", description=__doc__)
    parser.add_argument("--listen", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--to", type=int, required=True, help="loopback port to forward to")
    parser.add_argument("--delay", type=float, required=True, help="seconds added each way once SIGUSR1")
    args = parser.parse_args(argv)
    proxy = DelayProxy(args.to, 0.0, args.listen).start()
    slow = args.delay

    def on() -> None:
        proxy.delay = slow

    def off() -> None:
        proxy.delay = 0.0

    gevent.signal_handler(signal.SIGUSR1, on)
    gevent.signal_handler(signal.SIGUSR2, off)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    stop.wait()
    proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
