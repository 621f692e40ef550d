"""API tokens: create, list, revoke (the API checks bearer tokens in engine.admin.api.auth)."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from psycopg.rows import dict_row

from engine.admin import schemas as s
from engine.admin.errors import NotFound, ValidationFailed
from engine.admin.service.base import (
    ServiceBase,
    _RefCache,
    _row,
)


class TokensMixin(ServiceBase):
    """API tokens."""

    def create_token(
        self, name: str, reseller: str | None = None, expires_days: int | None = None, read_only: bool = False
    ) -> tuple[dict[str, Any], str]:
        """A new API token (admin scope, or one reseller's subtree; read-only: every write refused);
        the token is returned once."""
        self._require_admin("creating an API token")
        name = s.parse(_TokenName, {"name": name}).name
        if expires_days is not None and expires_days <= 0:
            raise ValidationFailed.one("expires_days", "must be at least 1")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.conn.transaction():
            reseller_id = None
            if reseller is not None:
                reseller_id = self._reseller_id(reseller, _RefCache())
                if reseller_id is None:
                    raise ValidationFailed.one("reseller", f"no reseller with number {reseller}")
            with self.conn.cursor(row_factory=dict_row) as cur:
                row = cur.execute(
                    "INSERT INTO api_tokens (name, token_sha256, token_hint, scope, reseller_id, created_by,"
                    " expires_at, read_only)"
                    " VALUES (%s, %s, %s, %s, %s, %s, now() + %s * interval '1 day', %s)"
                    " RETURNING id, name, token_hint, scope, reseller_id, created_at, created_by, expires_at,"
                    " read_only",
                    [
                        name,
                        token_digest(token),
                        token[:10],
                        "reseller" if reseller_id else "admin",
                        reseller_id,
                        self.actor.name,
                        expires_days,
                        read_only,
                    ],
                ).fetchone()
            row = _row(row)
            row["reseller"] = reseller
            self._audit(
                "token.create",
                "token",
                str(row["id"]),
                reseller_id,
                None,
                {k: v for k, v in row.items() if k != "reseller_id"},
            )
        return row, token

    def list_tokens(self) -> list[dict[str, Any]]:
        self._require_admin("listing API tokens")
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                "SELECT t.id, t.name, t.token_hint, t.scope, t.read_only, r.number AS reseller, t.created_at,"
                " t.created_by, t.expires_at, t.last_used_at, t.revoked_at FROM api_tokens t"
                " LEFT JOIN accounts r ON r.id = t.reseller_id ORDER BY t.id"
            ).fetchall()

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        self._require_admin("revoking an API token")
        with self.conn.transaction(), self.conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s"
                " RETURNING id, name, scope, reseller_id, revoked_at",
                [token_id],
            ).fetchone()
            if row is None:
                raise NotFound(f"token {token_id} not found")
            self._audit(
                "token.revoke",
                "token",
                str(token_id),
                row["reseller_id"],
                None,
                {k: v for k, v in row.items() if k != "reseller_id"},
            )
        return row


TOKEN_PREFIX = "cgt_"


def token_digest(token: str) -> str:
    """What api_tokens stores of a token (a 256-bit random secret needs no slow hash). The API
    checks bearer tokens with it, in engine.admin.api.auth."""
    return hashlib.sha256(token.encode()).hexdigest()


# --------------------------------------------------------------------------- small rules and helpers


class _TokenName(s._In):
    name: s.Name
