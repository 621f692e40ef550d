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

from engine.config import Config, rules_config
from engine.decision import Accept, Decision
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.rules.decide import DecisionContext, decide
from engine.rules.variables import channel_variables, reject_variables
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


def load_catalog_from_redis(config: Config) -> tuple[int, Catalog]:
    client = redis.Redis.from_url(config.redis.url, socket_connect_timeout=5, socket_timeout=30)
    try:
        data = read_snapshot(client, config.redis.key_prefix)
    finally:
        client.close()
    return data.version, Catalog.build(data)


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
        document["dial_string"] = decision.dial_string
        document["variables"] = dict(channel_variables(decision))
    else:
        code, text = rules_config(config.rules).sip_response(decision.reason)
        document["sip_response"] = f"{code} {text}"
        document["variables"] = dict(reject_variables(decision))
    return document


def render_text(document: dict[str, Any]) -> str:
    lines = [f"snapshot {document['snapshot_version']}"]
    lines += [f"  {step['rule']}: {step['outcome']}" for step in document["steps"]]
    if document["result"] == "accept":
        lines.append(f"ACCEPT: bridge {document['dial_string']}")
        lines.append(f"  max duration {document['max_duration']} s")
    else:
        detail = f" ({document['detail']})" if document.get("detail") else ""
        lines.append(f"REJECT {document['reason']}{detail}: SIP {document['sip_response']}")
    lines += [f"  set {name}={value}" for name, value in document["variables"].items()]
    return "\n".join(lines)


def explain_call(config: Config, args: argparse.Namespace) -> int:
    try:
        version, catalog = load_catalog_from_redis(config)
    except SnapshotUnavailable:
        print("callgate: no snapshot in Redis; run `callgate sync --once` first", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"callgate: Redis unreachable: {exc}", file=sys.stderr)
        return 1
    decision = explain_request(config, request_from_args(args), catalog)
    document = decision_document(decision, config, version)
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
