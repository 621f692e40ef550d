"""Who may ask: a source allow-list, then HTTP basic auth (mod_xml_curl's gateway-credentials). Pure.

Both checks run on every request. The credentials are compared in constant time
(``hmac.compare_digest`` on both parts, both always compared), so the response time does
not tell how much of a guess was right. Nothing here logs, and no secret is ever part of a
returned reason.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Denial(enum.Enum):
    SOURCE = "source not allowed"  # HTTP 403
    CREDENTIALS = "missing or wrong credentials"  # HTTP 401


class Access:
    def __init__(self, allowed_networks: Iterable[str], username: str = "", password: str = "") -> None:
        self._networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(network, strict=False) for network in allowed_networks
        )
        self._username = username.encode()
        self._password = password.encode()
        self._required = bool(username or password)
        self._allowed_cache: dict[str, bool] = {}

    @property
    def credentials_required(self) -> bool:
        return self._required

    def check(self, remote_addr: str, authorization: str | None) -> Denial | None:
        """None if the request may be answered, else why not."""
        if not self.source_allowed(remote_addr):
            return Denial.SOURCE
        if self._required and not self.credentials_valid(authorization):
            return Denial.CREDENTIALS
        return None

    def source_allowed(self, remote_addr: str) -> bool:
        allowed = self._allowed_cache.get(remote_addr)
        if allowed is None:
            allowed = self._match(remote_addr)
            if len(self._allowed_cache) < 4096:  # FreeSWITCH hosts are few; scanners are not cached forever
                self._allowed_cache[remote_addr] = allowed
        return allowed

    def _match(self, remote_addr: str) -> bool:
        try:
            address = ipaddress.ip_address(remote_addr.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
        return any(address.version == net.version and address in net for net in self._networks)

    def credentials_valid(self, authorization: str | None) -> bool:
        username, password = _basic_credentials(authorization)
        user_ok = hmac.compare_digest(username, self._username)
        password_ok = hmac.compare_digest(password, self._password)
        return user_ok & password_ok


def _basic_credentials(authorization: str | None) -> tuple[bytes, bytes]:
    """(user, password) of a ``Basic`` Authorization header; empty parts when absent or malformed."""
    if not authorization:
        return b"", b""
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return b"", b""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b"", b""
    username, separator, password = decoded.partition(b":")
    if not separator:
        return b"", b""
    return username, password
