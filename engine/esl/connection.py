"""One event-socket connection: the sans-I/O parser driven by a (gevent) socket, with deadlines."""

from __future__ import annotations

import contextlib
import socket
from collections import deque

import gevent

from engine.esl.protocol import EslParser, Frame, ProtocolError

READ_SIZE = 65536


class PeerGone(Exception):
    """The peer closed the connection. ``clean``: an orderly end of stream, so every byte
    the peer wrote has been read; False for a reset or a failed write."""

    def __init__(self, message: str, *, clean: bool = False) -> None:
        super().__init__(message)
        self.clean = clean


class PeerTimeout(Exception):
    """The peer did not send what we waited for before the deadline."""


class EslConnection:
    def __init__(self, sock: socket.socket, max_frame_bytes: int = 1048576) -> None:
        self._sock = sock
        self._parser = EslParser(max_body_bytes=max_frame_bytes)
        self._frames: deque[Frame] = deque()
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise PeerGone(str(exc)) from exc

    def read_frame(self, timeout: float | None) -> Frame:
        """The next frame; PeerTimeout after `timeout` seconds, PeerGone on EOF, ProtocolError on garbage.

        ``timeout=None`` waits without a timer of its own: for a caller that holds one
        ``gevent.Timeout`` over many reads (a timer per read costs more than the read).
        """
        if self._frames:
            return self._frames.popleft()
        if timeout is None:
            while not self._frames:
                self._receive()
            return self._frames.popleft()
        with gevent.Timeout(timeout, PeerTimeout(f"no frame within {timeout:g}s")):
            while not self._frames:
                self._receive()
        return self._frames.popleft()

    def _receive(self) -> None:
        try:
            data = self._sock.recv(READ_SIZE)
        except OSError as exc:
            raise PeerGone(str(exc)) from exc
        if not data:
            raise PeerGone("connection closed by the peer", clean=True)
        self._frames.extend(self._parser.feed(data))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.close()


__all__ = ["EslConnection", "PeerGone", "PeerTimeout", "ProtocolError"]
