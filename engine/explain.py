"""`callgate explain`: the decision for a call, and every step that led to it, without placing it.

It reads the same Redis snapshot and runs the engine's own decider (engine.decider)
on it: the same rules, then the same limits rule over the same Redis counters, but
*peeked* (a read-only script: nothing is taken, no call is counted). Its answer is
the engine's answer for that caller at that moment, limits included; an account at
2/2 channels is explained as CONCURRENT_LIMIT.

Funds (issue 13): for an accepted call it shows, per paying chain level, the funds available
(balance or credit, minus what Redis holds as reserved by open calls and as spent but not yet
recorded in PostgreSQL), the reservations in force, and the duration the call would get (the
seconds every level can pay, less FreeSWITCH's rounding second: what ``sched_hangup`` would be
given). A level that cannot pay a minute turns the answer into NO_SUFFICIENT_FUND, as the
engine's reservation would. Reservations past their deadline are still counted here until the
next reservation on the account purges them (explain writes nothing).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, replace
from decimal import Decimal
from typing import Any

import redis

from engine.billing.calls import funds_levels
from engine.billing.funds import Funds, FundsUnavailable
from engine.billing.live import affordable_seconds, granted_duration, reservation_for
from engine.billing.rating import to_micros
from engine.call.render import channel_variables, dial_string, reject_variables
from engine.config import Config, rules_config
from engine.decider import Decider
from engine.decision import Accept, Decision, Reason, Reject
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.state.limits import LimitsBackend, LimitsUnavailable
from engine.state.limits.redis import Limiter
from engine.state.redisconn import redis_client
from engine.state.snapshot import SnapshotUnavailable, read_snapshot

EXIT_REJECTED = 3


def request_from_args(args: argparse.Namespace) -> CallRequest:
    return CallRequest(
        uuid="explain",
        destination=args.dest,
        caller_id_number=args.cid,
        caller_id_name=args.cid_name,
        sip_auth_username=args.sip_user or "",
        network_ip=args.ip or "",
    )


class _SnapshotJustRead:
    """The decider's catalogue source: the snapshot this command has just read."""

    loaded = True
    switching_since: float | None = None

    def __init__(self, version: int, catalog: Catalog) -> None:
        self.current = (version, catalog)

    def confirmed_age(self) -> float:
        return 0.0


def limit_usage(limiter: LimitsBackend, decision: Decision, catalog: Catalog) -> list[dict[str, Any]]:
    """Current use of every limit the call would be counted against (nothing is taken)."""
    if not isinstance(decision, Accept):
        return []
    try:
        usage = limiter.usage(limiter.subjects_for(decision, catalog))
    except LimitsUnavailable:
        return []  # the decision already says ENGINE_DEGRADED, with the error
    return [_jsonable(asdict(level)) for level in usage]


def explain_request(
    config: Config, request: CallRequest, catalog: Catalog, limiter: LimitsBackend | None, version: int = 0
) -> Decision:
    """The engine's decision for ``request``: rules, then limits peeked (when ``limiter``)."""
    decider = Decider(
        _SnapshotJustRead(version, catalog),
        rules_config(config.rules),
        max_age=float("inf"),
        limiter=limiter,
        rng=random.Random(),
    )
    return decider(request, explain=True)


def funds_view(funds: Funds, decision: Decision, catalog: Catalog) -> tuple[Decision, list[dict[str, Any]]]:
    """The decision once the funds are counted, and what each paying level holds (read only)."""
    if not isinstance(decision, Accept):
        return decision, []
    pricing, request = reservation_for(funds, decision, catalog)
    if request is None:
        return decision, []
    rows: list[dict[str, Any]] = []
    granted = request.cap_seconds
    refused: int | None = None
    for position, level in enumerate(funds_levels(pricing, catalog)):
        state = funds.account(level.account_id)
        available = funds.available(level)
        seconds = affordable_seconds(to_micros(available), level.args(), request.cap_seconds)
        account = catalog.accounts.get(level.account_id)
        rows.append(
            {
                "account": account.number if account is not None else str(level.account_id),
                "balance_or_credit": str(level.base),
                "recorded_debits": str(level.recorded),
                "spent_in_redis": None if state.spent is None else str(state.spent),
                "reserved": str(state.reserved),
                "open_reservations": state.open_calls,
                "available": str(available),
                "affordable_seconds": seconds,
            }
        )
        if seconds < 0:
            refused = position if refused is None else refused
        else:
            granted = min(granted, seconds)
    if refused is not None:
        who = rows[refused]["account"]
        detail = (
            f"{who}: {rows[refused]['available']} available does not pay a minute (open calls hold the rest)"
        )
        return Reject(Reason.NO_SUFFICIENT_FUND, decision.account_id, detail, decision.steps), rows
    return replace(decision, max_duration=granted_duration(granted, decision.max_duration)), rows


def decision_document(decision: Decision, config: Config, snapshot_version: int) -> dict[str, Any]:
    document: dict[str, Any] = _jsonable(asdict(decision))
    document["result"] = "accept" if isinstance(decision, Accept) else "reject"
    document["snapshot_version"] = snapshot_version
    if isinstance(decision, Accept):
        document["dial_string"] = dial_string(decision)
        document["variables"] = dict(channel_variables(decision))
    else:
        code, text = rules_config(config.rules).sip_response(decision.reason)
        document["sip_response"] = f"{code} {text}"
        document["variables"] = dict(reject_variables(decision))
    return document


def render_text(document: dict[str, Any]) -> str:
    lines = [f"snapshot {document['snapshot_version']}"]
    lines += [f"  {step['rule']}: {step['outcome']}" for step in document["steps"]]
    for usage in document.get("limits", []):
        channels = "-" if usage["channels"] is None else usage["channels"]
        cps = "-" if usage["calls_last_second"] is None else usage["calls_last_second"]
        max_channels = usage["max_channels"] or "unlimited"
        max_cps = usage["cps"] or "unlimited"
        lines.append(
            f"  limits: {usage['level']} {usage['id']}: channels {channels}/{max_channels}, "
            f"calls in the last second {cps}/{max_cps}"
        )
    for row in document.get("funds", []):
        lines.append(
            f"  funds: {row['account']}: available {row['available']} (balance/credit "
            f"{row['balance_or_credit']}, reserved {row['reserved']} by {row['open_reservations']} "
            f"open calls, spent in Redis {row['spent_in_redis'] or '-'}, "
            f"recorded {row['recorded_debits']}); "
            f"pays {row['affordable_seconds']} s"
        )
    if document["result"] == "accept":
        lines.append(f"ACCEPT: bridge {document['dial_string']}")
        lines.append(f"  max duration {document['max_duration']} s")
    else:
        detail = f" ({document['detail']})" if document.get("detail") else ""
        lines.append(f"REJECT {document['reason']}{detail}: SIP {document['sip_response']}")
    lines += [f"  set {name}={value}" for name, value in document["variables"].items()]
    return "\n".join(lines)


def explain_call(config: Config, args: argparse.Namespace) -> int:
    client = redis_client(config.redis, socket_connect_timeout=5, socket_timeout=30)
    try:
        data = read_snapshot(client, config.redis.key_prefix)
        catalog = Catalog.build(data)
        limiter = Limiter(client, config.redis.key_prefix, margin_seconds=config.limits.margin_seconds)
        decision = explain_request(config, request_from_args(args), catalog, limiter, data.version)
        funds = Funds(client, config.redis.key_prefix, margin_seconds=config.limits.margin_seconds)
        decision, funds_rows = funds_view(funds, decision, catalog)
        document = decision_document(decision, config, data.version)
        document["funds"] = funds_rows
        # The counters shown are those of the call as the rules accepted it (before the
        # limits step, which may have refused it).
        by_rules = explain_request(config, request_from_args(args), catalog, None, data.version)
        document["limits"] = limit_usage(limiter, by_rules, catalog)
    except SnapshotUnavailable:
        print("callgate: no snapshot in Redis; run `callgate sync --once` first", file=sys.stderr)
        return 1
    except (redis.RedisError, FundsUnavailable) as exc:
        print(f"callgate: Redis unreachable: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(document, indent=2) if args.json else render_text(document))
    return 0 if isinstance(decision, Accept) else EXIT_REJECTED


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, Decimal):
        return str(value)
    return value
