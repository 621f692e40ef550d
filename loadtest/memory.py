"""Memory and cold start of engine processes: a benchmark, never an assert.

    python -m loadtest.memory --prefix cgscale1m: --accounts 1000000 --rates 1000000 [--procs 2]

starts ``callgate serve`` (``--procs`` processes on one port, SO_REUSEPORT) against a
dataset already published under ``--prefix`` (``python -m loadtest.dataset --prefix ...``
with the same ``--accounts``/``--rates``: the probe call needs its layout), and prints,
per process:

- **cold start**: seconds from the process start to *listening* (a TCP connect succeeds)
  and to the *first decision* (a probe call of an ordinary customer is bridged);
- **memory** once it decides: RSS (``VmRSS``) and PSS (``Pss`` of ``smaps_rollup``, which
  splits pages shared between processes fairly among them), and the peak RSS (``VmHWM``).

With ``--warm-seconds S`` the engines first decide the load test's call mix for S seconds
(closed loop, ``--warm-concurrency`` calls at a time, many distinct callers and destinations)
and the memory is read after that: the steady state, with the packed tables' recent-entity
caches (``engine.entity_cache``) filled by traffic, rather than just after the load.

Catalogue images (docs/performance.md, "Catalogue images through Redis"): ``--image-dir DIR``
gives the engines ``engine.snapshot_image_dir`` (``--image-dir fresh``: a new empty directory,
as on a new host); ``--no-fetch`` turns off fetching the image published in Redis (the engines
then decode the rows when they have no local image); ``--publish`` first builds and publishes
the image (``callgate image publish``, timed, with its peak RSS and the blob's ``MEMORY USAGE``).
Meanwhile a prober times a small Redis command every millisecond, and the report gives its
latency while the engines start (a chunked fetch must not stall the other clients of Redis).
``--chunk-sweep 1,4,16,64`` instead times that prober while one client reads a 256 MB blob in
chunks of each size (MiB), for choosing ``sync.image_chunk_bytes``.

``loadtest.run``'s scale scenario records the same figures for every server it starts
(:func:`process_memory`, :class:`StartWatch`), beside the latency.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest import child_env

VENV_BIN = Path(sys.executable).parent


# /proc/<pid>/status fields read: RSS is the process's own memory (anonymous: the heap, the
# built entities) plus the pages of files it touched, a mapped catalogue image's included
# (shared memory of a tmpfs: one copy per host, shared by every process mapping it).
_STATUS_FIELDS = {
    "VmRSS": "rss_mb",
    "VmHWM": "peak_rss_mb",
    "RssAnon": "anon_mb",
    "RssShmem": "shmem_mb",
}


def process_memory(pid: int) -> dict[str, float]:
    """RSS, peak RSS, PSS, and RSS's anonymous and shared-memory parts of ``pid`` in MiB
    (Linux /proc); empty if the process is gone."""
    result: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name = _STATUS_FIELDS.get(line.split(":", 1)[0])
                if name:
                    result[name] = int(line.split()[1]) / 1024
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    result["pss_mb"] = int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return result


@dataclass
class StartWatch:
    """Cold-start times of servers started at ``started`` (``time.monotonic()``)."""

    started: float
    listening_s: float | None = None
    first_decision_s: float | None = None

    def saw_listening(self) -> None:
        if self.listening_s is None:
            self.listening_s = time.monotonic() - self.started

    def saw_decision(self) -> None:
        """A decision came: the server listens too (at the latest now)."""
        if self.first_decision_s is None:
            self.first_decision_s = time.monotonic() - self.started
        if self.listening_s is None:
            self.listening_s = self.first_decision_s

    def as_dict(self) -> dict[str, float | None]:
        return {"listening_s": self.listening_s, "first_decision_s": self.first_decision_s}


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def describe(watch: dict[str, Any], memory: list[dict[str, float]]) -> str:
    """One line: cold start and memory per process."""

    def fmt(value: float | None, unit: str) -> str:
        return "n/a" if value is None else f"{value:.1f}{unit}"

    per_process = ", ".join(
        f"RSS {fmt(m.get('rss_mb'), ' MB')} (anonymous {fmt(m.get('anon_mb'), ' MB')}, "
        f"shared memory {fmt(m.get('shmem_mb'), ' MB')}) PSS {fmt(m.get('pss_mb'), ' MB')} "
        f"peak {fmt(m.get('peak_rss_mb'), ' MB')}"
        for m in memory
    )
    return (
        f"cold start: listening {fmt(watch.get('listening_s'), ' s')}, "
        f"first decision {fmt(watch.get('first_decision_s'), ' s')}; memory per process: {per_process}"
    )


def measure_cold_start(
    redis_url: str,
    prefix: str,
    accounts: int,
    rates: int,
    procs: int,
    timeout: float = 600.0,
    image_dir: str = "",
    warm_seconds: float = 0.0,
    warm_concurrency: int = 50,
    entity_cache: int = 0,
    fetch: bool = True,
) -> dict[str, Any]:
    """Start ``procs`` engine processes on a free port, time them, measure them, stop them.

    ``image_dir``: the engines' ``engine.snapshot_image_dir`` (catalogue images); "" = none.
    ``warm_seconds``: decide the load mix this long before reading the memory (module doc).
    ``entity_cache``: the engines' ``engine.entity_cache``; 0 = its default.
    ``fetch``: the engines' ``engine.snapshot_image_fetch`` (the image published in Redis)."""
    from loadtest.dataset import Scale
    from loadtest.driver import record_library
    from loadtest.run import free_port, probe_call, probe_plan

    scale = Scale(accounts=accounts, rates=rates)
    lib = record_library()
    plan = probe_plan(scale)
    port = free_port()
    env = child_env()
    env.update(
        CALLGATE_REDIS_URL=redis_url,
        CALLGATE_REDIS__KEY_PREFIX=prefix,
        CALLGATE_ENGINE__LISTEN_PORT=str(port),
        CALLGATE_ENGINE__REUSE_PORT="true" if procs > 1 else "false",
        CALLGATE_METRICS__LISTEN_PORT="0",
        CALLGATE_LOGGING__LEVEL="INFO",
        CALLGATE_ENGINE__SNAPSHOT_IMAGE_DIR=image_dir,
        CALLGATE_ENGINE__SNAPSHOT_IMAGE_FETCH="true" if fetch else "false",
    )
    if entity_cache:
        env["CALLGATE_ENGINE__ENTITY_CACHE"] = str(entity_cache)
    env.pop("CALLGATE_CONFIG", None)
    workdir = Path(tempfile.mkdtemp(prefix="cgmemory-"))
    prober = LatencyProbe(redis_url)
    prober.start()
    started = time.monotonic()
    running = []
    for n in range(procs):
        with open(workdir / f"engine.{n}.log", "w") as handle:
            running.append(
                subprocess.Popen(
                    [str(VENV_BIN / "callgate"), "serve"],
                    env=env,
                    cwd=workdir,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            )
    watch = StartWatch(started)
    try:
        deadline = started + timeout
        accepted = 0
        while time.monotonic() < deadline and accepted < 4 * procs:
            for proc in running:
                if proc.poll() is not None:
                    log = (workdir / f"engine.{running.index(proc)}.log").read_text()[-3000:]
                    raise RuntimeError(f"engine exited ({proc.returncode}):\n{log}")
            if watch.listening_s is None:
                if is_listening(port):
                    watch.saw_listening()
                else:
                    time.sleep(0.05)
                    continue
            outcome = probe_call(("127.0.0.1", port), lib, plan=plan)
            if outcome == "accept":
                watch.saw_decision()
                accepted += 1
            else:
                time.sleep(0.05)
        redis_latency = prober.stop()
        time.sleep(1.0)  # let the post-load garbage settle before reading memory
        memory = [process_memory(proc.pid) for proc in running]
        warm: dict[str, Any] = {}
        if warm_seconds > 0:
            warm = warm_up(port, scale, lib, warm_seconds, warm_concurrency)
            time.sleep(1.0)
            warm["memory"] = [process_memory(proc.pid) for proc in running]
    finally:
        prober.stop()
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    logs = [(workdir / f"engine.{n}.log").read_text() for n in range(procs)]
    loaded = [
        line
        for text in logs
        for line in text.splitlines()
        if "loaded (changes" in line or "mapped from" in line or "image" in line
    ]
    # A load's own log lines (the engine's): which path it took and how long it spent there.
    return {
        "prefix": prefix,
        "accounts": accounts,
        "rates": rates,
        "procs": procs,
        "image_dir": image_dir,
        "fetch": fetch,
        "cold_start": watch.as_dict(),
        "redis_latency_ms": redis_latency,
        "memory": memory,
        "load_log": loaded,
        "warm": warm,
    }


class LatencyProbe:
    """Times a small Redis command (``GET`` of a missing key) every millisecond, in a thread.

    What an engine's limits script would wait behind: Redis runs one command at a time, so a
    big reply (a whole image in one GET) delays everyone else for as long as it is copied."""

    def __init__(self, redis_url: str, interval: float = 0.001) -> None:
        import redis

        self._client = redis.Redis.from_url(redis_url, socket_timeout=10)
        self._interval = interval
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-latency", daemon=True)
        self._result: dict[str, float] | None = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = time.perf_counter()
            self._client.get("cgmemory:latency-probe")
            self._samples.append((time.perf_counter() - asked) * 1000)
            self._stop.wait(self._interval)

    def stop(self) -> dict[str, float]:
        """max, p99, p50 (ms) and the sample count; the first call stops the thread."""
        if self._result is None:
            self._stop.set()
            self._thread.join(5)
            self._client.close()
            ordered = sorted(self._samples) or [0.0]
            self._result = {
                "samples": float(len(self._samples)),
                "p50": ordered[len(ordered) // 2],
                "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
                "max": ordered[-1],
            }
        return self._result


def publish_image(redis_url: str, prefix: str, force: bool = True) -> dict[str, Any]:
    """``callgate image publish`` for ``prefix``, timed (wall, peak RSS), and the blob's size
    in Redis (``MEMORY USAGE`` of its hash), with the Redis latency meanwhile."""
    import redis

    from engine.state.keys import image_blob_key
    from engine.state.snapshot import current_version

    env = child_env()
    env.update(
        CALLGATE_REDIS_URL=redis_url, CALLGATE_REDIS__KEY_PREFIX=prefix, CALLGATE_LOGGING__LEVEL="INFO"
    )
    env.pop("CALLGATE_CONFIG", None)
    prober = LatencyProbe(redis_url)
    prober.start()
    started = time.monotonic()
    command = [str(VENV_BIN / "callgate"), "image", "publish", *(["--force"] if force else [])]
    done = subprocess.run(
        ["/usr/bin/time", "-f", "peak_rss_kb=%M", *command], env=env, capture_output=True, text=True
    )
    elapsed = time.monotonic() - started
    latency = prober.stop()
    if done.returncode != 0:
        raise RuntimeError(f"callgate image publish failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    peak = [line for line in done.stderr.splitlines() if line.startswith("peak_rss_kb=")]
    client = redis.Redis.from_url(redis_url)
    try:
        version = current_version(client, prefix)
        key = image_blob_key(prefix, version or 0)
        usage = client.memory_usage(key, samples=0)
        fields = client.hlen(key)
    finally:
        client.close()
    return {
        "seconds": elapsed,
        "output": done.stdout.strip(),
        "peak_rss_mb": int(peak[-1].split("=")[1]) / 1024 if peak else None,
        "memory_usage_mb": None if usage is None else usage / 2**20,
        "hash_fields": fields,
        "redis_latency_ms": latency,
    }


def chunk_sweep(redis_url: str, sizes_mib: list[int], total_mib: int = 256) -> list[dict[str, Any]]:
    """Per chunk size: the time to read a ``total_mib`` blob in chunks (one HGET each, as an
    engine fetches) and the latency of a concurrent small command meanwhile."""
    import os

    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    key = f"cgmemory:chunk-sweep:{os.getpid()}"
    results = []
    try:
        for size in sizes_mib:
            client.unlink(key)
            if size == 0:  # the baseline: the prober alone for a second
                prober = LatencyProbe(redis_url)
                prober.start()
                time.sleep(1.0)
                results.append(
                    {"chunk_mib": 0, "chunks": 0, "fetch_s": 0.0, "redis_latency_ms": prober.stop()}
                )
                continue
            count = max(1, total_mib // size)
            chunk = os.urandom(size << 20)
            for index in range(count):
                client.hset(key, str(index), chunk)
            del chunk
            prober = LatencyProbe(redis_url)
            prober.start()
            time.sleep(0.2)
            before = _hget_stats(client)
            started = time.monotonic()
            for index in range(count):
                client.hget(key, str(index))
            elapsed = time.monotonic() - started
            after = _hget_stats(client)
            time.sleep(0.2)
            calls = after[0] - before[0]
            results.append(
                {
                    "chunk_mib": size,
                    "chunks": count,
                    "fetch_s": elapsed,
                    "redis_latency_ms": prober.stop(),
                    # Redis' own time per HGET (INFO commandstats; the reply's writing is not in it)
                    "hget_server_ms": (after[1] - before[1]) / calls / 1000 if calls else None,
                }
            )
    finally:
        client.unlink(key)
        client.close()
    return results


def _hget_stats(client: Any) -> tuple[int, int]:
    """(calls, usec) of HGET so far, from INFO commandstats."""
    stats = client.info("commandstats").get("cmdstat_hget", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def warm_up(port: int, scale: Any, lib: Any, seconds: float, concurrency: int) -> dict[str, Any]:
    """Decide the load test's default mix against the engines for ``seconds`` (closed loop)."""
    from loadtest.driver import LoadConfig, drive

    config = LoadConfig(
        target=("127.0.0.1", port),
        concurrency=concurrency,
        duration=seconds,
        warmup=0.0,
        scale=scale,
        procs=2,
        seed=int(time.time()),
    )
    result = drive(config, library=lib)
    return {
        "seconds": seconds,
        "decided": result["decided"],
        "errors": result["errors"],
        "outcomes": result["outcomes"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", required=True, help="where loadtest.dataset published the dataset")
    parser.add_argument("--accounts", type=int, required=True)
    parser.add_argument("--rates", type=int, required=True)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument(
        "--image-dir",
        default="",
        help="engine.snapshot_image_dir for the engines: run twice, the first start writes the "
        "catalogue image, the second maps it",
    )
    parser.add_argument(
        "--warm-seconds",
        type=float,
        default=0.0,
        help="decide the load mix this long, then read the memory again (recent-entity caches filled)",
    )
    parser.add_argument("--warm-concurrency", type=int, default=50)
    parser.add_argument("--entity-cache", type=int, default=0, help="engine.entity_cache (0: its default)")
    parser.add_argument(
        "--no-fetch", action="store_true", help="engine.snapshot_image_fetch = false: no image from Redis"
    )
    parser.add_argument(
        "--publish", action="store_true", help="first build and publish the image (callgate image publish)"
    )
    parser.add_argument(
        "--chunk-sweep",
        default="",
        help="MiB sizes, e.g. 0,1,4,16,64 (0: the baseline): only time chunked reads and Redis' latency",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.chunk_sweep:
        sweep = chunk_sweep(args.redis, [int(size) for size in args.chunk_sweep.split(",")])
        for row in sweep:
            lat = row["redis_latency_ms"]
            print(
                f"chunks of {row['chunk_mib']} MiB: {row['chunks']} read in {row['fetch_s']:.2f}s; "
                f"concurrent GET p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms; "
                f"Redis' time per HGET {row.get('hget_server_ms') or 0:.2f} ms"
            )
        if args.json:
            print(json.dumps(sweep, indent=2))
        return 0
    published = publish_image(args.redis, args.prefix) if args.publish else None
    if published is not None:
        lat = published["redis_latency_ms"]
        print(
            f"image published in {published['seconds']:.1f}s (peak RSS {published['peak_rss_mb']} MB): "
            f"{published['output']}; MEMORY USAGE {published['memory_usage_mb']:.1f} MB; concurrent GET "
            f"p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms"
        )
    image_dir = args.image_dir
    if image_dir == "fresh":
        image_dir = tempfile.mkdtemp(prefix="cgmemory-images-")
    result = measure_cold_start(
        args.redis,
        args.prefix,
        args.accounts,
        args.rates,
        args.procs,
        image_dir=image_dir,
        warm_seconds=args.warm_seconds,
        warm_concurrency=args.warm_concurrency,
        entity_cache=args.entity_cache,
        fetch=not args.no_fetch,
    )
    result["published"] = published
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.accounts} accounts, {args.rates} rates, {args.procs} engine process(es)")
        print(describe(result["cold_start"], result["memory"]))
        lat = result["redis_latency_ms"]
        print(
            f"Redis meanwhile (a GET every ms): p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
            f"max {lat['max']:.2f} ms ({lat['samples']:.0f} samples)"
        )
        for line in result["load_log"]:
            print("  " + line)
        warm = result["warm"]
        if warm:
            print(
                f"after deciding the load mix for {warm['seconds']:.0f} s ({warm['decided']} calls "
                f"decided, {warm['errors']} errors): "
                + describe(result["cold_start"], warm["memory"]).split("; ", 1)[1]
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
