"""Runs the cases with SIPp against a FreeSWITCH and collects what the callers saw.

I/O lives here (SIPp processes, hooks, /proc); what to run and how to judge it is in
:mod:`loadtest.sipp.cases` and :mod:`loadtest.sipp.results`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from loadtest.sipp import scenarios
from loadtest.sipp.cases import Caller, Case
from loadtest.sipp.results import CallResult, metric_deltas, parse_log, parse_metrics

# Gateway role -> scenario of the callee SIPp that plays it.
CALLEE_SCENARIOS = {"answer": "gw_answer.xml", "bye": "gw_answer_bye.xml", "ring": "gw_ring.xml"}
DEFAULT_CALLEE_PORTS = {"answer": 5090, "bye": 5091, "ring": 5092}


@dataclass
class RunOptions:
    fs_host: str = "127.0.0.1"
    fs_port: int = 5080
    sipp: str = "sipp"
    callee_host: str = "127.0.0.1"
    callee_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CALLEE_PORTS))
    start_callees: bool = True
    hooks: dict[str, str] = field(default_factory=dict)
    fs_pid: int | None = None
    workdir: Path | None = None
    settle: float = 2.0  # seconds after a hook before calls go out
    gap: float = 1.2  # seconds between cases: the demo accounts allow 1 call per second
    esl: tuple[str, int, str] | None = None  # FreeSWITCH inbound socket (host, port, password)
    slow_prefix: str = ""  # dialplan prefix whose socket path delays FreeSWITCH's replies
    late_prefix: str = ""  # dialplan prefix whose socket path delays what the engine sends
    metrics_url: str = ""  # the engine's /metrics: counters compared before and after each case
    devices: tuple[tuple[str, str], ...] = ()  # (username, password) to register before "devices" cases
    redis_outage: float = 40.0  # how long Redis stays down before redis-up (backoffs grow meanwhile)


def _scenario_path(name: str) -> Path:
    return scenarios.SCENARIO_DIR / name


def csv_rows(caller: Caller, dest: str, calls: int) -> str:
    """SIPp's -inf file: one line per call (destination;user;(unused);caller number;)."""
    line = f"{dest};{caller.user};;{caller.cid};\n"
    return "SEQUENTIAL\n" + line * calls


def sipp_command(
    options: RunOptions,
    scenario: str,
    caller: Caller,
    dest: str,
    inf: Path,
    log: Path,
    err: Path,
    *,
    calls: int,
    rate: float,
    timeout: float,
) -> list[str]:
    # Digest credentials on the command line: SIPp 3.6 does not expand [fieldN] inside
    # [authentication]. The digest URI must be the request URI, which FreeSWITCH checks.
    auth = (
        [
            "-au",
            caller.user,
            "-ap",
            caller.password,
            "-auth_uri",
            f"{dest}@{options.fs_host}:{options.fs_port}",
        ]
        if caller.password
        else []
    )
    return [
        options.sipp,
        f"{options.fs_host}:{options.fs_port}",
        "-sf",
        str(_scenario_path(scenario)),
        "-inf",
        str(inf),
        "-i",
        caller.ip,
        "-bind_local",
        "-m",
        str(calls),
        "-r",
        f"{rate:g}",
        "-rp",
        "1000",
        "-l",
        str(max(calls, 1)),
        "-nostdin",
        "-trace_logs",
        "-log_file",
        str(log),
        "-trace_err",
        "-error_file",
        str(err),
        "-timeout",
        f"{timeout:g}s",
        "-max_retrans",
        "3",
        *auth,
    ]


# What the suite keeps of an A leg's CHANNEL_HANGUP_COMPLETE.
CHANNEL_FIELDS = (
    "Hangup-Cause",
    "variable_sip_term_status",
    "variable_callgate_reason",
    "variable_callgate_account",
    "variable_callgate_rate",
    "variable_callgate_routes",
    "variable_callgate_reseller_chain",
    "variable_callgate_max_duration",
)


class ChannelWatcher:
    """FreeSWITCH's inbound event socket, read in a thread: the CDR (CHANNEL_HANGUP_COMPLETE)
    of every inbound call, by SIP Call-ID, so the suite can check what callgate left on the
    channel (callgate_reason and the other variables), which the SIP caller cannot see."""

    def __init__(self, host: str, port: int, password: str) -> None:
        from loadtest.lab import PyEslConnection

        self._conn = PyEslConnection(host, port, password)
        if not self._conn.connected():
            raise ConnectionError(f"cannot log in to FreeSWITCH's event socket {host}:{port}")
        reply = self._conn.events("plain", "CHANNEL_HANGUP_COMPLETE")
        if not (reply.getHeader("Reply-Text") or "").startswith("+OK"):
            raise ConnectionError("event subscription refused")
        self._seen: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esl-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self._conn.connected():
            event = self._conn.recvEventTimed(200)
            if event is None or event.getHeader("Call-Direction") != "inbound":
                continue
            call_id = event.getHeader("variable_sip_call_id") or ""
            if call_id:
                kept = {f.removeprefix("variable_"): event.getHeader(f) or "" for f in CHANNEL_FIELDS}
                with self._lock:
                    self._seen[call_id] = kept

    def attach(self, results: list[CallResult], wait: float = 3.0) -> list[CallResult]:
        """The results with each call's channel record (waiting up to ``wait`` s for the last)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._lock:
                if all(r.call_id in self._seen for r in results):
                    break
            time.sleep(0.05)
        with self._lock:
            return [replace(r, channel=self._seen.get(r.call_id, {})) for r in results]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._conn.disconnect()


@dataclass
class CaseRun:
    case_name: str
    results: list[CallResult]
    cpu_seconds: float | None = None
    wall_seconds: float = 0.0
    errors: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    metric_deltas: dict[str, float] | None = None


def fs_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of the FreeSWITCH process (all its threads), from /proc."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")


class Runner:
    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self._tmp = Path(options.workdir or tempfile.mkdtemp(prefix="cgsipp-"))
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._callees: list[subprocess.Popen[bytes]] = []
        self._count = 0
        self._registered = False
        self.watcher = ChannelWatcher(*options.esl) if options.esl else None

    # callees ---------------------------------------------------------------------------------
    def start_callees(self) -> None:
        if not self.options.start_callees:
            return
        for role, port in self.options.callee_ports.items():
            out = open(self._tmp / f"callee-{role}.out", "wb")  # noqa: SIM115 (lives as long as the process)
            self._callees.append(
                subprocess.Popen(
                    [
                        self.options.sipp,
                        "-sf",
                        str(_scenario_path(CALLEE_SCENARIOS[role])),
                        "-i",
                        self.options.callee_host,
                        "-p",
                        str(port),
                        "-bind_local",
                        "-nostdin",
                        # Answer OPTIONS (a gateway's `ping`) and the like outside the scenario.
                        "-aa",
                        "-trace_err",
                        "-error_file",
                        str(self._tmp / f"callee-{role}.err"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        time.sleep(0.5)
        dead = [quote(p.args) for p in self._callees if p.poll() is not None]  # type: ignore[arg-type]
        if dead:
            raise RuntimeError(f"a callee SIPp exited at once (port taken?): {'; '.join(dead)}")

    def stop_callees(self) -> None:
        for proc in self._callees:
            proc.terminate()
        for proc in self._callees:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()
        self._callees.clear()

    # hooks -------------------------------------------------------------------------------------
    def hook(self, name: str) -> None:
        command = self.options.hooks.get(name)
        if not command:
            raise KeyError(name)
        subprocess.run(command, shell=True, check=True, timeout=60)

    # calls -------------------------------------------------------------------------------------
    def place(
        self,
        scenario: str,
        caller: Caller,
        dest: str,
        *,
        calls: int = 1,
        rate: float = 10.0,
        timeout: float = 60.0,
    ) -> CaseRun:
        """Place ``calls`` calls with one SIPp caller; return each call's result."""
        self._count += 1
        stem = self._tmp / f"run{self._count:03d}"
        inf, log, err = stem.with_suffix(".csv"), stem.with_suffix(".log"), stem.with_suffix(".err")
        inf.write_text(csv_rows(caller, dest, calls))
        command = sipp_command(
            self.options, scenario, caller, dest, inf, log, err, calls=calls, rate=rate, timeout=timeout
        )
        cpu_before = fs_cpu_seconds(self.options.fs_pid)
        started = time.monotonic()
        overrun = ""
        try:
            subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout + 30,
                check=False,
            )
        except subprocess.TimeoutExpired:  # killed: a call still up (SIPp's -timeout waits for it)
            overrun = f"SIPp killed after {timeout + 30:g} s with a call still up\n"
        wall = time.monotonic() - started
        cpu_after = fs_cpu_seconds(self.options.fs_pid)
        results = parse_log(log.read_text(errors="replace").splitlines()) if log.exists() else []
        if self.watcher is not None:
            results = self.watcher.attach(results)
        errors = overrun + (err.read_text(errors="replace") if err.exists() else "")
        cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        return CaseRun(dest, results, cpu, wall, errors)

    def register_devices(self, expires: int = 600) -> list[str]:
        """REGISTER each device with the answering callee as its contact (``expires`` 0: remove
        the registrations); the ones that failed."""
        contact = f"{self.options.callee_host}:{self.options.callee_ports['answer']}"
        failed = []
        for user, password in self.options.devices:
            command = [
                self.options.sipp, f"{self.options.fs_host}:{self.options.fs_port}",
                "-sf", str(_scenario_path("register.xml")), "-s", user, "-au", user, "-ap", password,
                "-key", "contact", contact, "-key", "expires", str(expires),
                "-i", self.options.callee_host, "-bind_local",
                "-m", "1", "-nostdin", "-timeout", "15s",
            ]  # fmt: skip
            done = subprocess.run(
                command, stdin=subprocess.DEVNULL, capture_output=True, timeout=45, check=False
            )
            if done.returncode != 0:
                failed.append(user)
        self._registered = expires > 0
        return failed

    def run_case(self, case: Case) -> CaseRun:
        if case.needs == "devices" and not self._registered:
            failed = self.register_devices()
            if failed:
                raise RuntimeError(f"REGISTER failed for {', '.join(failed)}")
        time.sleep(self.options.gap)
        if case.hook_before:
            self.hook(case.hook_before)
            time.sleep(self.options.settle)
        recovery = "redis-recovery" in case.tags
        prefixes = {"slow-path": self.options.slow_prefix, "late-path": self.options.late_prefix}
        dest = prefixes.get(case.needs, "") + case.dest
        metrics_before = self.metrics()
        try:
            run = self.place(
                case.scenario,
                case.caller,
                dest,
                calls=case.calls,
                rate=case.rate,
                timeout=case.wait_seconds,
            )
            if recovery:
                time.sleep(max(0.0, self.options.redis_outage - run.wall_seconds - self.options.settle))
                run.extra["outage_seconds"] = self.options.redis_outage
                run.extra["recovery_seconds"] = self.recovery_after(case.hook_after, case.caller, case.dest)
        finally:
            if case.hook_after and not recovery:
                self.hook(case.hook_after)
                time.sleep(self.options.settle)
        run.case_name = case.name
        metrics_after = self.metrics() if metrics_before is not None else None
        if metrics_before is not None and metrics_after is not None:
            run.metric_deltas = metric_deltas(metrics_before, metrics_after)
        return run

    def metrics(self) -> dict[str, float] | None:
        """The engine's counters, or None (not asked for, or the engine is down: a case that
        stops it compares nothing)."""
        if not self.options.metrics_url:
            return None
        time.sleep(0.3)  # the engine counts a connection's end once its socket closed
        try:
            with urllib.request.urlopen(self.options.metrics_url, timeout=5) as response:
                return parse_metrics(response.read().decode())
        except OSError:
            return None

    def recovery_after(self, hook: str, caller: Caller, dest: str, limit: float = 90.0) -> float:
        """Run ``hook``, then place a call every 0.5 s: seconds until the first one is answered
        (each probe takes ~0.2 s itself, so the resolution is ~0.7 s)."""
        self.hook(hook)
        started = time.monotonic()
        while time.monotonic() - started < limit:
            run = self.place("caller_short.xml", caller, dest, timeout=15)
            if any(r.final_code == "200" for r in run.results):
                return round(time.monotonic() - started, 2)
            time.sleep(0.5)
        return float("inf")

    # post-dial delay ---------------------------------------------------------------------------
    def pdd(
        self,
        variants: Sequence[tuple[str, str]],
        caller: Caller,
        dest: str,
        *,
        calls: int,
        rate: float,
        rounds: int,
        scenario: str = "caller_short.xml",
        progress: Callable[[str], None] = lambda _: None,
    ) -> dict[str, list[CaseRun]]:
        """Interleaved batches (A, B, ..., A, B, ...) so that drift on a busy machine hits every
        variant alike; per batch the callers' results and FreeSWITCH's CPU."""
        out: dict[str, list[CaseRun]] = {label: [] for label, _ in variants}
        for round_no in range(rounds):
            for label, prefix in variants:
                run = self.place(
                    scenario,
                    caller,
                    prefix + dest,
                    calls=calls,
                    rate=rate,
                    timeout=calls / rate + 30,
                )
                run.case_name = label
                out[label].append(run)
                progress(f"pdd round {round_no + 1}/{rounds} {label}: {len(run.results)} calls")
                time.sleep(1.0)  # let the previous batch's hangups finish
        return out


@contextlib.contextmanager
def running(options: RunOptions) -> Iterator[Runner]:
    if shutil.which(options.sipp) is None:
        raise SystemExit(f"{options.sipp}: not found (Debian/Ubuntu: apt-get install sip-tester)")
    runner = Runner(options)
    try:
        runner.start_callees()
        yield runner
    finally:
        if runner._registered:
            runner.register_devices(expires=0)  # leave no registration behind for the next run
        runner.stop_callees()
        if runner.watcher is not None:
            runner.watcher.close()


def parse_hooks(items: Sequence[str]) -> dict[str, str]:
    hooks: dict[str, str] = {}
    for item in items:
        name, sep, command = item.partition("=")
        if not sep or not name or not command:
            raise ValueError(f"--hook wants NAME=COMMAND, got {item!r}")
        hooks[name.strip()] = command
    return hooks


def parse_ports(text: str) -> dict[str, int]:
    """``answer=5090,bye=5091,ring=5092`` -> {role: port}; every role must be named."""
    ports: dict[str, int] = {}
    for part in text.split(","):
        role, sep, port = part.partition("=")
        if not sep or role.strip() not in CALLEE_SCENARIOS:
            raise ValueError(f"callee ports: roles are {', '.join(CALLEE_SCENARIOS)}; got {part!r}")
        ports[role.strip()] = int(port)
    missing = set(CALLEE_SCENARIOS) - set(ports)
    if missing:
        raise ValueError(f"callee ports: missing {', '.join(sorted(missing))}")
    return ports


def quote(command: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in command)
