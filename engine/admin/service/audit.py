"""Reading the audit log."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from engine.admin import schemas as s
from engine.admin.errors import ValidationFailed
from engine.admin.service.base import (
    ServiceBase,
    _row,
    without_secrets,
)


class AuditMixin(ServiceBase):
    """The audit log."""

    def audit_log(self, q: s.AuditQuery) -> s.AuditPage:
        """Audit entries about the actor's accounts (the admin sees every entry), newest first."""
        if q.per_page > self.settings.max_page_size:
            raise ValidationFailed.one("per_page", f"at most {self.settings.max_page_size}")
        where: list[sql.Composable] = [
            sql.SQL("TRUE")
            if self.actor.is_admin
            else sql.SQL("l.account_id IS NOT NULL AND {}").format(self._scope())
        ]
        params: list[Any] = []
        for value, clause in (
            (q.account, "a.number = %s"),
            (q.action, "l.action = %s"),
            (q.entity, "l.entity = %s"),
            (q.since, "l.at >= %s"),
            (q.until, "l.at <= %s"),
        ):
            if value is not None:
                where.append(sql.SQL(clause))
                params.append(value)
        base = sql.SQL("FROM audit_log l LEFT JOIN accounts a ON a.id = l.account_id WHERE {}").format(
            sql.SQL(" AND ").join(where)
        )
        total = _row(self.conn.execute(sql.SQL("SELECT count(*) {}").format(base), params).fetchone())[0]
        with self.conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                sql.SQL("SELECT l.*, a.number AS account {} ORDER BY l.id DESC LIMIT %s OFFSET %s").format(
                    base
                ),
                [*params, q.per_page, (q.page - 1) * q.per_page],
            ).fetchall()
        return s.AuditPage(
            items=[s.AuditEntryOut(**{**r, **_images(r)}) for r in rows],
            page=q.page,
            per_page=q.per_page,
            total=total,
        )


def _images(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"before": without_secrets(row["before"]), "after": without_secrets(row["after"])}
