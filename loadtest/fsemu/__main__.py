"""Command line of the FreeSWITCH emulator.

    python -m loadtest.fsemu call --engine 127.0.0.1:8084 --from-user 1001 \\
        --source-ip 10.0.0.5 --dest 4412345678 [--cid 123] [--hold 2] \\
        [--answer-gateways gw1,gw2] [--json]

places one call on the engine and prints what the engine decided and what the SIP
caller saw (exit status 0 when the emulator saw no error).

    python -m loadtest.fsemu load --engine 127.0.0.1:8084 --calls 200 --concurrency 50 ...

places many calls and prints a summary.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from uuid import uuid4

from .outbound import CallResult, CallSpec, gateways_answering, place_call, run_calls


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 8084
    return host.strip("[]"), int(port)


def _add_call_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="127.0.0.1:8084", help="host:port of the engine (default %(default)s)")
    p.add_argument("--dest", required=True, help="destination number (Caller-Destination-Number)")
    p.add_argument("--from-user", default="1000", help="SIP From user (Caller-Username, sip_from_user)")
    p.add_argument("--cid", default=None, help="caller ID number (default: the From user)")
    p.add_argument("--cid-name", default="", help="caller ID name")
    p.add_argument("--source-ip", default="127.0.0.1", help="caller's address (sip_network_ip)")
    p.add_argument("--auth-user", default="", help="digest-authenticated user (sip_auth_username)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="extra channel variable")
    p.add_argument("--hold", type=float, default=0.0, help="seconds an answered call stays up")
    p.add_argument(
        "--answer-gateways",
        default=None,
        help="comma-separated names; only dial targets naming one of them answer (default: all answer)",
    )
    p.add_argument("--mode", default="async full", help='socket mode (default "%(default)s")')
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")


def _spec(args: argparse.Namespace) -> CallSpec:
    extra = {}
    for item in args.var:
        name, _, value = item.partition("=")
        extra[name] = value
    answering = gateways_answering(args.answer_gateways.split(",")) if args.answer_gateways else None
    return CallSpec(
        destination=args.dest,
        caller_id_number=args.cid or args.from_user,
        caller_id_name=args.cid_name,
        from_user=args.from_user,
        network_ip=args.source_ip,
        sip_auth_username=args.auth_user,
        extra_variables=extra,
        hold_seconds=args.hold,
        answering_targets=answering,
        socket_mode=args.mode,
    )


def _as_dict(result: CallResult) -> dict[str, object]:
    return dataclasses.asdict(result)


def _describe(r: CallResult) -> str:
    lines = [f"call {r.uuid}"]
    if not r.connected:
        lines.append("engine:      did not connect" + (f" ({r.error})" if r.error else ""))
    else:
        lat = f"{r.decision_latency * 1000:.1f} ms" if r.decision_latency is not None else "none"
        lines.append(f"engine:      connected; decision after {lat}")
    lines.append("commands:    " + (", ".join(r.commands) or "-"))
    for app, arg in r.executed:
        lines.append(f"executed:    {app} {arg}".rstrip())
    if r.variables:
        lines.append("variables:   " + ", ".join(f"{k}={v}" for k, v in r.variables.items()))
    if r.attempted_targets:
        lines.append("dialled:     " + " | ".join(r.attempted_targets))
    if r.sip_response:
        code, text = r.sip_response
        extra = f", bridged to {r.bridged_target}" if r.bridged_target else ""
        extra += f", billsec {r.billsec}" if r.answered else ""
        lines.append(f"caller saw:  {code} {text}{extra}")
    lines.append(f"hangup:      {r.hangup_cause or '-'}")
    if r.closed_by == "engine":
        closed = "by the engine"
        if r.engine_closed:
            closed += " after CHANNEL_HANGUP_COMPLETE"
        elif r.uncontrolled:
            closed += " while the call was up"
    else:
        closed = f"by {r.closed_by or '-'}"
    lines.append(f"socket:      closed {closed}")
    if r.error:
        lines.append(f"error:       {r.error}")
    return "\n".join(lines)


def _cmd_call(args: argparse.Namespace) -> int:
    host, port = _host_port(args.engine)
    timeout = args.timeout if args.timeout is not None else args.hold + 30.0
    result = place_call(host, port, _spec(args), timeout=timeout)
    if args.json:
        print(json.dumps(_as_dict(result), indent=2))
    else:
        print(_describe(result))
    return 0 if result.error is None else 1


def _cmd_load(args: argparse.Namespace) -> int:
    host, port = _host_port(args.engine)
    timeout = args.timeout if args.timeout is not None else args.hold + 30.0
    base = _spec(args)
    specs = [dataclasses.replace(base, uuid=str(uuid4())) for _ in range(args.calls)]
    t0 = time.monotonic()
    results = run_calls(host, port, specs, args.concurrency, timeout=timeout)
    wall = time.monotonic() - t0
    outcomes = collections.Counter(
        f"{r.sip_response[0]} {r.sip_response[1]}" if r.sip_response else "no response" for r in results
    )
    latencies = sorted(r.decision_latency for r in results if r.decision_latency is not None)
    errors = collections.Counter((r.error or "").split("\n")[0] for r in results if r.error)

    def pct(q: float) -> str:
        if not latencies:
            return "-"
        return f"{latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000:.1f} ms"

    summary = {
        "calls": len(results),
        "wall_seconds": round(wall, 3),
        "calls_per_second": round(len(results) / wall, 1) if wall else None,
        "outcomes": dict(outcomes),
        "decision_latency": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        "engine_closed": sum(r.engine_closed for r in results),
        "errors": dict(errors),
    }
    print(json.dumps(summary, indent=2))
    return 0 if not errors else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fsemu", description="FreeSWITCH emulator")
    sub = parser.add_subparsers(dest="command", required=True)
    p_call = sub.add_parser("call", help="place one call on the engine")
    _add_call_options(p_call)
    p_call.add_argument("--json", action="store_true", help="print the CallResult as JSON")
    p_call.set_defaults(func=_cmd_call)
    p_load = sub.add_parser("load", help="place many calls and summarise")
    _add_call_options(p_load)
    p_load.add_argument("--calls", type=int, default=100)
    p_load.add_argument("--concurrency", type=int, default=20)
    p_load.set_defaults(func=_cmd_load)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
