"""Benchmark `callgate fsxml` against a trivial static-response server, in one run.

    python -m loadtest.fsxml_bench --devices 100000 --duration 10 --json result.json

What it does:

1. publishes a snapshot of ``loadtest.dataset.generate`` (sized so that it holds at least
   ``--devices`` SIP devices, each given a password) under a private Redis prefix;
2. starts, one after the other, pinned to CPU 1: the real ``callgate fsxml`` process (basic
   auth on, as a deployment would run it) and a *baseline*: the same gevent WSGI server
   (``engine.fsxml.server.wsgi_server``) answering every request with a fixed XML of about
   the same size, reading nothing (the cost of HTTP alone);
3. drives each from this process, pinned to CPU 0, with requests shaped as mod_xml_curl's
   ``action=sip_auth`` lookups (the fields of ``sofia_reg_parse_auth``) for random devices
   (1 % unknown users), in three ways:

   * ``open-new``: open loop at ``--rate`` requests/s (default 1,700: 100k devices
     re-registering every 60 s), **one new TCP connection per request**, as mod_xml_curl
     does (it creates and cleans up a curl handle per fetch, so nothing is kept alive);
     latency is counted from the scheduled send time (no coordinated omission);
   * ``closed-new``: as many requests as ``--concurrency`` clients can push, new
     connection each (the capacity FreeSWITCH can actually use);
   * ``closed-keepalive``: the same over persistent HTTP/1.1 connections (the service's
     ceiling when the client keeps connections, e.g. behind a proxy).

Reported per server and mode: achieved requests/s, p50/p99/p99.9 latency (ms), server CPU
per request (us, from /proc), server CPU utilisation, errors; and the ratios callgate /
baseline. The client is Python too: when the client's CPU is the limit (utilisation near 1
while the server's is not), the closed-loop numbers are the client's, and the CPU per
request (and its inverse, the requests per second one core would serve) is the figure to
compare. On a shared machine the achieved rates and latencies follow the CPU the scheduler
gives each process (``*_cpu_util`` well under 1 while saturated means the others took it);
the load average before and after each measurement is recorded.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "bench.example.net"
AUTH = ("freeswitch", "bench-Secret-1")
_CPU_SERVER, _CPU_CLIENT = "1", 0


# --- the dataset ----------------------------------------------------------------------------


def publish_dataset(redis_url: str, prefix: str, devices: int) -> list[str]:
    """Publish a snapshot with >= ``devices`` SIP devices (with passwords); return the usernames."""
    import redis

    from engine.fsxml.directory import a1_hash
    from engine.state.snapshot import publish_snapshot
    from loadtest.dataset import Scale, generate

    # generate() gives ~89 % of the accounts a device (the others are IP-mapped)
    data = generate(Scale(accounts=int(devices / 0.89) + 1000, rates=10_000, termination_rates=10_000))
    data.sip_devices = [  # as the sync publishes them: the a1-hash for the realm, never the password
        dataclasses.replace(d, a1_hash=a1_hash(d.username, DOMAIN, f"pw-{d.username}-x"))
        for d in data.sip_devices
    ]
    client = redis.Redis.from_url(redis_url)
    try:
        publish_snapshot(client, prefix, data)
    finally:
        client.close()
    return [d.username for d in data.sip_devices]


def request_bytes(usernames: list[str], count: int, seed: int = 7) -> list[bytes]:
    """``count`` POSTs as mod_xml_curl sends them for sip_auth (1 % for unknown users)."""
    rng = random.Random(seed)
    credentials = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
    out = []
    for n in range(count):
        user = rng.choice(usernames) if n % 100 else f"nobody{n}"
        fields = {
            "action": "sip_auth",
            "sip_profile": "internal",
            "sip_user_agent": "Yealink SIP-T46S 66.86.0.15",
            "sip_auth_username": user,
            "sip_auth_realm": DOMAIN,
            "sip_auth_nonce": f"{rng.getrandbits(128):032x}",
            "sip_auth_uri": f"sip:{DOMAIN}",
            "sip_contact_user": user,
            "sip_contact_host": "198.51.100.23",
            "sip_to_user": user,
            "sip_to_host": DOMAIN,
            "sip_via_protocol": "udp",
            "sip_from_user": user,
            "sip_from_host": DOMAIN,
            "sip_call_id": f"{rng.getrandbits(64):016x}@198.51.100.23",
            "sip_request_host": DOMAIN,
            "sip_auth_qop": "auth",
            "sip_auth_cnonce": f"{rng.getrandbits(64):016x}",
            "sip_auth_nc": "00000001",
            "sip_auth_response": f"{rng.getrandbits(128):032x}",
            "sip_auth_method": "REGISTER",
            "client_port": "5060",
            "key": "id",
            "user": user,
            "domain": DOMAIN,
            "ip": "198.51.100.23",
        }
        body = f"hostname=fs1&section=directory&tag_name=domain&key_name=name&key_value={DOMAIN}" + "".join(
            f"&{k}={quote(v, safe='')}" for k, v in fields.items()
        )
        head = (
            "POST /fsxml HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: freeswitch-xml/1.0\r\n"
            f"Accept: */*\r\nAuthorization: Basic {credentials}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append((head + body).encode())
    return out


# --- the baseline server --------------------------------------------------------------------


def run_baseline(port: int, size: int) -> None:
    """gevent's WSGI server answering a fixed XML body of ``size`` bytes; reads nothing."""
    from gevent import monkey

    monkey.patch_all()
    from engine.fsxml.server import wsgi_server  # the same server and socket options as callgate's

    body = (b'<?xml version="1.0"?>\n<document type="freeswitch/xml">' + b" " * size)[:size]
    headers = [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", headers)
        return [body]

    server = wsgi_server(("127.0.0.1", port), app)
    print("baseline listening", flush=True)
    server.serve_forever()


# --- the client -----------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    latencies: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)


def _exchange(sock: Any, payload: bytes, outcome: Outcome) -> bool:
    """Send one request and read its whole response; False if the connection is unusable."""
    sock.sendall(payload)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        rest += chunk
    outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
    return True


def drive(
    port: int, requests: list[bytes], mode: str, seconds: float, rate: float, concurrency: int
) -> Outcome:
    """Run one measurement against 127.0.0.1:port (gevent, in this process)."""
    import gevent
    from gevent import socket

    outcome = Outcome()
    address = ("127.0.0.1", port)
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**12))

    def one_new(started: float) -> None:
        try:
            with socket.create_connection(address, timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if _exchange(sock, requests[next(counter) % len(requests)], outcome):
                    outcome.latencies.append(time.perf_counter() - started)
                else:
                    outcome.errors += 1
        except OSError:
            outcome.errors += 1

    def closed_client(keepalive: bool) -> None:
        sock = None
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            if not keepalive:
                one_new(started)
                continue
            try:
                if sock is None:
                    sock = socket.create_connection(address, timeout=10)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if _exchange(sock, requests[next(counter) % len(requests)], outcome):
                    outcome.latencies.append(time.perf_counter() - started)
                    continue
            except OSError:
                pass
            outcome.errors += 1
            if sock is not None:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    if mode == "open-new":
        interval = 1.0 / rate
        start = time.perf_counter()
        greenlets = []
        n = 0
        while True:
            due = start + n * interval
            if due >= stop_at:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            greenlets.append(gevent.spawn(one_new, due))
            n += 1
        gevent.joinall(greenlets, timeout=30)
    else:
        gevent.joinall([gevent.spawn(closed_client, mode == "closed-keepalive") for _ in range(concurrency)])
    return outcome


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def measure(
    name: str, pid: int, port: int, requests: list[bytes], mode: str, args: argparse.Namespace
) -> dict[str, Any]:
    drive(port, requests, mode, min(2.0, args.duration), args.rate, args.concurrency)  # warm-up
    load_before = os.getloadavg()[0]
    server_cpu, client_cpu = cpu_seconds(pid), cpu_seconds(os.getpid())
    started = time.perf_counter()
    outcome = drive(port, requests, mode, args.duration, args.rate, args.concurrency)
    wall = time.perf_counter() - started
    server_cpu, client_cpu = cpu_seconds(pid) - server_cpu, cpu_seconds(os.getpid()) - client_cpu
    done = len(outcome.latencies)
    row: dict[str, Any] = {
        "server": name,
        "mode": mode,
        "requests": done,
        "rps": done / wall,
        "p50_ms": percentile(outcome.latencies, 0.50) * 1000,
        "p99_ms": percentile(outcome.latencies, 0.99) * 1000,
        "p999_ms": percentile(outcome.latencies, 0.999) * 1000,
        "server_cpu_util": server_cpu / wall,
        "server_cpu_us_per_request": server_cpu / done * 1e6 if done else float("nan"),
        # requests per second of server CPU: what one core would serve at this cost per request
        "capacity_rps_per_core": done / server_cpu if server_cpu else float("nan"),
        "client_cpu_util": client_cpu / wall,
        "errors": outcome.errors,
        "load_average": [load_before, os.getloadavg()[0]],  # the machine's, before and after
        "server_rss_mib": _rss_mib(pid),
        "statuses": {str(k): v for k, v in outcome.statuses.items()},
    }
    print(
        f"{name:9} {mode:17} {row['rps']:8.0f} req/s  p50 {row['p50_ms']:6.2f}  p99 {row['p99_ms']:7.2f}"
        f"  p99.9 {row['p999_ms']:7.2f} ms  server {row['server_cpu_us_per_request']:6.0f} us/req"
        f" ({row['capacity_rps_per_core']:5.0f}/s per core)"
        f" util {row['server_cpu_util']:.2f}  client util {row['client_cpu_util']:.2f}"
        f"  errors {outcome.errors}  {row['statuses']}  load {load_before:.1f}"
        f"  rss {row['server_rss_mib']:.0f} MiB",
        flush=True,
    )
    return row


def _start(
    command: list[str], env: dict[str, str], ready: str, log_path: Path, pin: bool
) -> subprocess.Popen[bytes]:
    pinned = ["taskset", "-c", _CPU_SERVER, *command] if pin else command
    with log_path.open("wb") as log:
        process = subprocess.Popen(pinned, env=env, cwd=ROOT, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while ready not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{command} did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.1)
    return process


def _wait_served(port: int, requests: list[bytes]) -> None:
    deadline = time.monotonic() + 120
    while True:
        outcome = drive(port, requests[:1], "closed-new", 0.05, 1, 1)
        if outcome.statuses.get(200):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no 200 from port {port}: {outcome}")
        time.sleep(0.5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default=os.environ.get("CALLGATE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--prefix", default=f"fsxmlbench:{os.getpid()}:")
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1700.0, help="open loop: requests per second")
    parser.add_argument("--concurrency", type=int, default=32, help="closed loop: clients")
    parser.add_argument("--modes", default="open-new,closed-new,closed-keepalive")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the scheduler place server and client (on a machine others load, pinning starves both)",
    )
    parser.add_argument("--baseline-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-size", type=int, default=900, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_port:
        run_baseline(args.baseline_port, args.baseline_size)
        return 0

    import redis

    from engine.state.snapshot import delete_prefix

    if args.pin:
        os.sched_setaffinity(0, {_CPU_CLIENT})
    started = time.monotonic()
    usernames = publish_dataset(args.redis, args.prefix, args.devices)
    print(
        f"published {len(usernames)} devices under {args.prefix} in {time.monotonic() - started:.1f}s",
        flush=True,
    )
    requests = request_bytes(usernames, 20_000)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    rows: list[dict[str, Any]] = []
    processes: list[subprocess.Popen[bytes]] = []
    try:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
        env.update(
            CALLGATE_CONFIG=str(ROOT / "config" / "callgate.toml"),
            CALLGATE_REDIS_URL=args.redis,
            CALLGATE_REDIS__KEY_PREFIX=args.prefix,
            # no database: gateway passwords are not read (the bench asks for users only)
            CALLGATE_DATABASE_URL="postgresql://callgate-bench@127.0.0.1:1/none",
            CALLGATE_FSXML__DOMAIN=DOMAIN,
            CALLGATE_FSXML__LISTEN_PORT=str(port),
            CALLGATE_FSXML__USERNAME=AUTH[0],
            CALLGATE_FSXML__PASSWORD=AUTH[1],
        )
        fsxml = _start(
            [sys.executable, "-m", "engine.cli", "fsxml"],
            env,
            "listening",
            logs / f"fsxml-bench-{port}.log",
            args.pin,
        )
        processes.append(fsxml)
        _wait_served(port, requests)
        sample = drive(port, requests[1:2], "closed-new", 0.05, 1, 1)
        assert sample.statuses.get(200), sample
        for mode in args.modes.split(","):
            rows.append(measure("callgate", fsxml.pid, port, requests, mode, args))
        fsxml.terminate()
        fsxml.wait(timeout=20)
        base_port = _free_port()
        baseline = _start(
            [sys.executable, "-m", "loadtest.fsxml_bench", "--baseline-port", str(base_port)],
            env,
            "baseline listening",
            logs / f"fsxml-baseline-{base_port}.log",
            args.pin,
        )
        processes.append(baseline)
        for mode in args.modes.split(","):
            rows.append(measure("baseline", baseline.pid, base_port, requests, mode, args))
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)
        client = redis.Redis.from_url(args.redis)
        delete_prefix(client, args.prefix)
        client.close()
    ratios = {}
    for mode in args.modes.split(","):
        ours = next(r for r in rows if r["server"] == "callgate" and r["mode"] == mode)
        base = next(r for r in rows if r["server"] == "baseline" and r["mode"] == mode)
        ratios[mode] = {
            "rps": ours["rps"] / base["rps"],
            "cpu_per_request": ours["server_cpu_us_per_request"] / base["server_cpu_us_per_request"],
            "p99": ours["p99_ms"] / base["p99_ms"],
        }
        print(
            f"callgate / baseline, {mode}: req/s x{ratios[mode]['rps']:.2f}, CPU per request "
            f"x{ratios[mode]['cpu_per_request']:.2f}, p99 x{ratios[mode]['p99']:.2f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"devices": len(usernames), "args": vars(args), "rows": rows, "ratios": ratios}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
