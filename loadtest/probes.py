"""Measurements taken around a load window: CPU of processes, Redis, the machine.

All readings are cheap (``/proc`` files, one Redis ``INFO``) so they can be taken at the
edges of a measurement window without disturbing it. A reading is a plain dict; the
difference of two readings is what a window cost.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from typing import Any

__all__ = [
    "CLK_TCK",
    "cpu_seconds",
    "machine_description",
    "postgres_connections",
    "redis_reading",
    "system_cpu",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of ``pids`` (all their threads), in seconds; exited pids count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies-as-seconds of all CPUs since boot (from /proc/stat)."""
    times = cpu_times()
    return times["busy"], times["total"]


def cpu_times() -> dict[str, float]:
    """All CPUs' time since boot by kind, in seconds: ``tasks`` (user + nice + system: what
    processes run), ``irq`` (hard + soft interrupts: on loopback, most of the TCP receive
    path of our own traffic), ``steal`` (taken by the hypervisor), ``busy`` and ``total``."""
    with open("/proc/stat", "rb") as handle:
        parts = [int(x) for x in handle.readline().split()[1:]] + [0] * 10
    user, nice, system, idle, iowait, irq, softirq, steal = parts[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return {
        "tasks": (user + nice + system) / CLK_TCK,
        "irq": (irq + softirq) / CLK_TCK,
        "steal": steal / CLK_TCK,
        "busy": (total - idle - iowait) / CLK_TCK,
        "total": total / CLK_TCK,
    }


def redis_reading(client: Any) -> dict[str, float]:
    """Redis CPU seconds and per-command call counts (``INFO cpu`` and ``commandstats``)."""
    try:
        info = client.info("cpu")
        stats = client.info("commandstats")
    except Exception:  # a probe never fails a run
        return {}
    out = {"cpu": float(info.get("used_cpu_user", 0)) + float(info.get("used_cpu_sys", 0))}
    for name, values in stats.items():
        if isinstance(values, dict) and "calls" in values:
            out[name.removeprefix("cmdstat_")] = float(values["calls"])
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def postgres_connections(pids: Iterable[int], port: int = 5432) -> int:
    """TCP connections the processes hold to ``port`` (PostgreSQL): 0 proves no per-call query."""
    wanted = set()
    for pid in pids:
        wanted |= _socket_inodes(pid)
    if not wanted:
        return 0
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    cols = line.split()
                    remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                    if remote_port == port and int(cols[9]) in wanted:
                        count += 1
        except OSError:
            continue
    return count


def machine_description() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as handle:
            mem_kb = int(handle.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    import platform

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "loadavg_at_start": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
