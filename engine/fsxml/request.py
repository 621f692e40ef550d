"""mod_xml_curl's request, as the form FreeSWITCH posts, into a :class:`Lookup`. Pure.

mod_xml_curl (``xml_url_fetch``) sends, form-encoded (POST by default, GET query with
``method=GET``): ``hostname``, ``section``, ``tag_name``, ``key_name``, ``key_value``, then
every header of the request's parameters. The fields callgate reads:

* directory, user lookups (``switch_xml_locate_user``): ``key`` (``id``), ``user``,
  ``domain``, ``ip``; mod_sofia's digest check adds ``action=sip_auth`` and
  ``sip_auth_realm`` (the realm the device computed its response with), the ``user/``
  endpoint adds ``action=user_call`` (after merging the call's variables, so a name may
  repeat: the last one is FreeSWITCH's own, which it appends last);
* directory, domain lookups (``switch_xml_locate_domain``): ``tag_name=domain``,
  ``key_name=name``, ``key_value=<domain>``, and ``purpose=gateways`` + ``profile`` when a
  sofia profile's ``<domains>`` asks for gateways (``key_value`` empty for ``name="all"``),
  ``purpose=network-list`` when an ACL list names a domain;
* configuration: ``key_value`` is the file (``sofia.conf``), ``profile`` the profile.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from urllib.parse import unquote_plus


class Kind(enum.Enum):
    USER = "user"  # one user of a domain
    DOMAIN = "domain"  # a domain without a user
    GATEWAYS = "gateways"  # purpose=gateways: the gateways of a sofia profile
    SOFIA_CONF = "sofia_conf"  # configuration of mod_sofia
    OTHER = "other"  # anything callgate does not serve


class BadRequest(ValueError):
    """The body is not a form mod_xml_curl could have sent."""


@dataclass(frozen=True, slots=True)
class Lookup:
    kind: Kind
    section: str = ""
    domain: str = ""
    user: str = ""
    action: str = ""
    realm: str = ""  # sip_auth_realm
    profile: str = ""
    ip: str = ""
    fields: dict[str, str] = field(default_factory=dict, repr=False)


FIELDS = frozenset(
    {
        "section",
        "tag_name",
        "key_name",
        "key_value",
        "purpose",
        "profile",
        "action",
        "user",
        "domain",
        "ip",
        "sip_auth_realm",
    }
)
"""The fields :func:`lookup` reads; the others (a sip_auth lookup posts ~30) are not even decoded."""


def parse_form(body: str, names: frozenset[str] = FIELDS) -> dict[str, str]:
    """The form's ``names`` fields, the last occurrence winning; BadRequest if a value is not UTF-8.

    Decoding only the fields read, instead of ``urllib.parse.parse_qsl`` over all of them,
    was measured at ~45 of the ~75 us the application spent per sip_auth request.
    """
    fields: dict[str, str] = {}
    for pair in body.split("&"):
        name, _, value = pair.partition("=")
        if "%" in name or "+" in name:
            name = _unquote(name)
        if name in names:
            fields[name] = _unquote(value) if "%" in value or "+" in value else value
    return fields


def _unquote(text: str) -> str:
    try:
        return unquote_plus(text, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"not a form: {exc}") from exc


def lookup(fields: dict[str, str]) -> Lookup:
    """What FreeSWITCH asks for."""
    section = fields.get("section", "")
    profile = fields.get("profile", "")
    if section == "configuration":
        kind = Kind.SOFIA_CONF if fields.get("key_value") == "sofia.conf" else Kind.OTHER
        return Lookup(kind, section, profile=profile, fields=fields)
    if section != "directory":
        return Lookup(Kind.OTHER, section, fields=fields)
    domain = _domain(fields)
    purpose = fields.get("purpose", "")
    if purpose == "gateways":
        return Lookup(Kind.GATEWAYS, section, domain=domain, profile=profile, fields=fields)
    user = fields.get("user", "")
    if purpose or not domain:
        kind = Kind.OTHER  # network lists, nightmare transfers, whole-directory walks
    elif user:
        kind = Kind.USER
    else:
        kind = Kind.DOMAIN
    return Lookup(
        kind,
        section,
        domain=domain,
        user=user,
        action=fields.get("action", ""),
        realm=fields.get("sip_auth_realm", ""),
        profile=profile,
        ip=fields.get("ip", ""),
        fields=fields,
    )


def _domain(fields: dict[str, str]) -> str:
    # switch_xml_locate("directory", "domain", "name", <domain>): key_value is the domain looked
    # up, whatever a merged channel variable called "domain" says.
    if fields.get("tag_name") == "domain" and fields.get("key_name") == "name":
        return fields.get("key_value", "")
    return fields.get("domain", "")
