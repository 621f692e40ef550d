"""The gevent shell: accept FreeSWITCH's outbound-socket connections, one greenlet per call.

gevent's StreamServer accepts as soon as the listening socket is readable (no
polling interval), and every accepted socket gets TCP_NODELAY so the decision's
single write leaves at once.

An optional allow-list of source networks is enforced at accept: a connection from
elsewhere is closed at once, before a byte is read or written, and reported to
``on_refused`` (anyone who can reach the port could otherwise hold calls' resources).

Each connection is handed over with the monotonic time it was queued at, so that the call can
tell how long it waited for the CPU before its decision step (engine.shedding). That is the
time of its accept, or (``count_accept_queue``, Linux) of the end of its TCP handshake: a
connection can wait in the kernel's accept queue (up to ``LISTEN_BACKLOG`` of them) while the
engine is busy, and that wait was invisible to the shedding bounds. TCP_INFO's
``tcpi_last_ack_recv`` of a freshly accepted socket is the milliseconds since the peer's last
ACK, the handshake's (FreeSWITCH sends nothing before the engine's ``connect``); where it
cannot be read (not TCP, not Linux) the accept time is used, as before. While the
process is saturated the server can stop listening (:meth:`CallServer.stop_listening`): the
kernel then answers FreeSWITCH's SYN with a RST, and FreeSWITCH tries its next engine at once.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from gevent.server import StreamServer

from engine.esl.connection import EslConnection

log = logging.getLogger("callgate.server")


class Handler(Protocol):
    def __call__(self, conn: EslConnection, peer: tuple[object, ...], accepted_at: float) -> None: ...


RefusedHook = Callable[[tuple[object, ...]], None]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LISTEN_BACKLOG = 4096


def parse_networks(cidrs: Iterable[str]) -> tuple[IpNetwork, ...]:
    """CIDRs (a bare address means one host) as networks; ValueError names a bad one."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not an IP network") from exc
    return tuple(networks)


def peer_allowed(peer: tuple[object, ...], networks: tuple[IpNetwork, ...]) -> bool:
    """Whether the peer's address is in one of ``networks`` (an IPv4 peer seen on an IPv6
    socket as ::ffff:a.b.c.d counts as its IPv4 address)."""
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except (ValueError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


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


_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux only
# struct tcp_info (linux/tcp.h): eight one-byte fields, then __u32s; tcpi_last_ack_recv is the
# 15th __u32, at byte 56 (milliseconds since the last ACK received).
_LAST_ACK_RECV = struct.Struct("=I")
_LAST_ACK_RECV_OFFSET = 56
_TCP_INFO_READ = _LAST_ACK_RECV_OFFSET + _LAST_ACK_RECV.size


def accept_queue_seconds(tcp_info: bytes) -> float:
    """Seconds since the peer's last ACK from a TCP_INFO block (0.0 when it is too short): for
    a socket just accepted whose peer has sent nothing, its wait in the accept queue."""
    if len(tcp_info) < _TCP_INFO_READ:
        return 0.0
    return float(_LAST_ACK_RECV.unpack_from(tcp_info, _LAST_ACK_RECV_OFFSET)[0]) / 1000.0


def queued_since(sock: socket.socket, now: float) -> float:
    """When ``sock``, just accepted at monotonic ``now``, entered the accept queue (``now``
    when the kernel cannot tell)."""
    if _TCP_INFO is None:
        return now
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_READ)
    except OSError:  # not a TCP socket
        return now
    return now - accept_queue_seconds(info)


class _TimedStreamServer(StreamServer):  # type: ignore[misc]
    """gevent's StreamServer, handing the monotonic time the connection was queued at (its
    accept, or with ``count_accept_queue`` the end of its handshake) to the handler as well."""

    count_accept_queue = False

    def do_read(self) -> tuple[Any, Any, float] | None:
        accepted = super().do_read()
        if not accepted:
            return None
        now = time.monotonic()
        return (*accepted, queued_since(accepted[0], now) if self.count_accept_queue else now)


class CallServer:
    def __init__(
        self,
        listener: socket.socket,
        handler: Handler,
        *,
        max_frame_bytes: int = 1048576,
        allowed: tuple[IpNetwork, ...] = (),
        on_refused: RefusedHook | None = None,
        count_accept_queue: bool = False,
    ) -> None:
        self._handler = handler
        self._max_frame_bytes = max_frame_bytes
        self._allowed = allowed  # empty: every source may connect
        self._on_refused = on_refused
        self._listener = listener
        self._address = listener.getsockname()
        self._server = _TimedStreamServer(listener, self._accept)
        self._server.count_accept_queue = count_accept_queue
        self.listening = True
        self._stopped = False
        # Connection greenlets alive (each runs _accept to its end): the greenlet gauge's share
        # of the calls, counted here rather than by walking the garbage collector's objects.
        self.connections = 0

    def _accept(self, sock: socket.socket, peer: tuple[object, ...], accepted_at: float) -> None:
        self.connections += 1
        try:
            self._serve(sock, peer, accepted_at)
        finally:
            self.connections -= 1

    def _serve(self, sock: socket.socket, peer: tuple[object, ...], accepted_at: float) -> None:
        if self._allowed and not peer_allowed(peer, self._allowed):
            sock.close()
            if self._on_refused is not None:
                self._on_refused(peer)
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = EslConnection(sock, self._max_frame_bytes)
        try:
            self._handler(conn, peer, accepted_at)
        finally:
            conn.close()

    def start(self) -> None:
        self._server.start()

    def stop_listening(self) -> int:
        """Refuse new connections until :meth:`listen_again`; returns how many were taken first.

        The connections the kernel has already completed are accepted and handled as usual
        first: ``shutdown()`` of a listening socket resets every connection still in its accept
        queue, and FreeSWITCH treats a reset after a successful ``connect()`` as a silent engine
        (the caller waits for the dialplan's park_timeout). Then the socket stops listening: a
        SYN gets a RST (connection refused), and with SO_REUSEPORT the socket leaves the group,
        so the kernel gives new connections to the host's other engine processes. The socket
        keeps its port (bound explicitly) and its file descriptor.
        """
        if not self.listening or self._stopped:
            return 0
        self._server.stop_accepting()
        taken = 0
        while True:  # no yield between the last accept and the shutdown: nothing completes unseen
            accepted = self._server.do_read()
            if not accepted:
                break
            self._server.do_handle(*accepted)
            taken += 1
        self._listener.shutdown(socket.SHUT_RD)
        self.listening = False
        return taken

    def listen_again(self) -> None:
        """Listen (and accept) again after :meth:`stop_listening`."""
        if self.listening or self._stopped:  # stopped: the socket is closed for good
            return
        try:
            # A port the kernel chose (bound to port 0: tests) is released by the shutdown; an
            # explicitly bound one is kept, and binding it again fails with EINVAL.
            self._listener.bind(self._address)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        self._listener.listen(LISTEN_BACKLOG)
        self._server.start_accepting()
        self.listening = True

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self, timeout: float | None = None) -> None:
        self._stopped = True
        self._server.stop(timeout=timeout)
