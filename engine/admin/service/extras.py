"""Smaller per-account settings: speed dials, blocked codes, alert threshold, provider trunks."""

from __future__ import annotations

from psycopg import sql

from engine.admin import schemas as s
from engine.admin.errors import ValidationFailed
from engine.admin.service.base import (
    _BLOCKED_CODES,
    _CHILD_IMAGE,
    _SPEED_DIALS,
    ServiceBase,
    _notify_problem,
    _row,
    _set_clause,
)


class ExtrasMixin(ServiceBase):
    """Speed dials, blocked codes, alert threshold, trunks."""

    # -- speed dials

    def list_speed_dials(self, number: str) -> list[s.SpeedDialOut]:
        rows = self._account_children(
            number, "SELECT key, number FROM speed_dials WHERE account_id = %s ORDER BY key"
        )
        return [s.SpeedDialOut(**r) for r in rows]

    def set_speed_dial(self, number: str, key: str, data: s.SpeedDialIn) -> s.SpeedDialOut:
        key = s.parse(_SpeedDialKey, {"key": key}).key
        with self.conn.transaction():
            account = self._find(number, lock=True)
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="speed_dials"))
            image = self._child_write(
                account,
                "speed_dial.set",
                "speed_dial",
                key,
                sql.SQL(
                    "INSERT INTO speed_dials AS sd (account_id, key, number) VALUES (%s, %s, %s)"
                    " ON CONFLICT (account_id, key) DO UPDATE SET number = EXCLUDED.number RETURNING {}"
                ).format(sql.SQL(_CHILD_IMAGE.format(t="sd"))),
                [account["id"], key, data.number],
                before_query=sql.SQL(
                    "SELECT coalesce((SELECT {} FROM speed_dials WHERE account_id = %s"
                    " AND key = %s), 'null'::jsonb)"
                ).format(image_sql),
                before_params=[account["id"], key],
            )
        row = _row(image)
        return s.SpeedDialOut(key=row["key"], number=row["number"])

    def delete_speed_dial(self, number: str, key: str) -> None:
        self._delete_child(number, _SPEED_DIALS, key)

    # -- blocked codes

    def list_blocked_codes(self, number: str) -> list[s.BlockedCodeOut]:
        rows = self._account_children(
            number, "SELECT prefix, description FROM blocked_codes WHERE account_id = %s ORDER BY prefix"
        )
        return [s.BlockedCodeOut(**r) for r in rows]

    def add_blocked_code(self, number: str, data: s.BlockedCodeCreate) -> s.BlockedCodeOut:
        image = self._add_child(
            number, _BLOCKED_CODES, data.prefix, {"prefix": data.prefix, "description": data.description}
        )
        return s.BlockedCodeOut(prefix=image["prefix"], description=image["description"])

    def delete_blocked_code(self, number: str, prefix: str) -> None:
        self._delete_child(number, _BLOCKED_CODES, prefix)

    # -- alert threshold

    def get_alert_threshold(self, number: str) -> s.AlertThresholdOut:
        row = self._find(number)
        return s.AlertThresholdOut(
            notify_enabled=row["notify_enabled"],
            notify_balance_below=row["notify_balance_below"],
            notify_email=row["notify_email"],
        )

    def set_alert_threshold(self, number: str, data: s.AlertThreshold) -> s.AlertThresholdOut:
        given = data.model_dump(exclude_unset=True)
        if given.get("notify_enabled", True) is None:
            raise ValidationFailed.one("notify_enabled", "must not be null")
        with self.conn.transaction():
            row = self._find(number, lock=True)
            merged = {k: row[k] for k in ("notify_enabled", "notify_balance_below", "notify_email")} | given
            problem = _notify_problem(merged["notify_enabled"], merged["notify_balance_below"])
            if problem:
                raise ValidationFailed.one("notify_balance_below", problem)
            changed = {k: v for k, v in merged.items() if row[k] != v}
            if changed:
                before = self._account_image(row["id"])
                self._execute_write(
                    sql.SQL("UPDATE accounts SET {} WHERE id = %s").format(_set_clause(changed)),
                    [*changed.values(), row["id"]],
                )
                self._audit(
                    "alert_threshold.update",
                    "account",
                    number,
                    row["id"],
                    before,
                    self._account_image(row["id"]),
                )
        return s.AlertThresholdOut(**merged)

    # -- provider trunks

    def list_trunks(self, number: str) -> list[s.TrunkOut]:
        rows = self._account_children(
            number,
            "SELECT t.name, g.name AS gateway, t.active, t.precedence, t.max_channels, t.cps FROM trunks t"
            " JOIN gateways g ON g.id = t.gateway_id WHERE t.provider_id = %s ORDER BY t.name",
        )
        return [s.TrunkOut(**r) for r in rows]


class _SpeedDialKey(s._In):
    key: s.SpeedDialKey
