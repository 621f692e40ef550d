"""Settings the decision rules read (built once at start-up, immutable)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.decision import DEFAULT_SIP_RESPONSES, Reason
from engine.rules.localization import NO_RULES, CompiledRules, LocalizationError, parse_rules

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A directory domain for `user/<username>@<domain>`: a host name or address, or one
# FreeSWITCH variable reference (expanded by FreeSWITCH when it runs the bridge).
_DOMAIN = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z0-9](?:[A-Za-z0-9.:-]*[A-Za-z0-9])?")
_PROFILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class RulesConfig:
    call_max_length: int = 6000  # seconds; ASTPP's default of 100 minutes
    max_free_length: int = 6000  # seconds granted on a free rate (still capped by call_max_length)
    default_leg_timeout: int = 60  # seconds, when the trunk sets none
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose account-code header is believed
    sip_responses: Mapping[Reason, tuple[int, str]] = field(
        default_factory=lambda: dict(DEFAULT_SIP_RESPONSES), hash=False
    )
    max_destination_length: int = 64  # longer dialled numbers are refused before any lookup
    # §1.1: rules applied to the dialled number before it is looked up as a DID (ASTPP's
    # did_global_translation), e.g. "00/,+/" when carriers deliver 0044... or +44...
    did_translation: str = ""
    # Rules applied to the caller ID of every inbound DID call, before the DID owner's
    # own inbound caller-ID rules.
    did_caller_id_translation: str = ""
    # On-net legs (local calls, DIDs to a SIP device) bridge to `user/<username>@<local_domain>`:
    # FreeSWITCH's directory finds the registration. The default is ASTPP's choice; FreeSWITCH
    # expands it (the channel's domain_name, else the global one from vars.xml).
    local_domain: str = "${domain_name}"
    uri_profile: str = "external"  # DIDs to a SIP URI bridge to `sofia/<uri_profile>/<uri>`
    trusted_networks: tuple[IpNetwork, ...] = field(init=False, repr=False, compare=False)
    did_rules: CompiledRules = field(init=False, repr=False, compare=False, default=NO_RULES)
    did_caller_id_rules: CompiledRules = field(init=False, repr=False, compare=False, default=NO_RULES)

    def __post_init__(self) -> None:
        for name in ("call_max_length", "max_free_length", "default_leg_timeout", "max_destination_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if isinstance(self.trusted_proxies, str):
            raise ValueError("trusted_proxies must be a sequence of CIDR strings, not one string")
        networks = []
        for cidr in self.trusted_proxies:
            try:
                networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: {cidr!r} is not an IP network") from exc
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        object.__setattr__(self, "trusted_networks", tuple(networks))
        for name, compiled in (
            ("did_translation", "did_rules"),
            ("did_caller_id_translation", "did_caller_id_rules"),
        ):
            try:
                object.__setattr__(self, compiled, parse_rules(getattr(self, name)))
            except LocalizationError as exc:
                raise ValueError(f"{name}: {exc}") from exc
        if not _DOMAIN.fullmatch(self.local_domain):
            raise ValueError(
                f"local_domain must be a host name or one ${{variable}}, got {self.local_domain!r}"
            )
        if not _PROFILE.fullmatch(self.uri_profile):
            raise ValueError(f"uri_profile must be a sofia profile name, got {self.uri_profile!r}")
        for reason, response in self.sip_responses.items():
            code, text = response
            valid = isinstance(reason, Reason) and 400 <= int(code) <= 699 and text and text.isprintable()
            if not valid:
                raise ValueError(f"sip_responses: bad entry {reason!r} -> {response!r}")

    def sip_response(self, reason: Reason) -> tuple[int, str]:
        """The SIP code and text sent for a rejection (configured, else the default table)."""
        return self.sip_responses.get(reason) or DEFAULT_SIP_RESPONSES[reason]
