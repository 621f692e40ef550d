"""Balance: refills, charges, the charge history and the refill report."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import dict_row

from engine.admin import schemas as s
from engine.admin.errors import NotFound, ValidationFailed
from engine.admin.service.base import (
    ServiceBase,
    _RefCache,
    _row,
)


class BalanceMixin(ServiceBase):
    """Refills and charges."""

    def _move_balance(
        self, number: str, kind: str, amount: Decimal, description: str, reference: str, method: str
    ) -> s.LedgerEntryOut:
        if amount <= 0:
            raise ValidationFailed.one("amount", "must be greater than 0")
        signed = amount if kind == "refill" else -amount
        with self.conn.transaction():
            row = self._find(number, lock=True)
            before = self._account_image(row["id"])
            try:
                balance = _row(
                    self.conn.execute(
                        "UPDATE accounts SET balance = balance + %s WHERE id = %s RETURNING balance",
                        [signed, row["id"]],
                    ).fetchone()
                )[0]
            except pg_errors.NumericValueOutOfRange:
                raise ValidationFailed.one("amount", "would take the balance out of range") from None
            with self.conn.cursor(row_factory=dict_row) as cur:
                entry = cur.execute(
                    "INSERT INTO balance_changes (account_id, kind, amount, balance_after, currency,"
                    " description, reference, method, actor)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *",
                    [
                        row["id"],
                        kind,
                        signed,
                        balance,
                        row["currency"],
                        description,
                        reference,
                        method,
                        self.actor.name,
                    ],
                ).fetchone()
            entry = _row(entry)
            after = self._account_image(row["id"])
            self._audit(
                f"balance.{kind}",
                "account",
                number,
                row["id"],
                {"balance": before["balance"]},
                {"balance": after["balance"], "ledger_id": entry["id"]},
            )
        return s.LedgerEntryOut(**entry, account=number)

    def refill(self, number: str, data: s.RefillIn) -> s.LedgerEntryOut:
        """Top-up: the customer holds `amount` more (a postpaid account's debt shrinks)."""
        return self._move_balance(
            number, "refill", data.amount, data.description, data.reference, data.method
        )

    def charge(self, number: str, data: s.ChargeIn) -> s.LedgerEntryOut:
        """Post a charge: the customer holds `amount` less."""
        return self._move_balance(number, "charge", data.amount, data.description, data.reference, "")

    def _ledger(
        self, where: list[sql.Composable], params: list[Any], page: int, per_page: int
    ) -> s.LedgerPage:
        if per_page > self.settings.max_page_size:
            raise ValidationFailed.one("per_page", f"at most {self.settings.max_page_size}")
        cond = sql.SQL(" AND ").join([self._scope(), *where])
        base = sql.SQL("FROM balance_changes b JOIN accounts a ON a.id = b.account_id WHERE {}").format(cond)
        with self.conn.cursor(row_factory=dict_row) as cur:
            totals = cur.execute(
                sql.SQL(
                    "SELECT b.currency, count(*) AS count, sum(b.amount) AS amount {} GROUP BY b.currency"
                    " ORDER BY b.currency"
                ).format(base),
                params,
            ).fetchall()
            rows = cur.execute(
                sql.SQL("SELECT b.*, a.number AS account {} ORDER BY b.id DESC LIMIT %s OFFSET %s").format(
                    base
                ),
                [*params, per_page, (page - 1) * per_page],
            ).fetchall()
        return s.LedgerPage(
            items=[s.LedgerEntryOut(**r) for r in rows],
            page=page,
            per_page=per_page,
            total=sum(t["count"] for t in totals),
            totals=[s.CurrencyTotal(**t) for t in totals],
        )

    def ledger(self, number: str, q: s.LedgerQuery) -> s.LedgerPage:
        """The account's charge history: every balance change made here, newest first."""
        account = self._find(number)
        where: list[sql.Composable] = [sql.SQL("b.account_id = %s")]
        params: list[Any] = [account["id"]]
        for value, clause in ((q.since, "b.at >= %s"), (q.until, "b.at <= %s"), (q.kind, "b.kind = %s")):
            if value is not None:
                where.append(sql.SQL(clause))
                params.append(value)
        return self._ledger(where, params, q.page, q.per_page)

    def refill_report(self, q: s.RefillQuery) -> s.LedgerPage:
        """Refills across the actor's accounts, filtered by account, reseller subtree and period."""
        where: list[sql.Composable] = [sql.SQL("b.kind = 'refill'")]
        params: list[Any] = []
        if q.account is not None:
            where.append(sql.SQL("a.number = %s AND NOT a.deleted"))
            params.append(q.account)
        if q.reseller is not None:
            reseller_id = self._reseller_id(q.reseller, _RefCache())
            if reseller_id is None:
                raise NotFound(f"reseller {q.reseller} not found")
            where.append(
                sql.SQL(
                    "a.id IN (WITH RECURSIVE subtree(id) AS (SELECT id FROM accounts WHERE reseller_id = %s"
                    " UNION SELECT c.id FROM accounts c JOIN subtree t ON c.reseller_id = t.id)"
                    " SELECT id FROM subtree)"
                )
            )
            params.append(reseller_id)
        for value, clause in ((q.since, "b.at >= %s"), (q.until, "b.at <= %s")):
            if value is not None:
                where.append(sql.SQL(clause))
                params.append(value)
        return self._ledger(where, params, q.page, q.per_page)
