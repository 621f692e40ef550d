"""The server's source allow-list (engine.esl.server) and its rate-limited log (engine.runtime)."""

from __future__ import annotations

import logging

import gevent
import gevent.event
import pytest
from gevent import socket

from engine.esl.server import CallServer, listening_socket, parse_networks, peer_allowed
from engine.runtime import RefusalLog


def test_peer_allowed_matches_ipv4_ipv6_and_mapped_addresses() -> None:
    networks = parse_networks(["10.0.0.0/24", " 2001:db8::/32", "192.0.2.7"])
    assert peer_allowed(("10.0.0.9", 5000), networks)
    assert not peer_allowed(("10.0.1.9", 5000), networks)
    assert peer_allowed(("2001:db8::1", 5000, 0, 0), networks)
    assert peer_allowed(("::ffff:192.0.2.7", 5000, 0, 0), networks)  # IPv4 peer on an IPv6 socket
    assert not peer_allowed(("fe80::1%eth0", 5000, 0, 2), networks)
    assert not peer_allowed(("not an address",), networks)
    with pytest.raises(ValueError, match="is not an IP network"):
        parse_networks(["10.0.0.300/8"])


def test_a_refused_peer_is_closed_before_any_byte_and_reported() -> None:
    handled: list[object] = []
    refused: list[tuple[object, ...]] = []
    listener = listening_socket("127.0.0.1", 0)
    server = CallServer(
        listener,
        lambda conn, peer, accepted_at: handled.append(peer),
        allowed=parse_networks(["192.0.2.0/24"]),
        on_refused=refused.append,
    )
    server.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            assert client.recv(16) == b""
        with gevent.Timeout(5):
            while not refused:
                gevent.sleep(0.01)
    finally:
        server.stop()
    assert handled == [] and refused[0][0] == "127.0.0.1"


def test_connection_greenlets_are_counted_while_they_run() -> None:
    """CallServer.connections (callgate_greenlets{kind="connection"}) rises with each
    connection's greenlet and falls back to 0 when the handlers return, refused ones included."""
    release = gevent.event.Event()
    inside: list[object] = []

    def handler(conn: object, peer: object, accepted_at: float) -> None:
        inside.append(peer)
        release.wait()

    listener = listening_socket("127.0.0.1", 0)
    server = CallServer(listener, handler)
    server.start()
    clients = []
    try:
        for _ in range(3):
            clients.append(socket.create_connection(listener.getsockname(), timeout=5))
        with gevent.Timeout(5):
            while len(inside) < 3:
                gevent.sleep(0.01)
        assert server.connections == 3
        release.set()
        with gevent.Timeout(5):
            while server.connections:
                gevent.sleep(0.01)
    finally:
        for client in clients:
            client.close()
        server.stop()
    assert server.connections == 0


def test_refusals_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    refusals = RefusalLog(10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="callgate.serve"):
        assert refusals.note("198.51.100.1")
        assert not refusals.note("198.51.100.2")
        assert not refusals.note("198.51.100.3\nforged line")
        now[0] += 10.0
        assert refusals.note("198.51.100.4")
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "and 2 more refused since the last report" in messages[1]


def test_accept_queue_seconds_reads_tcpi_last_ack_recv() -> None:
    import struct

    from engine.esl.server import accept_queue_seconds

    block = bytes(56) + struct.pack("=I", 250) + bytes(44)
    assert accept_queue_seconds(block) == pytest.approx(0.25)
    assert accept_queue_seconds(block[:59]) == 0.0  # too short: unknown, no wait counted


@pytest.mark.parametrize("count_accept_queue", [True, False])
def test_the_wait_in_the_kernels_accept_queue_is_counted(count_accept_queue: bool) -> None:
    """A connection queued by the kernel before the engine accepts it: with count_accept_queue
    its queued time is the end of its handshake (TCP_INFO), without it the accept."""
    import time

    queued: list[float] = []
    listener = listening_socket("127.0.0.1", 0)
    server = CallServer(
        listener,
        lambda conn, peer, accepted_at: queued.append(accepted_at),
        count_accept_queue=count_accept_queue,
    )
    client = socket.create_connection(listener.getsockname(), timeout=5)  # handshake done: queued
    connected = time.monotonic()
    gevent.sleep(0.3)  # nobody accepts meanwhile
    started = time.monotonic()
    server.start()
    try:
        with gevent.Timeout(5):
            while not queued:
                gevent.sleep(0.01)
    finally:
        client.close()
        server.stop()
    if count_accept_queue:
        # the handshake's time, to TCP_INFO's millisecond (jiffy) resolution
        assert connected - 0.1 < queued[0] < started - 0.15
    else:
        assert queued[0] >= started
