"""Caller IDs: the CLI pool's list and the forced caller ID."""

from __future__ import annotations

from typing import Any

from psycopg import sql

from engine.admin import schemas as s
from engine.admin.errors import NotFound
from engine.admin.service.base import (
    _CALLER_IDS,
    _CHILD_IMAGE,
    _non_null_changes,
    _row,
)
from engine.admin.service.claims import ClaimsMixin


class CallerIdsMixin(ClaimsMixin):
    """Caller IDs."""

    def list_caller_ids(self, number: str) -> list[s.CallerIdOut]:
        rows = self._account_children(
            number, "SELECT * FROM caller_ids WHERE account_id = %s ORDER BY number"
        )
        return [s.CallerIdOut(**r) for r in rows]

    def add_caller_id(self, number: str, data: s.CallerIdCreate) -> s.CallerIdOut:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            self._check_number_claim(account, data.number, "number")
            image = self._insert_child(
                account,
                _CALLER_IDS,
                data.number,
                {"number": data.number, "description": data.description, "active": data.active},
            )
        return s.CallerIdOut(**image)

    def update_caller_id(self, number: str, caller_id: str, data: Any) -> s.CallerIdOut:
        image = self._update_child(number, _CALLER_IDS, caller_id, _non_null_changes(data))
        return s.CallerIdOut(**image)

    def delete_caller_id(self, number: str, caller_id: str) -> None:
        self._delete_child(number, _CALLER_IDS, caller_id)

    # -- forced caller ID

    def get_forced_caller_id(self, number: str) -> s.ForcedCallerIdOut:
        rows = self._account_children(number, "SELECT * FROM forced_caller_ids WHERE account_id = %s")
        if not rows:
            raise NotFound(f"account {number} has no forced caller ID")
        return s.ForcedCallerIdOut(**rows[0])

    def set_forced_caller_id(self, number: str, data: s.ForcedCallerIdIn) -> s.ForcedCallerIdOut:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            self._check_number_claim(account, data.number, "number")
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="forced_caller_ids"))
            image = self._child_write(
                account,
                "forced_caller_id.set",
                "forced_caller_id",
                number,
                sql.SQL(
                    "INSERT INTO forced_caller_ids AS f (account_id, number, name, active)"
                    " VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (account_id) DO UPDATE SET number = EXCLUDED.number, name = EXCLUDED.name,"
                    " active = EXCLUDED.active RETURNING {}"
                ).format(sql.SQL(_CHILD_IMAGE.format(t="f"))),
                [account["id"], data.number, data.name, data.active],
                before_query=sql.SQL(
                    "SELECT coalesce((SELECT {} FROM forced_caller_ids WHERE account_id = %s), 'null'::jsonb)"
                ).format(image_sql),
                before_params=[account["id"]],
            )
        return s.ForcedCallerIdOut(**_row(image))

    def clear_forced_caller_id(self, number: str) -> None:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            image = self._child_write(
                account,
                "forced_caller_id.clear",
                "forced_caller_id",
                number,
                sql.SQL("DELETE FROM forced_caller_ids WHERE account_id = %s RETURNING NULL"),
                [account["id"]],
                before_query=sql.SQL(
                    "SELECT {} FROM forced_caller_ids WHERE account_id = %s FOR UPDATE"
                ).format(sql.SQL(_CHILD_IMAGE.format(t="forced_caller_ids"))),
                before_params=[account["id"]],
            )
            if image is None:
                raise NotFound(f"account {number} has no forced caller ID")
