"""A small catalogue for the fsxml tests (plain entities, as the snapshot holds them)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from engine.fsxml.directory import a1_hash
from engine.model import Account, AccountKind, CatalogData, Gateway, SipDevice

DOMAIN = "sip.example.com"
HOSTILE_NAME = "Eve <&\"'$${x}> x-pre-process"
GATEWAY_PASSWORDS = {22: "B3ta&<pw>"}
"""What ``callgate fsxml`` reads from PostgreSQL (engine.fsxml.credentials): not in the snapshot."""


def device(ident: int, account_id: int, username: str, password: str = "", **fields: Any) -> SipDevice:
    """A device as the sync publishes it: the a1-hash for DOMAIN (hand-computed), no password."""
    hashed = a1_hash(username, DOMAIN, password) if password else ""
    return SipDevice(ident, account_id, username, a1_hash=hashed, **fields)


def account(
    ident: int, number: str, *, active: bool = True, deleted: bool = False, codecs: str = ""
) -> Account:
    return Account(
        ident,
        number,
        AccountKind.CUSTOMER,
        None,
        active,
        deleted,
        False,
        Decimal(10),
        Decimal(0),
        None,
        codecs=codecs,
    )


def catalog() -> CatalogData:
    data = CatalogData(version=1)
    data.accounts = [
        account(1, "1000000001", codecs="G722,PCMU"),
        account(2, "1000000002", active=False),
        account(3, "1000000003", deleted=True),
        account(4, "1000000004"),
    ]
    data.sip_devices = [
        device(
            11,
            1,
            "alice",
            password="Wd3kM9pQs7Vx",
            caller_id_name="Alice Carter",
            caller_id_number="442079460001",
            context="public",
        ),
        device(12, 1, "alice-desk", active=False, password="x1"),
        device(13, 2, "bob", password="bobpass"),  # inactive account
        device(14, 3, "carol", password="carolpass"),  # deleted account
        device(15, 4, "dave", password="", codecs="PCMA"),  # no password
        device(16, 4, "eve", password='p<&>"$${pw}', caller_id_name=HOSTILE_NAME),
    ]
    data.gateways = [
        Gateway(21, "alpha-gw1", proxy="sip1.alpha.example", params=("caller-id-in-from=true", "ping=30")),
        Gateway(
            22, "beta-gw1", proxy="198.51.100.20", username="callgate", register=True
        ),  # its password: GATEWAY_PASSWORDS
        Gateway(23, "old-gw", active=False, proxy="192.0.2.1"),
        Gateway(24, "gamma-gw1", sip_profile="carriers", proxy="203.0.113.5"),
        Gateway(25, "register-wins", params=("register=true", "proxy=ignored.example")),
    ]
    return data
