"""Who may sign in to the web admin, and how failed sign-ins are throttled.

Two kinds of user:

- *staff*, named in ``[web] users`` as ``name = "<role>:<scrypt hash>"``: role ``admin`` acts as the
  admin (everything), role ``readonly`` reads everything the admin reads and changes nothing;
- *resellers*, who sign in with their account number and account password (the scrypt hash in
  ``accounts.password_hash``) and see exactly the subtree their API token would see. A reseller
  listed in ``[web] readonly_resellers`` signs in read-only.

A session remembers the user's name, kind and a fingerprint of the password hash; every request
loads the user again (a reseller from the database), so a deleted or deactivated reseller, or a
changed password, ends the session at its next request.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import psycopg

from engine.admin.service import Actor
from engine.config import WebSettings
from engine.db.hashing import hash_secret, verify_secret

STAFF = "staff"
RESELLER = "reseller"

# Checked against when the user does not exist, so that an unknown name costs the same scrypt
# work as a wrong password (the answer time does not tell which names exist).
_DUMMY_HASH = hash_secret("callgate-web-no-such-user")

_RESELLER_QUERY = (
    "SELECT id, number, password_hash FROM accounts"
    " WHERE number = %s AND kind = 'reseller' AND NOT deleted AND status = 'active'"
)


@dataclass(frozen=True, slots=True)
class WebUser:
    name: str  # the sign-in name: a staff name or a reseller's account number
    kind: str  # STAFF or RESELLER
    read_only: bool
    fingerprint: str  # of the password hash: a new password ends the sessions signed in with the old
    reseller_id: int | None = None
    reseller_number: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.reseller_id is None

    @property
    def role(self) -> str:
        scope = "admin" if self.is_admin else f"reseller {self.reseller_number}"
        return f"{scope}, read-only" if self.read_only else scope

    def actor(self) -> Actor:
        """The service's actor: audited as ``web:<name>``, scoped like the user's API token."""
        prefix = "web:reseller:" if self.kind == RESELLER else "web:"
        return Actor(
            name=prefix + self.name, reseller_id=self.reseller_id, reseller_number=self.reseller_number
        )


def _fingerprint(stored_hash: str) -> str:
    return hashlib.sha256(stored_hash.encode()).hexdigest()[:16]


def _staff(settings: WebSettings, name: str) -> tuple[str, str] | None:
    entry = settings.users.get(name)
    if entry is None:
        return None
    role, _, stored = entry.partition(":")
    return role, stored


def _reseller_row(conn: psycopg.Connection[Any], number: str) -> tuple[int, str, str | None] | None:
    if not number.isdigit() or len(number) > 20:
        return None
    row = conn.execute(_RESELLER_QUERY, [number]).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _reseller_user(settings: WebSettings, row: tuple[int, str, str | None]) -> WebUser:
    reseller_id, number, stored = row
    return WebUser(
        name=number,
        kind=RESELLER,
        read_only=number in settings.readonly_resellers,
        fingerprint=_fingerprint(stored or ""),
        reseller_id=reseller_id,
        reseller_number=number,
    )


def check_password(
    settings: WebSettings, conn: psycopg.Connection[Any], name: str, password: str
) -> WebUser | None:
    """The user `name` if `password` is theirs; None otherwise (always after one scrypt check)."""
    staff = _staff(settings, name)
    if staff is not None:
        role, stored = staff
        if verify_secret(password, stored):
            return WebUser(name, STAFF, role == "readonly", _fingerprint(stored))
        return None
    row = _reseller_row(conn, name)
    if row is None or not row[2]:
        verify_secret(password, _DUMMY_HASH)
        return None
    return _reseller_user(settings, row) if verify_secret(password, row[2]) else None


def load_user(settings: WebSettings, conn: psycopg.Connection[Any], session: Any) -> WebUser | None:
    """The user a session stands for, if it still may sign in with the same password."""
    name, kind, fingerprint = session.get("u"), session.get("k"), session.get("f")
    if not isinstance(name, str) or not isinstance(fingerprint, str):
        return None
    if kind == STAFF:
        staff = _staff(settings, name)
        if staff is None or _fingerprint(staff[1]) != fingerprint:
            return None
        return WebUser(name, STAFF, staff[0] == "readonly", fingerprint)
    if kind == RESELLER:
        row = _reseller_row(conn, name)
        if row is None or _fingerprint(row[2] or "") != fingerprint:
            return None
        return _reseller_user(settings, row)
    return None


class Throttle:
    """Failed sign-ins per user name and per source address, in a sliding window (this process).

    Checked before the password is (a throttled attempt costs no scrypt work and is refused
    whether the password is right or not); a successful sign-in clears the name's failures, not the
    source's."""

    def __init__(self, per_name: int, per_source: int, window: float, max_keys: int = 100_000) -> None:
        self.limits = {"name": per_name, "source": per_source}
        self.max_keys = max_keys
        self.window = window
        self._failures: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures[key]
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def retry_after(self, name: str, source: str, now: float | None = None) -> float:
        """Seconds until `name` from `source` may try again; 0 = now."""
        now = time.monotonic() if now is None else now
        wait = 0.0
        with self._lock:
            for key in (("name", name.lower()), ("source", source)):
                times = self._recent(key, now)
                if len(times) >= self.limits[key[0]]:
                    wait = max(wait, times[0] + self.window - now)
                if not times:
                    self._failures.pop(key, None)
        return wait

    def failed(self, name: str, source: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._failures) >= self.max_keys:
                self._forget_old(now)
            for key in (("name", name.lower()), ("source", source)):
                self._recent(key, now).append(now)

    def _forget_old(self, now: float) -> None:
        """Bound the memory a flood of made-up names costs: drop keys with no failure left in the
        window, then (still full) the keys whose last failure is oldest."""
        for key in [k for k, times in self._failures.items() if not times or times[-1] <= now - self.window]:
            del self._failures[key]
        if len(self._failures) >= self.max_keys:
            by_age = sorted(self._failures, key=lambda k: self._failures[k][-1])
            for key in by_age[: len(by_age) - self.max_keys // 2]:
                del self._failures[key]

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(("name", name.lower()), None)
