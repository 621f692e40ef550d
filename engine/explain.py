"""`callgate explain`: the decision for a call, and every step that led to it, without placing it.

It reads the same Redis snapshot and runs the same rules as the engine, so its
answer is the engine's answer for that caller at that moment.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis

from engine.call.render import channel_variables, dial_string, reject_variables
from engine.config import Config, rules_config
from engine.decision import Accept, Decision
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.rules.decide import DecisionContext, decide
from engine.state.limits import Limiter
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


def limit_usage(
    client: redis.Redis, config: Config, decision: Decision, catalog: Catalog
) -> list[dict[str, Any]]:
    """Current use of every limit the call would be counted against (nothing is taken)."""
    if not isinstance(decision, Accept):
        return []
    limiter = Limiter(client, config.redis.key_prefix)
    usage = limiter.usage(limiter.subjects_for(decision, catalog))
    return [_jsonable(asdict(level)) for level in usage]


def explain_request(config: Config, request: CallRequest, catalog: Catalog) -> Decision:
    ctx = DecisionContext(
        now=datetime.now(UTC), rng=random.Random(), config=rules_config(config.rules), explain=True
    )
    return decide(request, catalog, ctx)


def decision_document(decision: Decision, config: Config, snapshot_version: int) -> dict[str, Any]:
    document = _jsonable(asdict(decision))
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
        decision = explain_request(config, request_from_args(args), catalog)
        document = decision_document(decision, config, data.version)
        document["limits"] = limit_usage(client, config, decision, catalog)
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
