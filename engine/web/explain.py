""" "Why was this call rejected?": `callgate explain` for one account, from its page.

The call is identified only by the account's own data (one of its SIP devices, or an address
inside one of its IP-map networks), and the answer is shown only when the engine identifies the
call as this account: a user never learns another tenant's decision by typing its address. The
decision is the engine's own (engine.explain: the same Decider over the same Redis snapshot,
limits peeked, nothing taken).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
import redis

from engine.config import Config
from engine.decision import Accept
from engine.explain import decision_document, explain_request, limit_usage
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.state.limits.redis import Limiter
from engine.state.snapshot import SnapshotUnavailable, read_snapshot

_DIALLED = re.compile(r"[0-9*#+]{1,64}")
_CALLER = re.compile(r"[0-9+]{0,32}")


def _address_in(address: str, networks: Sequence[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def _request(form: Mapping[str, str], devices: Sequence[str], networks: Sequence[str]) -> CallRequest | str:
    """The call to explain, or what is wrong with the form."""
    dest, cid = form.get("dest", "").strip(), form.get("cid", "").strip()
    sip_user, ip = form.get("sip_user", "").strip(), form.get("ip", "").strip()
    if not _DIALLED.fullmatch(dest):
        return "The dialled number must be 1-64 digits (* # + allowed)."
    if not _CALLER.fullmatch(cid):
        return "The caller ID must be digits (at most 32)."
    if sip_user and sip_user not in devices:
        return "Choose one of this account's SIP devices."
    if ip and not _address_in(ip, networks):
        return "The address must be inside one of this account's IP-map networks."
    if not sip_user and not ip:
        return "Choose a SIP device or give an address: a call is identified by one of them."
    return CallRequest(uuid="web-explain", destination=dest, caller_id_number=cid,
                       sip_auth_username=sip_user, network_ip=ip)  # fmt: skip


_ANCESTORS = """
WITH RECURSIVE up(id) AS (
    SELECT reseller_id FROM accounts WHERE id = %s
    UNION SELECT a.reseller_id FROM accounts a JOIN up ON a.id = up.id
)
SELECT a.id, a.number FROM accounts a JOIN up ON a.id = up.id
"""


def for_reseller(document: dict[str, Any], ancestors: Mapping[int, str]) -> dict[str, Any]:
    """The document as a reseller may see it: nothing about the levels above it (`ancestors`: id ->
    account number) or the carriers, as in the accounting module's CDRs. Steps that name a level
    above or are about routing are left out (and counted), their limits dropped, the dial string
    (carrier gateways) and channel variables removed."""
    numbers = [n for n in ancestors.values() if n]

    def about_above(text: str) -> bool:
        return any(re.search(rf"\b{re.escape(n)}\b", text) for n in numbers)

    shown = [s for s in document["steps"] if s["rule"] != "routing" and not about_above(s["outcome"])]
    redacted = {
        **document,
        "steps": shown,
        "hidden_steps": len(document["steps"]) - len(shown),
        "limits": [
            u for u in document.get("limits", []) if u["level"] != "trunk" and u["id"] not in ancestors
        ],
    }
    for key in ("dial_string", "variables", "routes", "levels", "bridge_targets"):
        redacted.pop(key, None)
    if about_above(str(document.get("detail") or "")):
        redacted["detail"] = "refused at a level above yours"
    return redacted


def explain_for_account(
    config: Config,
    conn: psycopg.Connection[Any],
    number: str,
    form: Mapping[str, str],
    devices: Sequence[str],
    networks: Sequence[str],
    reseller_id: int | None = None,
) -> tuple[dict[str, Any] | None, str]:
    """(the decision document, "") or (None, why there is none). `reseller_id`: the signed-in
    reseller (None = the admin), whose view leaves out the levels above it and the carriers."""
    call = _request(form, devices, networks)
    if isinstance(call, str):
        return None, call
    row = conn.execute("SELECT id FROM accounts WHERE number = %s AND NOT deleted", [number]).fetchone()
    if row is None:
        return None, f"account {number} not found"
    client = redis.Redis.from_url(config.redis.url, socket_connect_timeout=5, socket_timeout=30)
    try:
        data = read_snapshot(client, config.redis.key_prefix)
        catalog = Catalog.build(data)
        limiter = Limiter(client, config.redis.key_prefix, margin_seconds=config.limits.margin_seconds)
        decision = explain_request(config, call, catalog, limiter, data.version)
        identified = decision.caller_account_id or decision.account_id if isinstance(decision, Accept) \
            else decision.account_id  # fmt: skip
        if identified is not None and identified != row[0]:
            return None, (f"The engine identifies this call as another account, not {number}: "
                          "check the SIP device and the IP map.")  # fmt: skip
        document = decision_document(decision, config, data.version)
        by_rules = explain_request(config, call, catalog, None, data.version)
        document["limits"] = limit_usage(limiter, by_rules, catalog)
    except SnapshotUnavailable:
        return None, "There is no snapshot in Redis yet: the sync worker has not published one."
    except redis.RedisError:
        return None, "Redis is unreachable: the decision cannot be computed now."
    finally:
        client.close()
    if reseller_id is not None:
        ancestors = {r[0]: r[1] for r in conn.execute(_ANCESTORS, [reseller_id]).fetchall()}
        document = for_reseller(document, ancestors)
    return document, ""
