"""The customer grid: filters, sorting, paging and the streamed export."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from engine.admin import schemas as s
from engine.admin.errors import ValidationFailed
from engine.admin.service.base import (
    ServiceBase,
    _row,
)


def _like(value: str, op: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return {
        "begins": f"{escaped}%",
        "ends": f"%{escaped}",
        "contains": f"%{escaped}%",
        "not_contains": f"%{escaped}%",
    }[op]


_GRID_SELECT = """
SELECT a.kind AS entity_type,
       CASE WHEN a.postpaid THEN 'postpaid' ELSE 'prepaid' END AS account_type,
       a.number, a.first_name, a.last_name, a.company, a.email, rg.name AS rate_group,
       a.balance, a.credit_limit, a.currency, a.first_used, a.expiry, a.max_channels AS concurrent_calls,
       loc.name AS localization, r.number AS reseller, a.created_at AS created, a.status, a.billing_schedule
  FROM accounts a
  LEFT JOIN rate_groups rg ON rg.id = a.rate_group_id
  LEFT JOIN localizations loc ON loc.id = a.localization_id
  LEFT JOIN accounts r ON r.id = a.reseller_id
"""

# grid column -> SQL expression (filters and sorting)
_GRID_EXPR = {
    "entity_type": "a.kind",
    "account_type": "a.postpaid",
    "number": "a.number",
    "first_name": "a.first_name",
    "last_name": "a.last_name",
    "company": "a.company",
    "email": "coalesce(a.email, '')",
    "rate_group": "coalesce(rg.name, '')",
    "balance": "a.balance",
    "credit_limit": "a.credit_limit",
    "first_used": "a.first_used",
    "expiry": "a.expiry",
    "concurrent_calls": "a.max_channels",
    "localization": "coalesce(loc.name, '')",
    "reseller": "coalesce(r.number, '')",
    "created": "a.created_at",
    "status": "a.status",
    "billing_schedule": "a.billing_schedule",
}
_TEXT_FILTERS = (
    "number",
    "first_name",
    "last_name",
    "company",
    "email",
    "rate_group",
    "localization",
    "reseller",
)
_RANGE_FILTERS = {
    "balance_min": ("balance", ">="),
    "balance_max": ("balance", "<="),
    "credit_limit_min": ("credit_limit", ">="),
    "credit_limit_max": ("credit_limit", "<="),
    "concurrent_calls_min": ("concurrent_calls", ">="),
    "concurrent_calls_max": ("concurrent_calls", "<="),
    "first_used_from": ("first_used", ">="),
    "first_used_to": ("first_used", "<="),
    "expiry_from": ("expiry", ">="),
    "expiry_to": ("expiry", "<="),
    "created_from": ("created", ">="),
    "created_to": ("created", "<="),
}


class GridMixin(ServiceBase):
    """List, search and export customers."""

    def _grid_where(self, q: s.CustomerFilter) -> tuple[sql.Composable, list[Any]]:
        parts: list[sql.Composable] = [
            sql.SQL("NOT a.deleted AND a.kind IN ('customer', 'provider')"),
            self._scope(),
        ]
        params: list[Any] = []
        for name in _TEXT_FILTERS:
            value = getattr(q, name)
            if value is None:
                continue
            op = getattr(q, f"{name}_op") or ("begins" if name == "number" else "contains")
            expr = sql.SQL(_GRID_EXPR[name])
            if name == "reseller" and value.lower() == "admin":
                parts.append(sql.SQL("a.reseller_id IS NULL" if op != "ne" else "a.reseller_id IS NOT NULL"))
                continue
            if op in ("eq", "ne"):
                parts.append(
                    sql.SQL("lower({}) {} lower(%s)").format(expr, sql.SQL("=" if op == "eq" else "<>"))
                )
                params.append(value)
            else:
                like = "NOT ILIKE" if op == "not_contains" else "ILIKE"
                parts.append(sql.SQL("{} {} %s").format(expr, sql.SQL(like)))
                params.append(_like(value, op))
        for name, (column, op) in _RANGE_FILTERS.items():
            value = getattr(q, name)
            if value is not None:
                parts.append(sql.SQL("{} {} %s").format(sql.SQL(_GRID_EXPR[column]), sql.SQL(op)))
                params.append(value)
        for name, column in (
            ("entity_type", "a.kind"),
            ("status", "a.status"),
            ("billing_schedule", "a.billing_schedule"),
        ):
            value = getattr(q, name)
            if value is not None:
                parts.append(sql.SQL(f"{column} = %s"))
                params.append(value)
        if q.account_type is not None:
            parts.append(sql.SQL("a.postpaid = %s"))
            params.append(q.account_type == "postpaid")
        return sql.SQL(" AND ").join(parts), params

    def _grid_order(self, q: s.CustomerFilter) -> sql.Composable:
        sort = str(q.sort)
        key = sort.lstrip("-")
        direction = "DESC" if sort.startswith("-") else "ASC"
        return sql.SQL("ORDER BY {} {}, a.id {}").format(
            sql.SQL(_GRID_EXPR[key]), sql.SQL(direction), sql.SQL(direction)
        )

    def list_customers(self, q: s.CustomerQuery) -> s.CustomerPage:
        """The customer grid: customers and providers (resellers' customers included), one page."""
        if q.per_page > self.settings.max_page_size:
            raise ValidationFailed.one("per_page", f"at most {self.settings.max_page_size}")
        where, params = self._grid_where(q)
        base = sql.SQL(_GRID_SELECT + " WHERE {}").format(where)
        total = _row(
            self.conn.execute(sql.SQL("SELECT count(*) FROM ({}) g").format(base), params).fetchone()
        )[0]
        query = sql.SQL("{} {} LIMIT %s OFFSET %s").format(base, self._grid_order(q))
        with self.conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(query, [*params, q.per_page, (q.page - 1) * q.per_page]).fetchall()
        return s.CustomerPage(
            items=[s.CustomerRow(**r) for r in rows], page=q.page, per_page=q.per_page, total=total
        )

    def iter_customers(self, q: s.CustomerFilter) -> Iterator[s.CustomerRow]:
        """Every row of the search (no paging), streamed from a server-side cursor."""
        where, params = self._grid_where(q)
        query = sql.SQL(_GRID_SELECT + " WHERE {} {}").format(where, self._grid_order(q))
        with self.conn.transaction(), self.conn.cursor(name="callgate_export", row_factory=dict_row) as cur:
            cur.itersize = 2000
            cur.execute(query, params)
            for row in cur:
                yield s.CustomerRow(**row)
