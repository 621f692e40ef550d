"""Settings the decision rules read (built once at start-up, immutable)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.decision import DEFAULT_SIP_RESPONSES, Reason

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    trusted_networks: tuple[IpNetwork, ...] = field(init=False, repr=False, compare=False)

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
        for reason, response in self.sip_responses.items():
            code, text = response
            valid = isinstance(reason, Reason) and 400 <= int(code) <= 699 and text and text.isprintable()
            if not valid:
                raise ValueError(f"sip_responses: bad entry {reason!r} -> {response!r}")

    def sip_response(self, reason: Reason) -> tuple[int, str]:
        """The SIP code and text sent for a rejection (configured, else the default table)."""
        return self.sip_responses.get(reason) or DEFAULT_SIP_RESPONSES[reason]
