"""The sofia gateways' carrier passwords, read from PostgreSQL by ``callgate fsxml`` itself.

Sofia needs a gateway's password in clear to register with the carrier, so it has to be
sent to FreeSWITCH; but the snapshot is copied into every engine process and every Redis
replica, and issue 15 wants no clear secret there. So the snapshot's gateways carry no
password, and this process reads ``gateways.password`` from PostgreSQL:

* once at start, then again whenever the snapshot holder reports a gateway change (a live
  change event naming a gateway, or a whole new snapshot: :meth:`on_change`,
  :meth:`on_swap`); a password-only UPDATE is such a change too, as the live sync
  publishes every changed row, whatever its fields. A slow periodic read
  (``refresh_every``) repairs anything missed. Never per request: answers read memory.
* PostgreSQL unreachable: the passwords held are kept and served, and the read is retried
  every ``retry_every`` seconds; the first failure and the recovery are logged (never a
  password). Until a first read succeeded, :attr:`loaded` is False and the service answers
  gateway lookups 503 (engine.fsxml.server): a registering gateway without its password
  would be refused by the carrier, and FreeSWITCH falls back to its own configuration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from engine.state.watcher import offload_to_threadpool

log = logging.getLogger("callgate.fsxml")

Reader = Callable[[], Mapping[int, str]]


class GatewayPasswords:
    """gateway id -> password, as last read from PostgreSQL."""

    def __init__(
        self,
        read: Reader,
        *,
        offload: Callable[[Callable[[], Any]], Any] = offload_to_threadpool,
        refresh_every: float = 300.0,
        retry_every: float = 5.0,
    ) -> None:
        self._read = read
        self._offload = offload
        self._refresh_every = refresh_every
        self._retry_every = retry_every
        self._passwords: Mapping[int, str] = {}
        self._wanted = threading.Event()  # a gevent Event once monkey-patched
        self.loaded = False
        self.reads = 0  # successful reads
        self.failures = 0  # length of the current failure streak

    def password_of(self, gateway_id: int) -> str:
        return self._passwords.get(gateway_id, "")

    # --- the holder's callbacks: a gateway changed ----------------------------------------------

    def on_swap(self, version: int, value: Any) -> None:
        self.request_refresh()  # a whole new snapshot may carry any change

    def on_change(self, version: int, value: Any, changed: Mapping[str, Any]) -> None:
        if "gateways" in changed:
            self.request_refresh()

    def request_refresh(self) -> None:
        self._wanted.set()

    # --- reading ----------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Read the passwords now (in a thread: psycopg blocks); keep the old ones on failure."""
        try:
            passwords = dict(self._offload(self._read))
        except Exception as exc:
            self.failures += 1
            if self.failures == 1:
                kind = type(exc).__name__  # not str(exc): a driver message may quote the connection string
                held = "serving the ones held" if self.loaded else "gateway lookups answer 503 until read"
                log.warning("fsxml: gateway credentials not read from PostgreSQL (%s): %s", kind, held)
            return False
        self._passwords = passwords  # one assignment: an answer sees the old set or the new one
        self.reads += 1
        if self.failures:
            log.info("fsxml: gateway credentials read again after %d failures", self.failures)
        self.failures = 0
        self.loaded = True
        return True

    def run(self, stop: Any) -> None:
        """Read now, then on each request_refresh, every refresh_every, every retry_every while failing."""
        while not stop.is_set():
            self._wanted.clear()  # before the read: a change during it asks for one more
            ok = self.refresh()
            deadline = time.monotonic() + (self._refresh_every if ok else self._retry_every)
            while not stop.is_set() and not self._wanted.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wanted.wait(min(remaining, 0.5))  # stop is noticed within half a second


def postgres_reader(url: str, connect_timeout: float) -> Reader:
    """A reader over a connection of its own per read (reads are rare: changes and a timer)."""

    def read() -> Mapping[int, str]:
        import psycopg

        from engine.db.loader import load_gateway_passwords

        with psycopg.connect(
            url,
            connect_timeout=max(1, int(connect_timeout)),
            autocommit=True,
            application_name="callgate-fsxml",
        ) as conn:
            return load_gateway_passwords(conn)

    return read
