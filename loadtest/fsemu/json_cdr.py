"""mod_json_cdr: the CDR FreeSWITCH 1.10.12 posts when a channel is over, and how it posts it.

Derived from FreeSWITCH's source at v1.10.12 (``src/mod/event_handlers/mod_json_cdr/mod_json_cdr.c``
and ``switch_ivr_generate_json_cdr`` in ``src/switch_ivr.c``); docs/freeswitch.md has the
summary. What is reproduced:

* the document (:func:`cdr_document`): ``core-uuid``, ``switchname``, ``channel_data``,
  ``callStats`` (answered calls), ``variables`` (every non-empty channel variable, values
  URL-encoded by ``switch_url_encode`` when ``encode-values`` is true, its default),
  ``app_log``, ``callflow`` (the caller profile with ``originatee`` when bridged, ``times`` in
  microseconds as strings), printed unformatted as ``cJSON_PrintUnformatted`` does;
* the POST (:func:`post_cdr`, ``process_cdr``): ``<url>?uuid=<uuid>``, ``User-Agent:
  freeswitch-json/1.0``, ``Content-Type`` by ``encode`` (``false``: application/json and the
  JSON; ``true``: application/x-www-form-urlencoded and ``cdr=<URL-encoded JSON>``; ``base64``:
  application/x-www-form-base64-encoded and ``cdr=<base64>``), basic auth with ``cred``, libcurl's
  ``Expect: 100-continue`` on bodies over 1 KiB, and FreeSWITCH's ``disable-100-continue`` quirk
  (it replaces the header list, so the Content-Type is lost and libcurl sends its default
  ``application/x-www-form-urlencoded``);
* the failure path: ``retries`` + 1 attempts, ``delay`` seconds apart, rotating over the URLs,
  any status outside 2xx (0 when no HTTP answer) is a failure; after the last one the text
  (URL-encoded or base64 when ``encode`` is set, else the JSON) and a newline are written to
  ``<err-log-dir>/<uuid>.cdr.json``.

Only the A-leg's document is built from a :class:`~loadtest.fsemu.outbound.CallResult` (the
emulator does not model B-leg channels); :func:`b_leg_document` gives a minimal B-leg one for
tests of what the receiver ignores.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gevent
from gevent import socket as gsocket

from .outbound import CallResult, CallSpec, Switch

__all__ = [
    "CdrSettings",
    "PostResult",
    "b_leg_document",
    "cdr_body",
    "cdr_document",
    "json_text",
    "post_cdr",
    "replay_file",
    "settings_from_conf",
    "switch_url_encode",
]

# switch_utils.h SWITCH_URL_UNSAFE
_UNSAFE = frozenset('\r\n #%&+:;<=>?@[\\]^`{|}"')
_HEX = "0123456789ABCDEF"


def switch_url_encode(value: str) -> str:
    """``switch_url_encode`` (switch_utils.c): bytes below space, above ``~`` and in
    SWITCH_URL_UNSAFE become ``%XX``, except a ``%`` already followed by two hex digits."""
    raw = value.encode("utf-8")
    out: list[str] = []
    for i, byte in enumerate(raw):
        char = chr(byte)
        if char == "%" and i + 2 < len(raw) and _is_hex(raw[i + 1 : i + 3]):
            out.append(char)
        elif byte < 0x20 or byte > 0x7E or char in _UNSAFE:
            out.append("%" + _HEX[byte >> 4] + _HEX[byte & 0x0F])
        else:
            out.append(char)
    return "".join(out)


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(chr(b) in _HEX for b in pair)


def _times(variables: Mapping[str, str]) -> dict[str, str]:
    def at(name: str) -> str:
        return variables.get(f"{name}_uepoch", "0") or "0"

    return {
        "created_time": at("start"),
        "profile_created_time": at("profile_start"),
        "progress_time": at("progress"),
        "progress_media_time": at("progress_media"),
        "answered_time": at("answer"),
        "bridged_time": at("bridge"),
        "last_hold_time": "0",
        "hold_accum_time": "0",
        "hangup_time": at("end"),
        "resurrect_time": "0",
        "transfer_time": "0",
    }


def _profile(
    *,
    username: str,
    cid_name: str,
    cid_number: str,
    network: str,
    dest: str,
    uuid: str,
    chan: str,
    context: str,
) -> dict[str, Any]:
    """``switch_ivr_set_json_profile_data``: the fields in FreeSWITCH's order (never URL-encoded)."""
    return {
        "username": username,
        "dialplan": "XML",
        "caller_id_name": cid_name,
        "ani": cid_number,
        "aniii": "",
        "caller_id_number": cid_number,
        "network_addr": network,
        "rdnis": "",
        "destination_number": dest,
        "uuid": uuid,
        "source": "mod_sofia",
        "context": context,
        "chan_name": chan,
    }


def _audio_stats() -> dict[str, Any]:
    names_in = (
        "raw_bytes", "media_bytes", "packet_count", "media_packet_count", "skip_packet_count",
        "jitter_packet_count", "dtmf_packet_count", "cng_packet_count", "flush_packet_count",
        "largest_jb_size", "jitter_min_variance", "jitter_max_variance", "jitter_loss_rate",
        "jitter_burst_rate", "mean_interval", "flaw_total", "quality_percentage", "mos",
    )  # fmt: skip
    names_out = (
        "raw_bytes", "media_bytes", "packet_count", "media_packet_count", "skip_packet_count",
        "dtmf_packet_count", "cng_packet_count", "rtcp_packet_count", "rtcp_octet_count",
    )  # fmt: skip
    inbound: dict[str, Any] = {name: 0 for name in names_in}
    inbound.update(quality_percentage=100, mos=4.5)
    return {"audio": {"inbound": inbound, "outbound": {name: 0 for name in names_out}}}


def _variables(variables: Mapping[str, str], encode_values: bool) -> dict[str, str]:
    return {
        name: switch_url_encode(value) if encode_values else value
        for name, value in variables.items()
        if name and value
    }


def cdr_document(
    result: CallResult,
    spec: CallSpec,
    switch: Switch,
    *,
    encode_values: bool = True,
    variables: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The A-leg's JSON CDR for an emulated call (after :func:`place_call` returned).

    ``variables``: the channel's variables at CS_REPORTING; default ``result.channel_variables``
    (what CHANNEL_HANGUP_COMPLETE carried, which FreeSWITCH fires just before reporting).
    """
    chan_vars = dict(result.channel_variables if variables is None else variables)
    from_user = spec.from_user or spec.caller_id_number
    chan_name = f"sofia/internal/{from_user}@{spec.network_ip}:{spec.network_port}"
    caller = _profile(
        username=from_user,
        cid_name=spec.caller_id_name or spec.caller_id_number,
        cid_number=spec.caller_id_number,
        network=spec.network_ip,
        dest=spec.destination,
        uuid=result.uuid,
        chan=chan_name,
        context=chan_vars.get("user_context", "public"),
    )
    other = chan_vars.get("last_bridge_to")
    if other and result.bridged_target:
        number = result.bridged_target.rsplit("/", 1)[-1]
        callee = _profile(
            username=from_user,
            cid_name=spec.caller_id_name or spec.caller_id_number,
            cid_number=spec.caller_id_number,
            network=spec.network_ip,
            dest=number,
            uuid=other,
            chan=result.bridged_target.split("]", 1)[-1],
            context=caller["context"],
        )
        caller["originatee"] = {"originatee_caller_profiles": [callee]}
    socket_data = chan_vars.get("current_application_data") or f"{spec.socket_mode}"
    stamp = chan_vars.get("end_uepoch", "0")
    document: dict[str, Any] = {
        "core-uuid": switch.core_uuid,
        "switchname": switch.switchname,
        "channel_data": {
            "state": "CS_REPORTING",
            "direction": "inbound",
            "state_number": "11",
            "flags": "0=1;1=1;3=1;38=1;39=1;41=1;44=1;54=1;76=1;94=1;113=1;114=1;123=1",
            "caps": "1=1;2=1;3=1;4=1;5=1;6=1;8=1;9=1",
        },
        "callStats": _audio_stats() if result.answered else {},
        "variables": _variables(chan_vars, encode_values),
        "app_log": {
            "applications": [
                {"app_name": app, "app_data": data, "app_stamp": stamp} for app, data in result.executed
            ]
        },
        "callflow": [
            {
                "dialplan": "XML",
                "profile_index": "1",
                "extension": {
                    "name": "callgate",
                    "number": spec.destination,
                    "applications": [
                        {"last_executed": "true", "app_name": "socket", "app_data": socket_data}
                    ],
                    "current_app": "socket",
                },
                "caller_profile": caller,
                "times": _times(chan_vars),
            }
        ],
    }
    return document


def b_leg_document(
    a_leg: Mapping[str, Any], b_uuid: str, gateway: str, *, billsec: str = "0"
) -> dict[str, Any]:
    """A minimal B-leg CDR for ``a_leg``'s bridged call: an ``originator`` profile, the
    gateway variables, no callgate variables (they are set on the A-leg only)."""
    caller = a_leg["callflow"][0]["caller_profile"]
    profile = {**{k: v for k, v in caller.items() if k != "originatee"}, "uuid": b_uuid}
    profile["originator"] = {"originator_caller_profiles": [dict(caller)]}
    return {
        "core-uuid": a_leg["core-uuid"],
        "switchname": a_leg["switchname"],
        "channel_data": {"state": "CS_REPORTING", "direction": "outbound", "state_number": "11"},
        "callStats": {},
        "variables": {
            "uuid": b_uuid,
            "direction": "outbound",
            "sip_gateway_name": switch_url_encode(gateway),
            "billsec": billsec,
            "hangup_cause": "NORMAL_CLEARING",
        },
        "callflow": [{"dialplan": "XML", "caller_profile": profile, "times": a_leg["callflow"][0]["times"]}],
    }


def json_text(document: Mapping[str, Any]) -> str:
    """``cJSON_PrintUnformatted``: no whitespace, non-ASCII kept as UTF-8."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class CdrSettings:
    """The json_cdr.conf.xml settings the POST depends on (FreeSWITCH's defaults)."""

    urls: Sequence[str] = ()
    cred: str = ""  # "user:password"
    encode: str = "false"  # false | true | base64
    retries: int = 0
    delay: float = 5.0  # FreeSWITCH: whole seconds; "retries set but delay 0" becomes 5
    timeout: float = 0.0  # CURLOPT_TIMEOUT seconds; 0 = none (FreeSWITCH's default)
    disable_100_continue: bool = False
    err_log_dir: str = ""


def settings_from_conf(path: str | Path, **overrides: Any) -> CdrSettings:
    """The settings of a json_cdr.conf.xml, read as mod_json_cdr's load function reads them
    (``url`` and ``err-log-dir`` may repeat; unknown params ignored), then ``overrides``."""
    import xml.etree.ElementTree as ET

    values: dict[str, Any] = {"urls": []}
    for param in ET.parse(path).getroot().iter("param"):
        name, value = (param.get("name") or "").lower(), param.get("value") or ""
        if name == "url" and value:
            values["urls"].append(value)
        elif name == "cred" and value:
            values["cred"] = value
        elif name == "encode" and value:
            values["encode"] = value
        elif name in ("retries", "timeout") and value:
            values[name] = int(value)
        elif name == "delay" and value:
            values["delay"] = float(int(value))
        elif name == "disable-100-continue":
            values["disable_100_continue"] = value.lower() in ("true", "yes", "on", "1")
        elif name == "err-log-dir" and "err_log_dir" not in values:
            values["err_log_dir"] = value
    if values.get("retries") and not values.get("delay"):
        values["delay"] = 5.0  # "Retries set but delay 0 setting to 5 seconds"
    values.update(overrides)
    return CdrSettings(**values)


def cdr_body(text: str, encode: str) -> tuple[str | None, bytes, str]:
    """(Content-Type or None when FreeSWITCH sends none, body, what a failed post backs up)."""
    mode = encode.strip().lower()
    if mode == "base64":
        escaped = base64.b64encode(text.encode("utf-8")).decode("ascii")
        return "application/x-www-form-base64-encoded", f"cdr={escaped}".encode(), escaped
    if mode in ("true", "yes", "on", "1", "enabled", "active", "allow"):  # switch_true
        escaped = switch_url_encode(text)
        return "application/x-www-form-urlencoded", f"cdr={escaped}".encode(), escaped
    return "application/json", text.encode("utf-8"), text


@dataclass
class PostResult:
    statuses: list[int] = field(default_factory=list)  # one per attempt; 0 = no HTTP answer
    backup: Path | None = None  # the err-log-dir file written after the last failure

    @property
    def delivered(self) -> bool:
        return bool(self.statuses) and 200 <= self.statuses[-1] < 300


def _http_post(url: str, headers: list[tuple[str, str]], body: bytes, timeout: float) -> int:
    """One libcurl-like POST on a new connection: the status code, 0 when there is none."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    expect = len(body) > 1024 and not any(name.lower() == "expect" for name, _ in headers)
    lines = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}", "Accept: */*"]
    lines += [f"{name}: {value}" for name, value in headers if value]
    lines.append(f"Content-Length: {len(body)}")
    if expect:
        lines.append("Expect: 100-continue")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    try:
        with gevent.Timeout(timeout or None):
            sock = gsocket.create_connection((host, port))
            try:
                sock.sendall(head)
                reply = b""
                if expect:  # libcurl waits up to 1 s for "100 Continue", then sends anyway
                    with gevent.Timeout(1.0, False):
                        reply = sock.recv(65536)
                    if reply.startswith(b"HTTP/1.1 100"):
                        reply = reply.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in reply else b""
                    elif reply:
                        return _status(reply)
                sock.sendall(body)
                while b"\r\n" not in reply:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
                return _status(reply)
            finally:
                sock.close()
    except (OSError, gevent.Timeout):
        return 0


def _status(reply: bytes) -> int:
    words = reply.split(b"\r\n", 1)[0].split()
    return int(words[1]) if len(words) >= 2 and words[1].isdigit() else 0


def post_cdr(document: Mapping[str, Any], settings: CdrSettings) -> PostResult:
    """Post one channel's CDR as mod_json_cdr's ``process_cdr`` does (see the module docstring)."""
    uuid = str(document["variables"].get("uuid", ""))
    content_type, body, backup_text = cdr_body(json_text(document), settings.encode)
    headers: list[tuple[str, str]] = [("User-Agent", "freeswitch-json/1.0")]
    if settings.disable_100_continue:
        # FreeSWITCH sets a new header list holding "Expect:" only: its Content-Type is gone
        # and libcurl falls back to its POSTFIELDS default.
        headers += [("Content-Type", "application/x-www-form-urlencoded"), ("Expect", "")]
    elif content_type:
        headers.append(("Content-Type", content_type))
    if settings.cred:
        headers.append(("Authorization", "Basic " + base64.b64encode(settings.cred.encode()).decode()))
    result = PostResult()
    urls = list(settings.urls)
    index = 0
    for attempt in range(settings.retries + 1 if urls else 0):
        if attempt:
            gevent.sleep(settings.delay)
        status = _http_post(f"{urls[index]}?uuid={uuid}", headers, body, settings.timeout)
        result.statuses.append(status)
        if 200 <= status < 300:
            return result
        index = (index + 1) % len(urls)
    if urls and settings.err_log_dir:
        path = Path(settings.err_log_dir) / f"{uuid}.cdr.json"
        path.write_text(backup_text + "\n", encoding="utf-8")
        result.backup = path
    return result


def replay_file(path: Path, settings: CdrSettings) -> int:
    """Post one err-log-dir file back, as an operator's replay does: the status code. The file
    holds the JSON (``encode=false``), or the escaped text that goes back into ``cdr=``."""
    text = path.read_text(encoding="utf-8").rstrip("\n")
    content_type, _, _ = cdr_body("", settings.encode)
    body = text.encode("utf-8") if content_type == "application/json" else f"cdr={text}".encode()
    headers = [("User-Agent", "curl/7.88.1"), ("Content-Type", content_type or "application/json")]
    if settings.cred:
        headers.append(("Authorization", "Basic " + base64.b64encode(settings.cred.encode()).decode()))
    uuid = path.name.removesuffix(".cdr.json")
    return _http_post(f"{settings.urls[0]}?uuid={uuid}", headers, body, settings.timeout or 10.0)
