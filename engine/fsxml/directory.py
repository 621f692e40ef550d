"""What callgate tells FreeSWITCH: the index of devices, accounts and gateways, and the answers.

:class:`Directory` is what :class:`engine.state.watcher.SnapshotHolder` builds from each
snapshot (``Directory.build``) and then updates in place from the live sync's changes
(``track_changes`` / ``apply_changes``, the holder's protocol): it keeps only the three
entity types the answers need and ignores the others, so a rate-deck change costs nothing
here. Like the engine's catalogue it is changed only in the gevent hub, without yielding,
so an answer sees a change whole or not at all.

:class:`Answers` turns a :class:`~engine.fsxml.request.Lookup` into the XML bytes:

* **users** of the configured domain. callgate is authoritative for that domain: a user it
  cannot serve (unknown, device inactive, account inactive or deleted) is answered with the
  domain and no such user, so FreeSWITCH refuses it (digest auth: 403; ``user/``:
  SUBSCRIBER_ABSENT) instead of falling back to its own XML. The credential is the
  device's ``a1-hash``, MD5(user:realm:password), as the snapshot carries it: made by the
  sync for the configured domain (the realm), so a lookup whose ``sip_auth_realm`` is
  another realm finds no user either (logged, at most once a minute). The password is in
  neither the snapshot nor the answer. ``allow-empty-password=false`` makes a device
  without a hash (no password, or no realm configured for the sync) unusable.
* **gateways** (``purpose=gateways`` for the domain or ``all``, and sofia.conf from a
  template): the active gateways of the asking profile, with the carrier password that
  ``engine.fsxml.credentials`` read from PostgreSQL (the snapshot has none).
* everything else: ``not found`` (FreeSWITCH then uses its next binding or its own XML).
"""

from __future__ import annotations

import hashlib
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from engine.fsxml import render
from engine.fsxml.request import Kind, Lookup
from engine.model import Account, CatalogData, Gateway, SipDevice

DIAL_STRING = (
    "{^^:sip_invite_domain=${dialed_domain}:presence_id=${dialed_user}@${dialed_domain}}"
    "${sofia_contact(*/${dialed_user}@${dialed_domain})}"
)
"""The domain's dial-string: how FreeSWITCH's ``user/<name>@<domain>`` reaches a registered device
(the engine bridges on-net calls and DIDs of devices that way)."""

GATEWAYS_USER = "callgate-gateways"
"""The user that carries the gateways in a ``purpose=gateways`` answer. Sofia reads only its
``<gateways>`` there; that answer is a document of its own, so a device of the same name is
served by user lookups like any other."""


_ENTITIES = ("sip_devices", "accounts", "gateways")
_LOG_EVERY = 60.0

log = logging.getLogger("callgate.fsxml")

PasswordOf = Callable[[int], str]
"""gateway id -> its carrier password ("" when it has none or it is not known)."""


def _no_password(gateway_id: int) -> str:
    return ""


class Directory:
    """Devices by username, accounts and gateways by id, from one snapshot."""

    def __init__(
        self,
        devices: Iterable[SipDevice] = (),
        accounts: Iterable[Account] = (),
        gateways: Iterable[Gateway] = (),
        version: int = 0,
    ) -> None:
        self.version = version
        self._device_by_id: dict[int, SipDevice] = {}
        self._device_by_username: dict[str, SipDevice] = {}
        self._shared: dict[str, set[int]] = {}  # usernames held by several device ids (never, in practice)
        self._accounts: dict[int, Account] = {a.id: a for a in accounts}
        self._gateways: dict[int, Gateway] = {g.id: g for g in gateways}
        for device in sorted(devices, key=lambda d: d.id):
            self._put_device(device)

    @classmethod
    def build(cls, data: CatalogData) -> Directory:
        return cls(data.sip_devices, data.accounts, data.gateways, data.version)

    def calls_debited(self, account_id: int) -> Decimal | None:
        """The account's ``calls_debited`` in this snapshot (the CDR post's settle needs it)."""
        account = self._accounts.get(account_id)
        return None if account is None else account.calls_debited

    # --- the holder's in-place protocol --------------------------------------------------------

    def track_changes(self, data: CatalogData) -> None:
        """Nothing to prepare: the indexes above are all the rows changes need."""

    def apply_changes(
        self,
        upserts: Iterable[Any],
        deletes: Iterable[tuple[str, str]],
        before: Mapping[tuple[str, str], Any] | None = None,
    ) -> list[str]:
        """Apply single-entity changes; other entity types are ignored. ValueError leaves it unchanged."""
        upserts = [obj for obj in upserts if isinstance(obj, SipDevice | Account | Gateway)]
        removals: list[tuple[str, int]] = []
        for name, key in deletes:
            if name in _ENTITIES:
                try:
                    removals.append((name, int(key)))
                except ValueError:
                    raise ValueError(f"{name} key {key!r} is not an id") from None
        for name, ident in removals:
            if name == "sip_devices":
                self._drop_device(ident)
            elif name == "accounts":
                self._accounts.pop(ident, None)
            else:
                self._gateways.pop(ident, None)
        for obj in upserts:
            if isinstance(obj, SipDevice):
                self._drop_device(obj.id)
                self._put_device(obj)
            elif isinstance(obj, Account):
                self._accounts[obj.id] = obj
            else:
                self._gateways[obj.id] = obj
        return []

    def _put_device(self, device: SipDevice) -> None:
        self._device_by_id[device.id] = device
        # The database keeps usernames unique; were two ever in one snapshot, the lower id wins
        # and the other ids are remembered, so that a removal never has to scan every device.
        held = self._device_by_username.get(device.username)
        if held is not None and held.id != device.id:
            self._shared.setdefault(device.username, set()).update((held.id, device.id))
        if held is None or held.id >= device.id:
            self._device_by_username[device.username] = device

    def _drop_device(self, device_id: int) -> None:
        device = self._device_by_id.pop(device_id, None)
        if device is None:
            return
        others: set[int] = set()
        if device.username in self._shared:
            others = {i for i in self._shared.pop(device.username) if i in self._device_by_id}
            if len(others) > 1:
                self._shared[device.username] = others
        if self._device_by_username.get(device.username) is device:
            del self._device_by_username[device.username]
            if others:
                self._device_by_username[device.username] = self._device_by_id[min(others)]

    # --- reading ---------------------------------------------------------------------------------

    def servable(self, username: str) -> tuple[SipDevice, Account] | None:
        """The device of that exact username and its account, if both may be used."""
        device = self._device_by_username.get(username)
        if device is None or not device.active:
            return None
        account = self._accounts.get(device.account_id)
        if account is None or not account.usable:
            return None
        return device, account

    def gateways_of(self, profile: str) -> list[Gateway]:
        """The active gateways of a sofia profile, by name."""
        return sorted(
            (g for g in self._gateways.values() if g.active and g.sip_profile == profile),
            key=lambda g: g.name,
        )

    @property
    def device_count(self) -> int:
        return len(self._device_by_id)


def a1_hash(username: str, realm: str, password: str) -> str:
    """HTTP digest's A1 hash, as FreeSWITCH computes it from a password (MD5, hex).

    The snapshot's hashes are made by PostgreSQL (engine.db.loader); this is the reference
    the tests compare them with.
    """
    return hashlib.md5(f"{username}:{realm}:{password}".encode(), usedforsecurity=False).hexdigest()


def user_params(device: SipDevice) -> list[tuple[str, str]]:
    params = [("allow-empty-password", "false")]
    if device.a1_hash:
        params.insert(0, ("a1-hash", device.a1_hash))
    return params


def user_variables(device: SipDevice, account: Account) -> list[tuple[str, str]]:
    variables = [("user_context", device.context), ("accountcode", account.number)]
    if device.caller_id_name:
        variables.append(("effective_caller_id_name", device.caller_id_name))
    if device.caller_id_number:
        variables.append(("effective_caller_id_number", device.caller_id_number))
    if device.codecs:  # the device's own codecs: FreeSWITCH applies user variables when it calls
        variables.append(("absolute_codec_string", device.codecs))  # and when it is called (user/)
    return variables


def gateway_params(gateway: Gateway, password: str = "") -> list[tuple[str, str]]:
    """Sofia gateway params: the free-form ones first, the columns after (sofia keeps the last).

    ``password`` is the gateway's carrier password, read from PostgreSQL by engine.fsxml.credentials.
    """
    params = [tuple(item.split("=", 1)) for item in gateway.params if "=" in item]
    columns = [("register", "true" if gateway.register else "false")]
    if gateway.proxy:
        columns.append(("proxy", gateway.proxy))
    if gateway.username:
        columns.append(("username", gateway.username))
    if password:
        columns.append(("password", password))
    return [(name, value) for name, value in params] + columns


@dataclass(frozen=True)
class SofiaTemplate:
    """An operator's sofia.conf.xml; callgate's gateways are added to each of its profiles."""

    root: ET.Element

    @classmethod
    def load(cls, path: str | Path) -> SofiaTemplate:
        """Parse the file (ValueError if it is not a sofia.conf configuration with profiles)."""
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
        if root.tag != "configuration" or root.get("name") != "sofia.conf":
            raise ValueError(f'{path}: the root element must be <configuration name="sofia.conf">')
        if root.find("profiles") is None:
            raise ValueError(f"{path}: no <profiles>")
        return cls(root)

    def render(self, gateways_of: Any, password_of: PasswordOf = _no_password) -> str:
        """The configuration element with ``gateways_of(profile)`` rendered into each profile."""
        return _element(
            self.root, "    ", lambda profile: _rendered(gateways_of(profile), password_of), False
        )


def _rendered(
    gateways: Iterable[Gateway], password_of: PasswordOf
) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(g.name, gateway_params(g, password_of(g.id))) for g in gateways]


def _element(node: ET.Element, indent: str, gateways_of: Any, in_profiles: bool) -> str:
    # The template's own values are written as they are (only XML-escaped), so that FreeSWITCH's
    # pre-processor still expands its $${variables}; callgate's values go through render.attr.
    attributes = "".join(f' {name}="{_xml_attr(value)}"' for name, value in node.attrib.items())
    children = list(node)
    added = ""
    if in_profiles and node.tag == "profile":
        rendered = [
            render.gateway_element(name, params, indent + "    ")
            for name, params in gateways_of(node.get("name", ""))
        ]
        existing = node.find("gateways")
        if existing is None and rendered:
            added = f"{indent}  <gateways>\n{''.join(rendered)}{indent}  </gateways>\n"
        elif existing is not None:
            children = [c for c in children if c is not existing]
            inner = "".join(_element(c, indent + "    ", gateways_of, False) for c in existing)
            added = f"{indent}  <gateways>\n{inner}{''.join(rendered)}{indent}  </gateways>\n"
    if not children and not added:
        return f"{indent}<{node.tag}{attributes}/>\n"
    body = "".join(_element(c, indent + "  ", gateways_of, node.tag == "profiles") for c in children)
    return f"{indent}<{node.tag}{attributes}>\n{body}{added}{indent}</{node.tag}>\n"


def _xml_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class Answers:
    """Lookups -> XML bytes, for one configuration."""

    def __init__(
        self,
        domain: str,
        *,
        serve_gateways: bool = True,
        sofia_template: SofiaTemplate | None = None,
        cacheable_ms: int = 0,
        password_of: PasswordOf = _no_password,
    ) -> None:
        self.domain = domain
        self._password_of = password_of
        self._other_realms = [-_LOG_EVERY, 0]  # [last logged, count since]
        self._serve_gateways = serve_gateways
        self._sofia = sofia_template
        self._cacheable_ms = cacheable_ms
        self._domain_params = [("dial-string", DIAL_STRING)]
        self._head, self._tail = render.directory_frame(domain, self._domain_params)

    def _document(self, users: list[str]) -> bytes:
        return self._head + "".join(users).encode() + self._tail

    def answer(self, lookup: Lookup, directory: Directory) -> bytes:
        kind = lookup.kind
        if kind is Kind.SOFIA_CONF:
            if self._sofia is None:
                return render.NOT_FOUND
            return render.configuration_document(self._sofia.render(directory.gateways_of, self._password_of))
        if not self.domain:
            return render.NOT_FOUND
        if kind is Kind.GATEWAYS:
            if not self._serve_gateways or (lookup.domain and not self._ours(lookup.domain)):
                return render.NOT_FOUND
            gateways = [
                render.gateway_element(g.name, gateway_params(g, self._password_of(g.id)), "                ")
                for g in directory.gateways_of(lookup.profile)
            ]
            if not gateways:
                return self._document([])
            user = render.gateways_user_element(GATEWAYS_USER, gateways, "            ")
            return render.gateways_document(self.domain, self._domain_params, user)
        if kind is Kind.USER and self._ours(lookup.domain):
            return self._document(self._user(lookup, directory))
        if kind is Kind.DOMAIN and self._ours(lookup.domain):
            return self._document([])
        return render.NOT_FOUND

    def _ours(self, domain: str) -> bool:
        return domain.lower() == self.domain.lower()  # FreeSWITCH compares domain names ignoring case

    def _user(self, lookup: Lookup, directory: Directory) -> list[str]:
        if lookup.realm and lookup.realm != self.domain:
            self._other_realm()  # the snapshot's hashes are for the domain: no other realm can match
            return []
        found = directory.servable(lookup.user)
        if found is None:
            return []
        device, account = found
        return [
            render.user_element(
                device.username,
                user_params(device),
                user_variables(device, account),
                "        ",
                self._cacheable_ms,
            )
        ]

    def _other_realm(self) -> None:
        now = time.monotonic()
        entry = self._other_realms
        entry[1] += 1
        if now - entry[0] >= _LOG_EVERY:
            log.warning(
                "fsxml: %d digest lookup(s) with a realm other than %r: user not found"
                " (set the profile's challenge-realm to fsxml.domain)",
                entry[1],
                self.domain,
            )
            entry[0], entry[1] = now, 0
