"""Markdown tables from a ``loadtest.run`` JSON file (for docs/performance.md).

python -m loadtest.report loadtest-results.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from typing import Any

NAN = float("nan")


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def _degraded(result: dict[str, Any]) -> str:
    """ENGINE_DEGRADED answers, as a share of the decisions."""
    outcomes = result.get("outcomes", {})
    decided = sum(v for k, v in outcomes.items() if k != "(none)")
    degraded = outcomes.get("ENGINE_DEGRADED", 0)
    return f"{100 * degraded / decided:.0f}%" if decided else "-"


def runs_table(document: dict[str, Any]) -> str:
    lines = [
        "| scenario | server | dataset | offered CPS | achieved CPS | degraded | p50 ms | p99 ms | p99.9 ms "
        "| errors "
        "| server CPU/call (us) | server util | driver util | other jobs (cores) | capacity CPS/core "
        "| bottleneck |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, block in document["scenarios"].items():
        for r in block.get("runs", []):
            lat = r.get("latency", {})
            offered = (
                f"closed x{r['config']['concurrency']}"
                if r["config"].get("concurrency")
                else _f(r["offered_cps"], 0)
            )
            lines.append(
                f"| {name}: {r.get('label', '')} | {r['server']} | {r['dataset']} | {offered} | "
                f"{_f(r['achieved_cps'], 0)} | {_degraded(r)} | {_f(lat.get('p50_ms'))} | "
                f"{_f(lat.get('p99_ms'))} | "
                f"{_f(lat.get('p99.9_ms'))} | {r['errors']} | {_f(r.get('server_cpu_per_call_us'), 0)} | "
                f"{_f(r.get('server_cpu_utilisation'))} | {_f(r.get('driver_cpu_utilisation'))} | "
                f"{_f(r.get('foreign_cpu_cores'))} | {_f(r.get('capacity_cps_per_core'), 0)} | "
                f"{r.get('bottleneck', '')} |"
            )
    return "\n".join(lines)


def summaries(document: dict[str, Any]) -> str:
    out = []
    for name, block in document["scenarios"].items():
        if block.get("summary"):
            out.append(f"* **{name}**: `{json.dumps(block['summary'], default=lambda v: str(v))}`")
    return "\n".join(out)


def shedding_table(document: dict[str, Any]) -> str:
    """The targets scenario: decided, shed (ENGINE_DEGRADED or refused) and their latencies apart."""
    lines = [
        "| run | server | offered CPS | decided (ENGINE_DEGRADED) | refused | p50 / p99 ms, decided "
        "| p50 / p99 ms, not shed | p50 / p99 ms, shed (both kinds) | p99 ms, refused | CPU/call (us) "
        "| foreign cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pair(summary: dict[str, Any]) -> str:
        return f"{_f(summary.get('p50_ms'))} / {_f(summary.get('p99_ms'))}"

    for r in document["scenarios"].get("targets", {}).get("runs", []):
        offered = (
            f"closed x{r['config']['concurrency']}"
            if r["config"].get("concurrency")
            else _f(r["offered_cps"], 0)
        )
        lines.append(
            f"| {r.get('label', '')} | {r['server']} | {offered} | {r['decided']} ({r['degraded']}) | "
            f"{r.get('refused', 0)} | {pair(r.get('latency', {}))} | "
            f"{pair(r.get('latency_not_degraded', {}))} | "
            f"{pair(r.get('latency_shed', {}))} | {_f(r.get('latency_refused', {}).get('p99_ms'))} | "
            f"{_f(r.get('server_cpu_per_call_us'), 0)} | {_f(r.get('foreign_cpu_cores'))} |"
        )
    return "\n".join(lines)


def redis_table(document: dict[str, Any]) -> str:
    lines = [
        "| scenario | server | Redis CPU/call (us) | Redis commands per call | PostgreSQL connections |",
        "|---|---|---:|---|---:|",
    ]
    for name, block in document["scenarios"].items():
        for r in block.get("runs", []):
            if not r["server"].startswith("callgate"):
                continue
            commands = r.get("redis_commands_per_call", {})
            top = ", ".join(f"{k} {v}" for k, v in sorted(commands.items(), key=lambda kv: -kv[1])[:6])
            lines.append(
                f"| {name}: {r.get('label', '')} | {r['server']} | {_f(r.get('redis_cpu_per_call_us'), 0)} | "
                f"{top} | {r.get('server_postgres_connections', '-')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    for path in argv if argv is not None else sys.argv[1:]:
        with open(path) as handle:
            document = json.load(handle)
        machine = document.get("machine", {})
        print(
            f"<!-- {path}: {machine.get('when')} on {machine.get('cpus')} x {machine.get('cpu_model')} -->\n"
        )
        print(runs_table(document))
        print()
        print(summaries(document))
        print()
        if "targets" in document["scenarios"]:
            print(shedding_table(document))
        print()
        print(redis_table(document))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
