"""Who is calling (decision-rules §2): SIP device, then IP map, then a trusted header."""

from __future__ import annotations

from dataclasses import dataclass

from engine.decision import Reason
from engine.model import Account, CallRequest, SipDevice
from engine.rules.catalog import Catalog, IpMapMatch, parse_ip
from engine.rules.config import RulesConfig
from engine.rules.refusal import Refusal
from engine.rules.text import show


@dataclass(frozen=True, slots=True)
class Identity:
    method: str  # "sip_device", "ip_map" or "header"
    account_number: str
    account: Account | None  # None only when a trusted header names an unknown account
    destination: str  # the dialled number, IP-map tech prefix stripped
    device: SipDevice | None = None
    ip_match: IpMapMatch | None = None
    source: str = ""  # the trusted proxy a header identity came through

    def describe(self) -> str:
        account = f"account {self.account_number}"
        if self.device is not None:
            return f"account found via SIP device {self.device.username} ({account})"
        if self.ip_match is not None:
            stripped = (
                f", tech prefix {self.ip_match.tech_prefix} stripped" if self.ip_match.tech_prefix else ""
            )
            return f"account found via IP map {self.ip_match.network}{stripped} ({account})"
        claimed = show(self.account_number)
        return f"account {claimed} named by the account-code header from trusted proxy {self.source}"


def identify(request: CallRequest, catalog: Catalog, config: RulesConfig) -> Identity | Refusal:
    """The first of §2's methods that names a caller; each method that fails says why."""
    notes: list[str] = []
    account_id: int | None = None

    username = request.sip_auth_username
    if username:
        device = catalog.devices.get(username)
        account = catalog.accounts.get(device.account_id) if device is not None else None
        if device is None:
            notes.append(f"no SIP device {show(username)}")
        elif not device.active:
            notes.append(f"SIP device {show(username)} is inactive")
            account_id = device.account_id
        elif account is None or not account.usable:
            owner = (
                f"missing account {device.account_id}"
                if account is None
                else (f"{'deleted' if account.deleted else 'inactive'} account {account.number}")
            )
            notes.append(f"SIP device {show(username)} belongs to {owner}")
            account_id = device.account_id
        else:
            return Identity("sip_device", account.number, account, request.destination, device=device)

    address = parse_ip(request.network_ip) if request.network_ip else None
    if address is not None:
        match = catalog.ip_map_match(address, request.destination)
        if match is not None:
            account = catalog.accounts[match.entry.account_id]  # the build kept usable accounts only
            destination = request.destination[len(match.tech_prefix) :]
            return Identity("ip_map", account.number, account, destination, ip_match=match)
        notes.append(f"no IP map entry for {address} and this destination")
    elif request.network_ip:
        notes.append(f"source address {show(request.network_ip)} is not an IP address")

    header = request.account_code_header
    if header:
        if address is not None and any(address in network for network in config.trusted_networks):
            account = catalog.accounts_by_number.get(header)
            return Identity("header", header, account, request.destination, source=str(address))
        notes.append(f"account-code header ignored: source {address or 'unknown'} is not a trusted proxy")

    detail = "; ".join(notes) or "no credentials: no SIP user, source address or header"
    return Refusal(Reason.AUTHENTICATION_FAIL, detail, account_id)
