"""Baseline (a), the floor: the outbound-socket exchange with a fixed decision, nothing else.

Per call it does exactly the protocol work callgate cannot avoid, and no more: accept
the connection (gevent ``StreamServer``, TCP_NODELAY, the same backlog as the engine),
send ``connect``, wait for the end of the CHANNEL_DATA block (without parsing it), write
one fixed pipelined decision (the frozen-engine guard's ``api sched_del``, ``myevents``,
``nixevent``, the two ``filter`` commands, ``linger``, one ``multiset`` of ten variables
including a signed billing ticket, ``bridge`` over ten targets: the commands, shape and size
of callgate's answer for an ordinary accepted call, rendered by ``engine.call.render``), then cut
FreeSWITCH's output into frames by ``Content-Length`` until CHANNEL_HANGUP_COMPLETE (or a
non-linger disconnect notice) and close. No Redis, no rules, no decoding of values.

callgate's throughput relative to this server is the share of the budget spent above the
bare protocol; ``--decision reject`` answers ``respond 403`` instead.

    python -m loadtest.floor --port 8090
"""

from __future__ import annotations

import argparse
import socket
import sys

from engine.call.render import bridge_batch, respond_batch

READ_SIZE = 65536
LISTEN_BACKLOG = 4096  # as engine.esl.server

VARIABLES = (
    ("callgate_account", "1000020"),
    ("callgate_reseller_chain", ""),
    ("callgate_rate", "441:0.2251"),
    ("callgate_max_duration", "6000"),
    ("callgate_routes", "carrier000,carrier001,carrier002,carrier003,carrier004"),
    ("callgate_direction", "outbound"),
    ("continue_on_fail", "true"),
    ("hangup_after_bridge", "true"),
    ("execute_on_answer", "sched_hangup +6000 alloted_timeout"),
    # callgate_bill: an ordinary call's signed ticket is ~350 characters of base64url (one
    # chain level, five routes; engine.billing.ticket); its bytes are what FreeSWITCH reads.
    ("callgate_bill", "1." + "A" * 300 + "." + "B" * 43),
)
# The guard cancel names the channel's UUID; the floor does not parse the CHANNEL_DATA block,
# so it sends one of the same length (FreeSWITCH answers "+OK Deleted: 0" either way).
GUARD_UUID = "00000000-0000-4000-8000-000000000000"
_CODECS = ",absolute_codec_string=^^:PCMU:PCMA"
DIAL_STRING = "|".join(
    f"[leg_timeout=60{_CODECS if n % 2 else ''}]sofia/gateway/gw{n:03d}{leg}/441234567890"
    for n in range(5)
    for leg in "ab"
)


def decision(kind: str = "accept") -> bytes:
    """The fixed decision written for every call, in the engine's own command shapes."""
    if kind == "reject":
        batch = respond_batch(
            [("callgate_reason", "AUTHENTICATION_FAIL")], 403, "Forbidden", guard_uuid=GUARD_UUID
        )
    else:
        batch = bridge_batch(list(VARIABLES), DIAL_STRING, guard_uuid=GUARD_UUID)
    return batch.payload


_HANGUP_COMPLETE = b"Event-Name: CHANNEL_HANGUP_COMPLETE"


def serve_call(sock: socket.socket, batch: bytes) -> None:
    """One call: connect, fixed decision, frames until CHANNEL_HANGUP_COMPLETE."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"connect\n\n")
    buf = b""
    while True:  # the CHANNEL_DATA block ends at the first blank line
        data = sock.recv(READ_SIZE)
        if not data:
            return
        buf += data
        end = buf.find(b"\n\n")
        if end >= 0:
            buf = buf[end + 2 :]
            break
    sock.sendall(batch)
    while True:
        pos = 0
        n = len(buf)
        while True:
            while pos < n and buf[pos] == 0x0A:
                pos += 1
            end = buf.find(b"\n\n", pos)
            if end < 0:
                break
            length = 0
            cl = buf.find(b"Content-Length: ", pos, end)
            if cl >= 0:
                length = int(buf[cl + 16 : buf.find(b"\n", cl)])
            if end + 2 + length > n:
                break
            head = buf[pos:end]
            if b"text/event-plain" in head:
                if buf.startswith(_HANGUP_COMPLETE, end + 2):
                    return
            elif b"text/disconnect-notice" in head and b"Content-Disposition: linger" not in head:
                return
            pos = end + 2 + length
        buf = buf[pos:]
        data = sock.recv(READ_SIZE)
        if not data:
            return
        buf += data


def make_server(host: str, port: int, *, kind: str = "accept", reuse_port: bool = False):
    from gevent.server import StreamServer

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((host, port))
    listener.listen(LISTEN_BACKLOG)
    listener.setblocking(False)
    batch = decision(kind)

    def handle(sock: socket.socket, _peer: tuple) -> None:
        try:
            serve_call(sock, batch)
        except OSError:
            pass
        finally:
            sock.close()

    return StreamServer(listener, handle)


def main(argv: list[str] | None = None) -> int:
    from gevent import monkey

    monkey.patch_all()
    parser = argparse.ArgumentParser(prog="python -m loadtest.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--decision", choices=("accept", "reject"), default="accept")
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args(argv)
    _raise_fd_limit()
    server = make_server(args.host, args.port, kind=args.decision, reuse_port=args.reuse_port)
    print(f"floor server on {args.host}:{server.server_port} ({args.decision})", flush=True)
    server.serve_forever()
    return 0


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    sys.exit(main())
