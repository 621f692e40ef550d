"""A small inbound event-socket client: connect, ``auth``, ``api`` command(s), ``exit``.

One overall deadline bounds the whole exchange. It uses the standard ``socket`` module,
which is cooperative once gevent has monkey-patched the process, and the sans-I/O parser.
greenswitch's ``InboundESL`` was not used because it has no deadline on command replies
(``send`` waits forever when a reply never comes) and spawns reader greenlets per connection.
"""

from __future__ import annotations

import contextlib
import socket
import time

from engine.esl.protocol import EslParser, Frame, ProtocolError, command

__all__ = ["InboundError", "api", "api_many"]

PIPELINE_CHUNK = 64  # api commands written before their replies are read (see api_many)

MAX_REPLY_BYTES = 256 * 1024 * 1024  # e.g. ~100k channels of `show channels` at ~1 KiB a row


class InboundError(Exception):
    """The exchange failed (connect, auth, deadline, closed connection, not ESL)."""


class _Inbound:
    def __init__(self, sock: socket.socket, deadline: float, where: str, max_reply_bytes: int) -> None:
        self._sock = sock
        self._deadline = deadline
        self._where = where
        self._parser = EslParser(max_body_bytes=max_reply_bytes)
        self._frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise InboundError(f"{self._where}: send failed: {exc}") from exc

    def frame(self) -> Frame:
        while not self._frames:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise InboundError(f"{self._where}: no reply before the deadline")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(262144)
            except TimeoutError as exc:
                raise InboundError(f"{self._where}: no reply before the deadline") from exc
            except OSError as exc:
                raise InboundError(f"{self._where}: receive failed: {exc}") from exc
            if not data:
                raise InboundError(f"{self._where}: connection closed by the switch")
            try:
                self._frames += self._parser.feed(data)
            except ProtocolError as exc:
                raise InboundError(f"{self._where}: not ESL: {exc}") from exc
        frame = self._frames.pop(0)
        if frame.content_type in ("text/disconnect-notice", "text/rude-rejection"):
            text = frame.body.decode("utf-8", "replace").strip()
            raise InboundError(f"{self._where}: switch refused or closed: {text[:120]}")
        return frame

    def reply(self, content_type: str) -> Frame:
        """The next frame of ``content_type``, skipping events and log lines."""
        while True:
            frame = self.frame()
            if frame.content_type == content_type:
                return frame


def api(
    host: str,
    port: int,
    password: str,
    line: str,
    *,
    timeout: float = 5.0,
    max_reply_bytes: int = MAX_REPLY_BYTES,
) -> str:
    """The body of ``api <line>``'s reply from the switch at ``host:port`` (inbound socket).

    Raises InboundError on any failure; ``timeout`` bounds the whole exchange."""
    return api_many(host, port, password, [line], timeout=timeout, max_reply_bytes=max_reply_bytes)[0]


def api_many(
    host: str,
    port: int,
    password: str,
    lines: list[str],
    *,
    timeout: float = 5.0,
    max_reply_bytes: int = MAX_REPLY_BYTES,
) -> list[str]:
    """The reply bodies of ``api <line>`` for each line, in order, over one connection and one
    ``auth``. Commands are written ``PIPELINE_CHUNK`` at a time, then their replies read (the
    switch answers a connection's commands in order): one round trip per chunk, and never so
    much unread reply that both sides block writing. Raises InboundError on any failure;
    ``timeout`` bounds the whole exchange."""
    where = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise InboundError(f"{where}: connect failed: {exc}") from exc
    bodies: list[str] = []
    with sock:
        client = _Inbound(sock, deadline, where, max_reply_bytes)
        greeting = client.frame()
        if greeting.content_type != "auth/request":
            raise InboundError(f"{where}: expected auth/request, got {greeting.content_type!r}")
        try:
            client.send(command(f"auth {password}"))
        except ValueError as exc:
            raise InboundError(f"{where}: unusable password") from exc
        answer = client.reply("command/reply")
        if not answer.reply_ok():
            raise InboundError(f"{where}: auth refused: {answer.reply_text}")
        for start in range(0, len(lines), PIPELINE_CHUNK):
            chunk = lines[start : start + PIPELINE_CHUNK]
            try:
                client.send(b"".join(command(f"api {line}") for line in chunk))
            except ValueError as exc:
                raise InboundError(f"{where}: unusable api command: {exc}") from exc
            bodies += [client.reply("api/response").body.decode("utf-8", "replace") for _ in chunk]
        with contextlib.suppress(InboundError):
            client.send(command("exit"))
    return bodies
