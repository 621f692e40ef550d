"""The account page's tabs over sub-resources: what each lists, adds, edits and deletes.

Each tab names the service calls the JSON API makes for the same sub-resource (the same rules,
scope and audit), the model its forms are drawn from, and the columns of its table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from engine.admin import schemas as s
from engine.admin.service import AdminService


class SpeedDialForm(s._In):
    """A speed dial as one form: the key and the number it dials."""

    key: s.SpeedDialKey
    number: s.Digits


Svc = AdminService


@dataclass(frozen=True)
class ListTab:
    """A tab listing rows of one sub-resource, with add, edit and delete forms."""

    slug: str
    title: str
    columns: tuple[str, ...]
    key: str  # the column naming a row in URLs
    list: Callable[[Svc, str], list[Any]]
    create_model: type[BaseModel] | None
    create: Callable[[Svc, str, Any], Any] | None
    update_model: type[BaseModel] | None = None
    update: Callable[[Svc, str, str, Any], Any] | None = None
    delete: Callable[[Svc, str, str], None] | None = None
    delete_word: str = "Delete"
    note: str = ""


@dataclass(frozen=True)
class SingleTab:
    """A tab editing one object of the account (set, and optionally clear)."""

    slug: str
    title: str
    model: type[BaseModel]
    get: Callable[[Svc, str], Any]  # None when the account has none
    set: Callable[[Svc, str, Any], Any]
    clear: Callable[[Svc, str], None] | None = None
    note: str = ""


def _forced_or_none(svc: Svc, number: str) -> Any:
    from engine.admin.errors import NotFound

    svc.get_account(number)  # NotFound for an account outside the scope, before "has none"
    try:
        return svc.get_forced_caller_id(number)
    except NotFound:
        return None


def _ip_map_key(key: str) -> int:
    from engine.admin.errors import NotFound

    if not key.isdigit() or len(key) > 18:
        raise NotFound(f"IP map entry {key} not found")
    return int(key)


LIST_TABS: tuple[ListTab, ...] = (
    ListTab(
        "sip-devices", "SIP devices",
        ("username", "active", "codecs", "caller_id_name", "caller_id_number", "context",
         "voicemail_enabled"),
        "username",
        lambda svc, n: svc.list_sip_devices(n),
        s.SipDeviceCreate, lambda svc, n, m: svc.add_sip_device(n, m),
        s.SipDeviceUpdate, lambda svc, n, k, m: svc.update_sip_device(n, k, m),
        lambda svc, n, k: svc.delete_sip_device(n, k),
        note="A password left empty is generated and shown once.",
    ),
    ListTab(
        "ip-map", "IP settings", ("id", "cidr", "tech_prefix", "name", "active"), "id",
        lambda svc, n: svc.list_ip_map(n),
        s.IpMapCreate, lambda svc, n, m: svc.add_ip_map(n, m),
        s.IpMapUpdate, lambda svc, n, k, m: svc.update_ip_map(n, _ip_map_key(k), m),
        lambda svc, n, k: svc.delete_ip_map(n, _ip_map_key(k)),
        note="Calls from these networks (with the tech prefix) are identified as this account.",
    ),
    ListTab(
        "caller-ids", "Caller IDs", ("number", "description", "active"), "number",
        lambda svc, n: svc.list_caller_ids(n),
        s.CallerIdCreate, lambda svc, n, m: svc.add_caller_id(n, m),
        s.CallerIdUpdate, lambda svc, n, k, m: svc.update_caller_id(n, k, m),
        lambda svc, n, k: svc.delete_caller_id(n, k),
    ),
    ListTab(
        "dids", "DIDs",
        ("number", "description", "active", "destination_type", "destination", "max_channels", "connect_cost",
         "cost_per_minute", "monthly_cost"),
        "number",
        lambda svc, n: svc.list_dids(n),
        s.DidAssign, lambda svc, n, m: svc.assign_did(n, m),
        s.DidUpdate, lambda svc, n, k, m: svc.update_did(n, k, m),
        lambda svc, n, k: svc.release_did(n, k),
        delete_word="Release",
        note="Assign a free DID by its number; releasing one makes it free again.",
    ),
    ListTab(
        "speed-dials", "Speed dial", ("key", "number"), "key",
        lambda svc, n: svc.list_speed_dials(n),
        SpeedDialForm, lambda svc, n, m: svc.set_speed_dial(n, m.key, s.SpeedDialIn(number=m.number)),
        s.SpeedDialIn, lambda svc, n, k, m: svc.set_speed_dial(n, k, m),
        lambda svc, n, k: svc.delete_speed_dial(n, k),
    ),
    ListTab(
        "blocked-codes", "Blocked codes", ("prefix", "description"), "prefix",
        lambda svc, n: svc.list_blocked_codes(n),
        s.BlockedCodeCreate, lambda svc, n, m: svc.add_blocked_code(n, m),
        None, None,
        lambda svc, n, k: svc.delete_blocked_code(n, k),
        note="Calls to numbers starting with a blocked prefix are refused.",
    ),
)  # fmt: skip

SINGLE_TABS: tuple[SingleTab, ...] = (
    SingleTab(
        "forced-caller-id", "Forced caller ID", s.ForcedCallerIdIn,
        _forced_or_none,
        lambda svc, n, m: svc.set_forced_caller_id(n, m),
        lambda svc, n: svc.clear_forced_caller_id(n),
        note="Every call of this account is presented with this caller ID.",
    ),
    SingleTab(
        "alert-threshold", "Alert threshold", s.AlertThreshold,
        lambda svc, n: svc.get_alert_threshold(n),
        lambda svc, n, m: svc.set_alert_threshold(n, m),
        note="An e-mail is sent when the available credit drops to this amount.",
    ),
)  # fmt: skip

LIST_BY_SLUG = {t.slug: t for t in LIST_TABS}
SINGLE_BY_SLUG = {t.slug: t for t in SINGLE_TABS}

# Every tab of the account page, in order: (slug, title).
ALL_TABS: tuple[tuple[str, str], ...] = (
    ("account", "Account"),
    *((t.slug, t.title) for t in LIST_TABS[:3]),
    ("forced-caller-id", "Forced caller ID"),
    *((t.slug, t.title) for t in LIST_TABS[3:]),
    ("alert-threshold", "Alert threshold"),
    ("refills", "Refills"),
    ("charges", "Charges & statement"),
    ("cdrs", "CDRs"),
    ("emails", "E-mails"),
    ("audit", "Audit log"),
    ("explain", "Why rejected?"),
)
