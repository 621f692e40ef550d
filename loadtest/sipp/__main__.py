"""SIPp scenario suite against a real FreeSWITCH running callgate's dialplan.

    python -m loadtest.sipp --fs 127.0.0.1:5080 [--only demo-01,limits] [--fs-pid PID] \\
        [--hook engine-down='...' --hook engine-up='...' --hook redis-down='...' ...] [--slow]
    python -m loadtest.sipp catalogue > lab.yaml      # the callgate data the suite expects
    python -m loadtest.sipp scenarios [--write]       # check (or rewrite) the committed XML
    python -m loadtest.sipp delay-proxy --listen H:P --to H:P --delay S --towards engine|switch

What FreeSWITCH and callgate must be configured with: docs/real-switch-lab.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from loadtest.sipp import cases as cs
from loadtest.sipp import fixture, scenarios
from loadtest.sipp.results import pdd_summary, table
from loadtest.sipp.runner import CaseRun, RunOptions, parse_hooks, parse_ports, running

HEADER = ("case", "group", "what", "calls", "expected", "observed", "PDD p50 ms", "notes", "verdict")


def case_row(case: cs.Case, run: CaseRun) -> list[str]:
    verdict = cs.check(case, run.results, run.metric_deltas)
    expected = ", ".join(f"{n}x{code}" for code, n in sorted(case.expect.codes.items()))
    pdd = pdd_summary(run.results)
    notes = list(verdict.notes)
    for key, value in run.extra.items():
        notes.append(f"{key} {value:g}")
    return [
        case.name,
        case.group,
        case.what,
        str(case.calls),
        expected,
        verdict.observed or "-",
        f"{pdd['p50']:.1f}" if pdd.get("n") else "-",
        "; ".join(notes),
        "PASS" if verdict.ok else "FAIL",
    ]


def pdd_rows(batches: dict[str, list[CaseRun]]) -> tuple[list[list[str]], dict[str, Any]]:
    rows: list[list[str]] = []
    raw: dict[str, Any] = {}
    for label, runs in batches.items():
        results = [r for run in runs for r in run.results]
        summary = pdd_summary(results)
        cpu = [run.cpu_seconds for run in runs if run.cpu_seconds is not None]
        answered = sum(1 for r in results if r.final_code == "200")
        cpu_ms = (sum(cpu) * 1000 / len(results)) if cpu and results else None
        raw[label] = {
            "pdd_ms": summary,
            "calls": len(results),
            "answered": answered,
            "fs_cpu_ms_per_call": cpu_ms,
        }
        rows.append(
            [
                label,
                str(len(results)),
                str(answered),
                *(f"{summary[k]:.1f}" if summary.get("n") else "-" for k in ("p50", "mean", "p90", "max")),
                f"{cpu_ms:.1f}" if cpu_ms is not None else "-",
            ]
        )
    return rows, raw


def _variants(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        label, sep, prefix = item.partition("=")
        if not sep:
            raise SystemExit(f"--pdd-variant wants LABEL=PREFIX, got {item!r}")
        out.append((label, prefix))
    return out


def _esl(address: str, password: str) -> tuple[str, int, str] | None:
    if not address:
        return None
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port), password


def run_suite(args: argparse.Namespace) -> int:
    host, _, port = args.fs.rpartition(":")
    options = RunOptions(
        fs_host=host or "127.0.0.1",
        fs_port=int(port),
        sipp=args.sipp,
        callee_host=args.callee_host,
        callee_ports=parse_ports(args.callee_ports),
        start_callees=not args.no_callees,
        hooks=parse_hooks(args.hook),
        fs_pid=args.fs_pid,
        settle=args.settle,
        gap=args.gap,
        redis_outage=args.redis_outage,
        esl=_esl(args.esl, args.esl_password),
        slow_prefix=args.slow_prefix,
        late_prefix=args.late_prefix,
        metrics_url=args.metrics,
        devices=(cs.ALICE, cs.BRIGHT) if args.register_devices else (),
    )
    all_cases = cs.demo_cases() + cs.lab_cases(args.max_duration, args.pdd_calls)
    only = [x for x in (args.only or "").split(",") if x]
    available = set(options.hooks) | {
        path for path, prefix in (("slow-path", args.slow_prefix), ("late-path", args.late_prefix)) if prefix
    }
    if args.register_devices:
        available.add("devices")
    chosen, skipped = cs.select(all_cases, only, available, args.slow)
    want_pdd = not only or "pdd" in only
    report: dict[str, Any] = {"cases": [], "skipped": [], "pdd": {}}
    rows: list[list[str]] = []
    with running(options) as runner:
        for case in chosen:
            print(f"... {case.name}: {case.what}", file=sys.stderr, flush=True)
            run = runner.run_case(case)
            row = case_row(case, run)
            rows.append(row)
            report["cases"].append(
                {
                    "case": case.name,
                    "row": dict(zip(HEADER, row, strict=True)),
                    "calls": [r.__dict__ | {"pdd_ms": r.pdd_ms, "final_ms": r.final_ms} for r in run.results],
                    "extra": run.extra,
                    "sipp_errors": run.errors[-2000:],
                }
            )
        pdd_batches = {}
        if want_pdd:
            variants = [("callgate", ""), ("static bridge", args.static_prefix), *_variants(args.pdd_variant)]
            pdd_batches = runner.pdd(
                variants,
                cs.LAB,
                fixture.ANSWER_PREFIX + "0001",
                calls=args.pdd_calls,
                rate=args.pdd_rate,
                rounds=args.pdd_rounds,
                scenario=args.pdd_scenario,
                progress=lambda m: print("... " + m, file=sys.stderr, flush=True),
            )
    print(table(rows, HEADER))
    for case, why in skipped:
        print(f"skipped {case.name}: {why}")
        report["skipped"].append({"case": case.name, "why": why})
    if pdd_batches:
        pdd_table, raw = pdd_rows(pdd_batches)
        report["pdd"] = raw
        print()
        print(
            f"Post-dial delay (INVITE -> first 18x at the caller), {args.pdd_rounds} interleaved rounds of "
            f"{args.pdd_calls} calls at {args.pdd_rate:g} CPS per variant; FreeSWITCH CPU from /proc:"
        )
        print(
            table(pdd_table, ("variant", "calls", "answered", "p50", "mean", "p90", "max", "FS CPU ms/call"))
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
    failed = sum(1 for row in rows if row[-1] != "PASS")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["delay-proxy"]:
        from loadtest.sipp import delayproxy

        return delayproxy.main(argv[1:])
    if argv[:1] == ["catalogue"]:
        sys.stdout.write(fixture.render())
        return 0
    if argv[:1] == ["scenarios"]:
        if "--write" in argv:
            for path in scenarios.write():
                print(path)
            return 0
        stale = [
            name
            for name, text in scenarios.rendered().items()
            if not (scenarios.SCENARIO_DIR / name).exists()
            or (scenarios.SCENARIO_DIR / name).read_text() != text
        ]
        print("stale: " + ", ".join(stale) if stale else "scenarios are current")
        return 1 if stale else 0
    parser = argparse.ArgumentParser(prog="python -m loadtest.sipp", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fs", default="127.0.0.1:5080", help="FreeSWITCH SIP profile host:port (callgate's dialplan)"
    )
    parser.add_argument("--sipp", default="sipp")
    parser.add_argument(
        "--only", default="", help="comma-separated case names or groups (demo-01, limits, pdd, ...)"
    )
    parser.add_argument("--callee-host", default="127.0.0.1")
    parser.add_argument(
        "--callee-ports",
        default="answer=5090,bye=5091,ring=5092",
        help="where FreeSWITCH's gateways point: the callee SIPp per role",
    )
    parser.add_argument("--no-callees", action="store_true", help="callees run elsewhere; do not start them")
    parser.add_argument(
        "--hook",
        action="append",
        default=[],
        help="NAME=COMMAND; names: engine-down, engine-up, engine-freeze, engine-thaw, redis-down, redis-up",
    )
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after a hook before calling")
    parser.add_argument(
        "--gap", type=float, default=1.2, help="seconds between cases (alice may place 1 call/s)"
    )
    parser.add_argument(
        "--redis-outage", type=float, default=40.0, help="seconds Redis stays down in redis-down"
    )
    parser.add_argument(
        "--slow", action="store_true", help="also the cases that take long by design (frozen engine)"
    )
    parser.add_argument(
        "--max-duration",
        type=float,
        default=5.0,
        help="the allowance callgate gives the lab's calls (set rules.call_max_length to it)",
    )
    parser.add_argument(
        "--esl", default="", help="FreeSWITCH inbound event socket host:port: check the CDRs too"
    )
    parser.add_argument("--esl-password", default="ClueCon")
    parser.add_argument("--fs-pid", type=int, default=None, help="FreeSWITCH's pid (same host): CPU per call")
    parser.add_argument(
        "--slow-prefix",
        default="",
        help="dialplan prefix whose socket path delays FreeSWITCH's replies (slow-replies case)",
    )
    parser.add_argument(
        "--late-prefix",
        default="",
        help="dialplan prefix whose socket path delays what the engine sends (abandoned case)",
    )
    parser.add_argument(
        "--register-devices",
        action="store_true",
        help="register alice and 2000000101 (contact: the answering callee) for the devices cases",
    )
    parser.add_argument("--metrics", default="", help="the engine's metrics URL: check its counters per case")
    parser.add_argument(
        "--static-prefix", default="static", help="dialplan prefix of the static-bridge extension"
    )
    parser.add_argument(
        "--pdd-variant", action="append", default=[], help="LABEL=PREFIX: more extensions to compare"
    )
    parser.add_argument("--pdd-calls", type=int, default=20)
    parser.add_argument("--pdd-rate", type=float, default=10.0)
    parser.add_argument("--pdd-rounds", type=int, default=3)
    parser.add_argument(
        "--pdd-scenario",
        default="caller_short.xml",
        choices=("caller_short.xml", "caller.xml"),
        help="caller of the delay batches: hangs up 0.5 s or 2 s after the answer",
    )
    parser.add_argument("--json", default=None)
    return run_suite(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
