"""The gevent shell: accept FreeSWITCH's outbound-socket connections, one greenlet per call.

gevent's StreamServer accepts as soon as the listening socket is readable (no
polling interval), and every accepted socket gets TCP_NODELAY so the decision's
single write leaves at once.

An optional allow-list of source networks is enforced at accept: a connection from
elsewhere is closed at once, before a byte is read or written, and reported to
``on_refused`` (anyone who can reach the port could otherwise hold calls' resources).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable

from gevent.server import StreamServer

from engine.esl.connection import EslConnection

log = logging.getLogger("callgate.server")

Handler = Callable[[EslConnection, tuple[object, ...]], None]
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


class CallServer:
    def __init__(
        self,
        listener: socket.socket,
        handler: Handler,
        *,
        max_frame_bytes: int = 1048576,
        allowed: tuple[IpNetwork, ...] = (),
        on_refused: RefusedHook | None = None,
    ) -> None:
        self._handler = handler
        self._max_frame_bytes = max_frame_bytes
        self._allowed = allowed  # empty: every source may connect
        self._on_refused = on_refused
        self._server = StreamServer(listener, self._accept)
        # Connection greenlets alive (each runs _accept to its end): the greenlet gauge's share
        # of the calls, counted here rather than by walking the garbage collector's objects.
        self.connections = 0

    def _accept(self, sock: socket.socket, peer: tuple[object, ...]) -> None:
        self.connections += 1
        try:
            self._serve(sock, peer)
        finally:
            self.connections -= 1

    def _serve(self, sock: socket.socket, peer: tuple[object, ...]) -> None:
        if self._allowed and not peer_allowed(peer, self._allowed):
            sock.close()
            if self._on_refused is not None:
                self._on_refused(peer)
            return
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
