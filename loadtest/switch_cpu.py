"""An engine's CPU during a full snapshot switch, waiting for the image or building from rows.

    python -m loadtest.switch_cpu --prefix imgwait:bench: --accounts 100000 --rates 100000 \\
        --waits 150,0,150,0

A benchmark, never an assert. Against a dataset published by ``loadtest.dataset`` (same
``--accounts``/``--rates``), for each value of ``--waits`` (``engine.snapshot_image_wait``):

1. makes sure the current version has a published image, then starts one engine-like process
   (gevent monkey-patched, ``SnapshotHolder.run`` with image fetch and that wait) and waits
   until it serves the current version;
2. publishes a new version (``loadtest.dataset --force``), marks its image as being built and
   starts a producer process right away (what the sync worker's leader does);
3. reads the engine process's ``utime + stime`` (``/proc/<pid>/stat``) from just before the
   publish to its swap to the new version, the switch's wall time (from the producer's start
   to the swap) and the producer's whole CPU (``wait4``).

Prints one JSON line per run, with the load average. Everything runs at the caller's niceness
(run it under ``nice``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def engine_main(redis_url: str, prefix: str, wait: float) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent.event
    import redis

    from engine.imagejob import image_fingerprint
    from engine.rules.catalog import Catalog
    from engine.state.image import ImageStore
    from engine.state.watcher import SnapshotHolder

    client = redis.Redis.from_url(redis_url, socket_timeout=60)

    def swapped(version: int, value: Any) -> None:
        mapped = isinstance(value.accounts._records, memoryview)
        print(json.dumps({"version": version, "mapped": mapped, "at": time.time()}), flush=True)

    holder: SnapshotHolder[Catalog] = SnapshotHolder(
        client,
        prefix,
        Catalog.build,
        images=ImageStore(None, prefix, image_fingerprint()),
        image_blobs=True,
        image_wait=wait,
        on_swap=swapped,
    )
    holder.run(gevent.event.Event(), 1.0)


def produce_main(redis_url: str, prefix: str) -> None:
    import redis

    from engine.imagejob import image_fingerprint
    from engine.rules.catalog import Catalog
    from engine.state.image import ImageStore
    from engine.state.imageblob import publish_current

    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    publish_current(client, prefix, Catalog.build, ImageStore(None, prefix, image_fingerprint()), by="bench")


def _read_swap(engine: subprocess.Popen[str]) -> dict[str, Any]:
    assert engine.stdout is not None
    line = engine.stdout.readline()
    if not line:
        raise RuntimeError("the engine process ended")
    return dict(json.loads(line))


def one_run(args: argparse.Namespace, wait: float) -> dict[str, Any]:
    import redis

    from engine.imagejob import image_fingerprint
    from engine.state.imageblob import mark_building
    from engine.state.snapshot import current_stamp

    me = [sys.executable, "-m", "loadtest.switch_cpu", "--redis", args.redis, "--prefix", args.prefix]
    client = redis.Redis.from_url(args.redis)
    subprocess.run([*me, "produce"], check=True)  # the current version's image, if missing
    engine = subprocess.Popen([*me, "engine", "--wait", str(wait)], stdout=subprocess.PIPE, text=True)
    try:
        first = _read_swap(engine)
        time.sleep(2)  # settled
        before = cpu_seconds(engine.pid)
        started = time.time()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtest.dataset",
                "--redis",
                args.redis,
                "--prefix",
                args.prefix,
                "--accounts",
                str(args.accounts),
                "--rates",
                str(args.rates),
                "--force",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        stamp = current_stamp(client, args.prefix)
        assert stamp is not None and stamp.version != first["version"]
        mark_building(client, args.prefix, stamp.version, stamp.token, image_fingerprint(), by="bench-leader")
        producer = subprocess.Popen([*me, "produce"])
        published = time.time()
        swap = _read_swap(engine)
        while swap["version"] != stamp.version:
            swap = _read_swap(engine)
        after = cpu_seconds(engine.pid)
        _, _, usage = os.wait4(producer.pid, 0)  # its whole CPU, from the kernel's accounting
        producer.returncode = 0
        producer_cpu = usage.ru_utime + usage.ru_stime
        return {
            "wait_setting": wait,
            "version": stamp.version,
            "mapped": swap["mapped"],
            "engine_cpu_s": round(after - before, 2),
            "switch_s": round(swap["at"] - published, 2),
            "publish_s": round(published - started, 2),
            "producer_cpu_s": round(producer_cpu, 2),
            "loadavg": os.getloadavg(),
        }
    finally:
        engine.terminate()
        engine.wait(10)
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--accounts", type=int, default=100000)
    parser.add_argument("--rates", type=int, default=100000)
    parser.add_argument("--waits", default="150,0", help="engine.snapshot_image_wait of each run")
    parser.add_argument("--wait", type=float, default=150.0, help=argparse.SUPPRESS)
    parser.add_argument("role", nargs="?", choices=["engine", "produce"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "engine":
        engine_main(args.redis, args.prefix, args.wait)
        return 0
    if args.role == "produce":
        produce_main(args.redis, args.prefix)
        return 0
    for wait in (float(w) for w in args.waits.split(",")):
        print(json.dumps(one_run(args, wait)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
