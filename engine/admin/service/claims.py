"""The ownership rule at write time: identification data never claimed across tenants.

The rule itself (tenants, what conflicts, why) is in engine.db.ownership; the snapshot build
enforces it again. Here a write that would conflict is refused with a 409 ``Conflict``:

- with an entry of another tenant, whoever writes (the admin too: it removes the other first);
- for a reseller, also with an entry outside its own subtree (a sub-reseller never claims its
  parent's other customers' calls), and networks wider than /24 or /48 need the admin.

A reseller is told that the data is claimed elsewhere, never by whom; the admin is told which
account holds it. Claims are serialised by one advisory lock, so two concurrent writers cannot
both pass the check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from psycopg import sql

from engine.admin.errors import Conflict, FieldError, Forbidden
from engine.admin.service.base import ServiceBase
from engine.db import ownership

CLAIMS_LOCK_KEY = 0x63616C6C636C6D73  # pg_advisory_xact_lock: one identification claim at a time


class ClaimsMixin(ServiceBase):
    """Checks that a new or changed identification entry claims no other tenant's calls."""

    def _lock_claims(self) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", [CLAIMS_LOCK_KEY])

    def _tenants(self, account_ids: Iterable[int]) -> dict[int, ownership.Tenant]:
        """Each account's tenant (its top-level reseller, or None for the admin's own accounts)."""
        ids = sorted(set(account_ids))
        if not ids:
            return {}
        rows = self.conn.execute(
            "WITH RECURSIVE up(start, id, reseller_id, kind, depth) AS ("
            " SELECT a.id, a.id, a.reseller_id, a.kind, 0 FROM accounts a WHERE a.id = ANY(%s)"
            " UNION ALL SELECT up.start, p.id, p.reseller_id, p.kind, up.depth + 1"
            " FROM up JOIN accounts p ON p.id = up.reseller_id WHERE up.depth < 64)"
            " SELECT DISTINCT ON (start) start, id, kind FROM up ORDER BY start, depth DESC",
            [ids],
        ).fetchall()
        return {start: ownership.tenant_of_top(top, kind) for start, top, kind in rows}

    def _outside_scope(self, account_ids: Iterable[int]) -> set[int]:
        """The accounts among `account_ids` the actor cannot see (none for the admin)."""
        ids = sorted(set(account_ids))
        if self.actor.is_admin or not ids:
            return set()
        query = sql.SQL("SELECT a.id FROM accounts a WHERE a.id = ANY(%s) AND {}").format(self._scope())
        visible = {r[0] for r in self.conn.execute(query, [ids]).fetchall()}
        return set(ids) - visible

    def _rivals(self, account_id: int, holders: Mapping[int, Any]) -> list[tuple[int, Any]]:
        """The (account, entry) pairs of `holders` this account may not share a claim with."""
        if not holders:
            return []
        tenant = self._tenants([account_id, *holders])
        hidden = self._outside_scope(holders)
        return [
            (holder, entry)
            for holder, entry in holders.items()
            if holder != account_id and (tenant.get(holder) != tenant.get(account_id) or holder in hidden)
        ]

    def _refuse(self, field: str, what: str, rivals: list[tuple[int, Any]]) -> None:
        if not rivals:
            return
        if not self.actor.is_admin:
            message = f"{what} is already claimed by an account outside your accounts"
        else:
            numbers = self.conn.execute(
                "SELECT number FROM accounts WHERE id = ANY(%s) ORDER BY number", [[r[0] for r in rivals]]
            ).fetchall()
            message = f"{what} is already claimed by another tenant's account " + ", ".join(
                n for (n,) in numbers
            )
        raise Conflict([FieldError(field, message + " (identification data is never shared across tenants)")])

    # -- the IP map

    def _check_ip_claim(
        self, account: Mapping[str, Any], cidr: str, tech_prefix: str, own_id: int | None
    ) -> None:
        """Refuse an IP map entry that could take calls of an account of another tenant."""
        if not self.actor.is_admin and ownership.too_wide_for_reseller(cidr):
            net = ownership.network(cidr)
            limit = ownership.RESELLER_MIN_PREFIXLEN[net.version]
            raise Forbidden(f"cidr: {net} is wider than /{limit}: mapping it needs an admin token")
        self._lock_claims()
        rows = self.conn.execute(
            "SELECT id, account_id, cidr::text, tech_prefix FROM ip_map"
            " WHERE (cidr >>= %s::cidr OR cidr <<= %s::cidr) AND id IS DISTINCT FROM %s ORDER BY id",
            [cidr, cidr, own_id],
        ).fetchall()
        holders: dict[int, Any] = {}
        for _entry_id, holder, other_cidr, other_prefix in rows:
            if ownership.ip_claims_conflict(cidr, tech_prefix, other_cidr, other_prefix):
                holders.setdefault(holder, other_cidr)
        what = ownership.describe_ip(cidr, tech_prefix)
        self._refuse("cidr", what, self._rivals(account["id"], holders))
        exact = self.conn.execute(
            "SELECT 1 FROM ip_map WHERE cidr = %s::cidr AND tech_prefix = %s AND id IS DISTINCT FROM %s",
            [cidr, tech_prefix, own_id],
        ).fetchone()
        if exact is not None:
            raise Conflict([FieldError("cidr", f"{what} is already mapped to an account")])

    # -- numbers: whitelisted caller IDs, forced caller IDs, DIDs

    def _check_number_claim(self, account: Mapping[str, Any], number: str, field: str) -> None:
        """Refuse a number another tenant holds as a DID, a whitelisted or a forced caller ID."""
        self._lock_claims()
        rows = self.conn.execute(
            "SELECT account_id FROM caller_ids WHERE number = %s"
            " UNION SELECT account_id FROM forced_caller_ids WHERE number = %s"
            " UNION SELECT account_id FROM dids WHERE number = %s AND account_id IS NOT NULL",
            [number, number, number],
        ).fetchall()
        holders = {holder: number for (holder,) in rows}
        self._refuse(field, f"number {number}", self._rivals(account["id"], holders))
