"""The IP map: networks (and tech prefixes) that identify an account's calls."""

from __future__ import annotations

from typing import Any

from psycopg import sql

from engine.admin import schemas as s
from engine.admin.errors import NotFound
from engine.admin.service.base import (
    _CHILD_IMAGE,
    _IP_MAP,
    _non_null_changes,
    _row,
    _set_clause,
)
from engine.admin.service.claims import ClaimsMixin


class IpMapMixin(ClaimsMixin):
    """IP map entries."""

    def list_ip_map(self, number: str) -> list[s.IpMapOut]:
        rows = self._account_children(
            number,
            "SELECT id, cidr::text AS cidr, tech_prefix, name, active FROM ip_map"
            " WHERE account_id = %s ORDER BY id",
        )
        return [s.IpMapOut(**r) for r in rows]

    def add_ip_map(self, number: str, data: s.IpMapCreate) -> s.IpMapOut:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            self._check_ip_claim(account, data.cidr, data.tech_prefix, None)
            image = self._insert_child(
                account,
                _IP_MAP,
                f"{data.cidr} {data.tech_prefix}".strip(),
                {
                    "cidr": data.cidr,
                    "tech_prefix": data.tech_prefix,
                    "name": data.name,
                    "active": data.active,
                },
            )
        return s.IpMapOut(**image)

    def update_ip_map(self, number: str, entry_id: int, data: Any) -> s.IpMapOut:
        given = _non_null_changes(data)
        with self.conn.transaction():
            account = self._find(number, lock=True)
            current = self._child_rows(
                "SELECT id, cidr::text AS cidr, tech_prefix, name, active FROM ip_map"
                " WHERE account_id = %s AND id = %s FOR UPDATE",
                [account["id"], entry_id],
            )
            if not current:
                raise NotFound(f"IP map entry {entry_id} not found")
            merged = {**current[0], **given}
            if not given:
                return s.IpMapOut(**current[0])
            self._check_ip_claim(account, merged["cidr"], merged["tech_prefix"], entry_id)
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="ip_map"))
            image = self._child_write(
                account,
                "ip_map.update",
                "ip_map",
                str(entry_id),
                sql.SQL("UPDATE ip_map SET {} WHERE id = %s RETURNING {}").format(
                    _set_clause(given), image_sql
                ),
                [*given.values(), entry_id],
                before_query=sql.SQL("SELECT {} FROM ip_map WHERE id = %s").format(image_sql),
                before_params=[entry_id],
            )
        return s.IpMapOut(**{**_row(image), "id": entry_id})

    def delete_ip_map(self, number: str, entry_id: int) -> None:
        self._delete_child(number, _IP_MAP, entry_id)
