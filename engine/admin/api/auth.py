"""Authentication before any database work.

A bearer token is first checked in memory: its shape (``cgt_`` and 43 URL-safe characters),
then its SHA-256 against the set of token digests this process has seen in ``api_tokens``.
Only a token that passes both costs a (pooled) connection, for the authoritative check:
not revoked, not expired, its reseller active. Clients without a valid token therefore
never hold a server backend.

The set of digests is refreshed when an unknown but well-formed token arrives (a token
created since the last refresh, by the CLI or another API process): ``WHERE id > last``,
an index range scan, one at a time and at most every ``REFRESH_INTERVAL`` seconds. Requests
that miss while a refresh runs wait for the next one, so a flood of forged tokens costs at
most one pooled connection and 20 small queries a second.
Revoked tokens stay in the set; the authoritative check refuses them.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from engine.admin.service import TOKEN_PREFIX, Actor, token_digest

from .db import Database

# What `callgate admin token create` makes: the prefix and secrets.token_urlsafe(32).
TOKEN_SHAPE = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{43}")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REFRESH_INTERVAL = 0.05  # seconds between two refreshes of the known digests


def bearer_token(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


@dataclass(frozen=True, slots=True)
class Identity:
    actor: Actor
    read_only: bool


class TokenGate:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._known: set[str] = set()
        self._max_id = 0
        self._lock = threading.Lock()
        self._refreshes_started = 0
        self._last_refresh = 0.0  # time.monotonic() when the last refresh began

    def known(self, token: str | None) -> str | None:
        """The token's digest if it is well formed and exists (or existed) in api_tokens; None
        otherwise. Uses the database only to learn tokens created since the last refresh."""
        if token is None or not TOKEN_SHAPE.fullmatch(token):
            return None
        digest = token_digest(token)
        if digest in self._known:
            return digest
        arrived_after = self._refreshes_started
        with self._lock:
            if self._refreshes_started == arrived_after:  # no refresh began since we arrived
                time.sleep(max(0.0, self._last_refresh + REFRESH_INTERVAL - time.monotonic()))
                self._refreshes_started += 1
                self._last_refresh = time.monotonic()
                self._refresh()
        return digest if digest in self._known else None

    def _refresh(self) -> None:
        conn = self._db.getconn()
        try:
            rows = conn.execute(
                "SELECT id, token_sha256 FROM api_tokens WHERE id > %s ORDER BY id", [self._max_id]
            ).fetchall()
        finally:
            self._db.putconn(conn)
        for token_id, digest in rows:
            self._known.add(digest)
            self._max_id = max(self._max_id, token_id)

    def identify(self, digest: str) -> Identity | None:
        """The authoritative check of a known digest, on a pooled connection held only for it."""
        conn = self._db.getconn()
        try:
            row = conn.execute(
                "SELECT t.id, t.name, t.reseller_id, r.number, t.read_only,"
                " t.last_used_at < now() - interval '1 minute' OR t.last_used_at IS NULL"
                " FROM api_tokens t LEFT JOIN accounts r ON r.id = t.reseller_id"
                " WHERE t.token_sha256 = %s AND t.revoked_at IS NULL"
                " AND (t.expires_at IS NULL OR t.expires_at > now())"
                " AND (t.reseller_id IS NULL OR (NOT r.deleted AND r.status = 'active'))",
                [digest],
            ).fetchone()
            if row is None:
                return None
            token_id, name, reseller_id, reseller_number, read_only, stale = row
            if stale:
                conn.execute("UPDATE api_tokens SET last_used_at = now() WHERE id = %s", [token_id])
        finally:
            self._db.putconn(conn)
        actor = Actor(
            name=f"token:{token_id}:{name}",
            reseller_id=reseller_id,
            reseller_number=reseller_number,
            token_id=token_id,
        )
        return Identity(actor, bool(read_only))
