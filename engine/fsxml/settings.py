"""The ``[fsxml]`` configuration section: the mod_xml_curl service (``callgate fsxml``).

Imports nothing from engine.config at import time, so engine.config can import it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

# A SIP domain as FreeSWITCH's directory names it: a host name or an IPv4 address.
_DOMAIN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class FsxmlSettings:
    listen_host: str = "127.0.0.1"
    # Not 8084/8086 (the engines the dialplan lists), 8085/8089 (admin API), 9184/9185 (metrics).
    listen_port: int = 8087
    # The SIP domain (= digest realm) callgate's devices live in. callgate answers for this
    # domain only, and authoritatively: a user it does not know there is unknown to FreeSWITCH.
    # "" = no directory is served (every directory request is "not found").
    domain: str = ""
    # Sources allowed to ask (FreeSWITCH hosts); everything else gets 403.
    allowed_networks: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    # HTTP basic auth (mod_xml_curl's gateway-credentials "user:password"); both empty = off.
    username: str = ""
    password: str = field(default="", repr=False)
    # Serve the sofia gateways for `purpose=gateways` directory requests (profile <domains>).
    serve_gateways: bool = True
    # A sofia.conf.xml (FreeSWITCH's own format) whose profiles get callgate's gateways added;
    # "" = sofia.conf requests are "not found" (FreeSWITCH uses its local file).
    sofia_template: str = ""
    # FreeSWITCH may cache each user answer this many milliseconds (the user's `cacheable`);
    # 0 = ask every time (a change is seen by the next REGISTER or INVITE).
    cacheable_ms: int = 0
    # Answer HTTP 503 once Redis has not confirmed the held snapshot for this many seconds.
    snapshot_max_age: float = 60.0
    # Largest request body read (mod_xml_curl posts a few KiB; a user_call lookup carries the
    # call's variables).
    max_body_bytes: int = 262144

    def check(self) -> None:
        """Raise engine.config.ConfigError naming every bad key."""
        from engine.config import ConfigError  # here: engine.config imports this module

        problems: list[str] = []
        if not 0 <= self.listen_port <= 65535:
            problems.append("listen_port must be 0-65535")
        if self.domain and not _DOMAIN.match(self.domain):
            problems.append(f"domain {self.domain!r} is not a host name")
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                problems.append(f"allowed_networks: {network!r} is not an address or network")
        if bool(self.username) != bool(self.password):
            problems.append("username and password are set together (basic auth) or both left empty")
        if ":" in self.username:
            problems.append("username may not contain ':' (basic auth)")
        if self.cacheable_ms < 0:
            problems.append("cacheable_ms must be >= 0")
        if self.snapshot_max_age <= 0:
            problems.append("snapshot_max_age must be > 0")
        if self.max_body_bytes < 4096:
            problems.append("max_body_bytes must be >= 4096")
        if problems:
            raise ConfigError("[fsxml] " + "; ".join(problems))
