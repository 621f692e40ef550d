"""mod_json_cdr's POST -> the hangup facts the engine bills on (pure, sans-I/O).

What FreeSWITCH 1.10.12 sends (read in ``mod_json_cdr.c`` ``process_cdr``/``my_on_reporting``
and ``switch_ivr.c`` ``switch_ivr_generate_json_cdr``):

* one POST per channel at its CS_REPORTING state (after CHANNEL_HANGUP_COMPLETE), to each
  configured ``url`` with ``?uuid=<channel uuid>`` appended, ``User-Agent: freeswitch-json/1.0``,
  basic auth when ``cred`` is set (``auth-scheme`` basic by default);
* the body, by the ``encode`` setting:

  - ``false`` (the default): ``Content-Type: application/json``, the JSON text itself;
  - ``true``: ``Content-Type: application/x-www-form-urlencoded``, ``cdr=<JSON, URL-encoded>``;
  - ``base64``: ``Content-Type: application/x-www-form-base64-encoded``, ``cdr=<JSON, base64>``;

* the JSON document: ``core-uuid``, ``switchname``, ``channel_data`` (state, direction...),
  ``callStats``, ``variables`` (every non-empty channel variable, name -> string, each value
  URL-encoded by ``switch_url_encode`` when ``encode-values`` is true, the default), ``app_log``,
  and ``callflow``: a list of caller profiles, the current one first (``caller_profile`` with
  ``caller_id_number``, ``destination_number``, ``uuid``...; ``originator`` on a B-leg;
  ``times`` in microseconds as strings). Caller-profile fields are never URL-encoded.

The facts billing needs are the variables of the A-leg's CHANNEL_HANGUP_COMPLETE (``billsec``,
``*_uepoch``, ``hangup_cause``, ``originated_legs``, ``last_bridge_to``...), which the CDR
carries under the same names without the ``variable_`` prefix, and three event headers, which
come from the current caller profile. :func:`hangup_headers` rebuilds that mapping, so
:func:`engine.billing.hangup.parse_hangup` reads a CDR post exactly as it reads the event.

Variables are always URL-decoded once: right for ``encode-values=true`` (shipped), and a no-op
for the values billing reads when it is false (numbers, UUIDs, cause names, the base64url
ticket never contain ``%``). ``switch_url_encode`` leaves an existing ``%XX`` as it is, so a
variable whose own text holds ``%41`` comes back as ``A``: FreeSWITCH's loss, and none of the
billing fields can hold one.

Everything here raises :class:`MalformedCdr` (answered 400, never 5xx) on a body that is not
such a document; its message may quote caller-supplied text and must be logged escaped.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
FORM_BASE64 = "application/x-www-form-base64-encoded"
CONTENT_TYPES = (JSON, FORM, FORM_BASE64)

_MAX_VARIABLES = 5_000
_MAX_DEPTH = 40


class MalformedCdr(ValueError):
    """Not a mod_json_cdr document (answered 400)."""


@dataclass(frozen=True, slots=True)
class CdrPost:
    """The parts of one posted CDR that billing reads."""

    uuid: str
    variables: Mapping[str, str]  # URL-decoded
    profile: Mapping[str, Any]  # the current caller profile (callflow[0].caller_profile), or {}
    b_leg: bool  # the channel was originated by another (it has an originator profile)

    def headers(self) -> dict[str, str]:
        return hangup_headers(self)


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _form_field(body: bytes) -> bytes:
    """The ``cdr`` field of mod_json_cdr's form body (``cdr=<text>``; other fields ignored)."""
    for part in body.split(b"&"):
        name, equals, value = part.partition(b"=")
        if equals and name.strip() == b"cdr":
            return value
    raise MalformedCdr("no cdr= field in the form")


def document_text(body: bytes, content_type: str) -> str:
    """The JSON text of a POST body, by its content type (see the module docstring)."""
    kind = media_type(content_type)
    if kind == JSON or kind == "":  # a replay with curl may send no type: read it as JSON
        raw = body
    elif kind == FORM and body.lstrip()[:1] == b"{":
        # ``disable-100-continue=true`` replaces mod_json_cdr's header list, Content-Type
        # included: libcurl then labels the raw JSON (encode=false) with its form default.
        raw = body
    elif kind == FORM:
        raw = unquote_to_bytes(_form_field(body).replace(b"+", b" "))
    elif kind == FORM_BASE64:
        try:
            raw = base64.b64decode(b"".join(_form_field(body).split()), validate=True)
        except (binascii.Error, ValueError):
            raise MalformedCdr("the cdr field is not base64") from None
    else:
        raise MalformedCdr(f"unsupported content type {kind[:60]!r}")
    # Invalid UTF-8 (raw bytes in a caller name with encode-values=false) must not cost the
    # call its billing: the billing fields are ASCII, the rest is kept replaced.
    return raw.decode("utf-8", errors="replace")


def _depth_ok(value: Any, depth: int = 0) -> bool:
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_depth_ok(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_depth_ok(v, depth + 1) for v in value)
    return True


def parse_document(text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise MalformedCdr("not JSON") from None
    if not isinstance(document, dict) or not _depth_ok(document):
        raise MalformedCdr("not a JSON object (or nested too deep)")
    return document


def _current_profile(document: Mapping[str, Any]) -> Mapping[str, Any]:
    callflow = document.get("callflow")
    if isinstance(callflow, dict):  # older FreeSWITCH wrote a single object
        callflow = [callflow]
    if not isinstance(callflow, list) or not callflow or not isinstance(callflow[0], dict):
        return {}
    profile = callflow[0].get("caller_profile")
    return profile if isinstance(profile, dict) else {}


def read_post(body: bytes, content_type: str) -> CdrPost:
    """The posted CDR: its channel uuid, decoded variables and current caller profile."""
    document = parse_document(document_text(body, content_type))
    raw = document.get("variables")
    if not isinstance(raw, dict):
        raise MalformedCdr("no variables object")
    if len(raw) > _MAX_VARIABLES:
        raise MalformedCdr(f"more than {_MAX_VARIABLES} variables")
    variables: dict[str, str] = {}
    for name, value in raw.items():
        if isinstance(value, str):
            variables[name] = unquote(value, errors="replace") if "%" in value else value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            variables[name] = str(value)  # FreeSWITCH writes strings; a hand-made replay may not
    uuid = variables.get("uuid", "")
    profile = _current_profile(document)
    if not uuid:
        uuid = profile.get("uuid", "") if isinstance(profile.get("uuid"), str) else ""
    if not uuid or len(uuid) > 200 or not uuid.isprintable():
        raise MalformedCdr("no usable channel uuid")
    return CdrPost(uuid=uuid, variables=variables, profile=profile, b_leg="originator" in profile)


def _profile_text(profile: Mapping[str, Any], name: str) -> str:
    value = profile.get(name)
    return value if isinstance(value, str) else ""


def hangup_headers(post: CdrPost) -> dict[str, str]:
    """The CDR as the decoded headers of the channel's CHANNEL_HANGUP_COMPLETE that
    :func:`engine.billing.hangup.parse_hangup` reads: every variable as ``variable_<name>``, and
    ``Unique-ID``, ``Hangup-Cause``, ``Caller-Caller-ID-Number``, ``Caller-Destination-Number``
    (the event takes those from the channel and its current caller profile, as the CDR does)."""
    headers = {f"variable_{name}": value for name, value in post.variables.items()}
    headers["Unique-ID"] = post.uuid
    cause = post.variables.get("hangup_cause")
    if cause:
        headers["Hangup-Cause"] = cause
    headers["Caller-Caller-ID-Number"] = _profile_text(post.profile, "caller_id_number")
    headers["Caller-Destination-Number"] = _profile_text(post.profile, "destination_number")
    return headers
