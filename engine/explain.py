"""`callgate explain`: the decision for a call, and every step that led to it, without placing it.

It reads the same Redis snapshot and runs the engine's own decider (engine.decider)
on it: the same rules, then the same limits rule over the same Redis counters, but
*peeked* (a read-only script: nothing is taken, no call is counted). Its answer is
the engine's answer for that caller at that moment, limits included; an account at
2/2 channels is explained as CONCURRENT_LIMIT.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict
from decimal import Decimal
from typing import Any

import redis

from engine.call.render import channel_variables, dial_string, reject_variables
from engine.config import Config, rules_config
from engine.decider import Decider
from engine.decision import Accept, Decision
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.state.limits import LimitsBackend, LimitsUnavailable
from engine.state.limits.redis import Limiter
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
    if document["result"] == "accept":
        lines.append(f"ACCEPT: bridge {document['dial_string']}")
        lines.append(f"  max duration {document['max_duration']} s")
    else:
        detail = f" ({document['detail']})" if document.get("detail") else ""
        lines.append(f"REJECT {document['reason']}{detail}: SIP {document['sip_response']}")
    lines += [f"  set {name}={value}" for name, value in document["variables"].items()]
    return "\n".join(lines)


def explain_call(config: Config, args: argparse.Namespace) -> int:
    client = redis.Redis.from_url(config.redis.url, socket_connect_timeout=5, socket_timeout=30)
    try:
        data = read_snapshot(client, config.redis.key_prefix)
        catalog = Catalog.build(data)
        limiter = Limiter(client, config.redis.key_prefix, margin_seconds=config.limits.margin_seconds)
        decision = explain_request(config, request_from_args(args), catalog, limiter, data.version)
        document = decision_document(decision, config, data.version)
        # The counters shown are those of the call as the rules accepted it (before the
        # limits step, which may have refused it).
        by_rules = explain_request(config, request_from_args(args), catalog, None, data.version)
        document["limits"] = limit_usage(limiter, by_rules, catalog)
    except SnapshotUnavailable:
        print("callgate: no snapshot in Redis; run `callgate sync --once` first", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
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
