"""FreeSWITCH's own CDR as the billing backstop: mod_json_cdr posts to ``callgate fsxml`` at ``/cdr``.

A call whose CHANNEL_HANGUP_COMPLETE the engine never sees (engine killed with calls up, socket
lost, restarted) would otherwise go unbilled. FreeSWITCH posts every channel's CDR once the
channel is over, whatever became of the engine; this module bills the A-leg from it with the
engine's own code and the prices the engine froze at its decision:

1. :mod:`engine.fsxml.jsoncdr` reads the post into the hangup headers the engine rates from;
2. the ``callgate_bill`` variable (engine.billing.ticket) gives the payers and prices decided;
3. :func:`engine.billing.calls.ticket_settlement` rates it and builds the CDR, exactly as the
   engine's hangup does;
4. :meth:`engine.billing.funds.Funds.settle` runs the settle script: release the reservation,
   add the debit to Redis ``spent``, XADD the CDR to the stream the sync worker writes into
   PostgreSQL, once per call UUID. Whoever settles first (engine or post) bills; the other
   is a no-op (the script's settled flag; after it expired, the CDR writer's duplicate check).

Outcomes (HTTP status; FreeSWITCH retries on anything but 2xx, then writes the CDR to its
``err-log-dir``):

* 200 ``billed``: settled now; 200 ``already billed``: the engine (or an earlier post) did;
* 200 ``ignored``: nothing to bill: a B-leg, a call callgate refused (the engine records the
  attempt itself), a call that never got a decision (``callgate_reason=ENGINE_UNREACHABLE``),
  a call accepted without a ticket (decided without accounting), a channel that never went
  through callgate; an answered call among those is logged;
* 400: not a CDR, no channel uuid, a ticket that does not decode, ``?uuid=`` not the
  document's, a debit over 10^9 (a forged billsec); with ``[billing] ticket_keys``, a ticket
  whose signature is missing or does not verify for the CDR's uuid; 415: another content type
  (each logged, caller text escaped);
* 503: no current snapshot (the accounts' ``calls_debited``), or Redis unreachable: the debit
  is not queued, so FreeSWITCH must retry.

After a settle (new or repeated) the call's limit slots are released too (idempotent, best
effort): a call whose engine died frees its concurrent-call slots at its real hangup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from engine.billing.calls import absurd, ticket_settlement
from engine.billing.funds import FundsUnavailable, Settlement
from engine.billing.ticket import TICKET_VARIABLE, BadSignature, BadTicket, decode_ticket, verify_ticket
from engine.fsxml.jsoncdr import CONTENT_TYPES, CdrPost, MalformedCdr, media_type, read_post
from engine.rules.text import show

log = logging.getLogger("callgate.fsxml.cdr")

PATH = "/cdr"
_ZERO = Decimal(0)
_LOG_EVERY = 60.0


class Settles(Protocol):
    def settle(self, item: Settlement) -> bool: ...


class Accounts(Protocol):
    """What the endpoint reads of the snapshot: each account's ``calls_debited``."""

    def calls_debited(self, account_id: int) -> Decimal | None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # HTTP status line
    text: str  # the short body (never caller-supplied text)
    kind: str  # billed, duplicate, ignored_*, malformed, bad_signature, unavailable


def _outcome(code: int, text: str, kind: str) -> Outcome:
    phrases = {200: "OK", 400: "Bad Request", 415: "Unsupported Media Type", 503: "Service Unavailable"}
    return Outcome(f"{code} {phrases[code]}", text, kind)


def _ignored_kind(post: CdrPost) -> str:
    """Why a CDR without a ticket carries nothing to bill."""
    if post.b_leg:
        return "ignored_b_leg"
    reason = post.variables.get("callgate_reason", "")
    if not reason:
        return "ignored_not_callgate"
    if reason == "ENGINE_UNREACHABLE":
        return "ignored_no_decision"
    if reason in ("ACCEPTED", "ROUTES_FAILED"):
        return "ignored_no_ticket"  # decided without accounting (or by an engine without tickets)
    return "ignored_rejected"


class CdrReceiver:
    """Turns one POST into its outcome; the WSGI application (engine.fsxml.server) calls it."""

    def __init__(
        self,
        funds: Settles,
        accounts: Callable[[], Accounts | None],
        *,
        release_limits: Callable[[str], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        ticket_keys: tuple[bytes, ...] = (),
    ) -> None:
        self._funds = funds
        # [billing] ticket_keys: a ticket bills only when one verifies it for the CDR's uuid.
        self._ticket_keys = ticket_keys
        self._accounts = accounts  # None while no current snapshot
        # The call is over: its concurrent-call slots can go now rather than wait for the
        # reconciler when its engine died (idempotent: the engine's own release is a no-op).
        self._release_limits = release_limits
        self._clock = clock
        self._logged: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # outcome kind -> posts since start
        self._summary_at = clock()
        self._summarised: dict[str, int] = {}

    def receive(self, body: bytes, content_type: str, query_uuid: str | None) -> Outcome:
        outcome = self._receive(body, content_type, query_uuid)
        self.counts[outcome.kind] = self.counts.get(outcome.kind, 0) + 1
        self._summary()
        return outcome

    def _summary(self) -> None:
        """One INFO line a minute with what the posts did since the last one (no line per post:
        every call posts; Prometheus counts them, engine.fsxml.metrics)."""
        now = self._clock()
        if now - self._summary_at < _LOG_EVERY:
            return
        since = {k: v - self._summarised.get(k, 0) for k, v in self.counts.items()}
        since = {k: v for k, v in since.items() if v}
        if since:
            log.info(
                "cdr posts since the last report: %s", ", ".join(f"{k} {v}" for k, v in sorted(since.items()))
            )
        self._summary_at, self._summarised = now, dict(self.counts)

    def _receive(self, body: bytes, content_type: str, query_uuid: str | None) -> Outcome:
        if media_type(content_type) not in (*CONTENT_TYPES, ""):
            self._warn("unsupported", "cdr post refused: content type %s", show(media_type(content_type), 60))
            return _outcome(415, "json, form or base64 form\n", "malformed")
        try:
            post = read_post(body, content_type)
        except MalformedCdr as exc:
            self._warn("malformed", "cdr post refused (400): %s", show(str(exc), 120))
            return _outcome(400, "not a mod_json_cdr document\n", "malformed")
        if query_uuid is not None and query_uuid != post.uuid:
            self._warn(
                "uuid",
                "cdr post refused (400): ?uuid=%s but the CDR is %s",
                show(query_uuid, 64),
                show(post.uuid, 64),
            )
            return _outcome(400, "uuid mismatch\n", "malformed")
        text = post.variables.get(TICKET_VARIABLE)
        if not text:
            return self._ignored(post)
        try:
            ticket = decode_ticket(verify_ticket(text, post.uuid, self._ticket_keys))
        except BadSignature as exc:
            # A forged or altered ticket, one copied from another call, or an engine without
            # (or with other) keys: never billed; the engine bills the calls it saw itself.
            self._warn(
                "signature",
                "cdr post uuid=%s refused (400): %s %s",
                show(post.uuid, 64),
                TICKET_VARIABLE,
                str(exc),
            )
            return _outcome(400, "bad ticket signature\n", "bad_signature")
        except BadTicket as exc:
            self._warn(
                "ticket",
                "cdr post uuid=%s refused (400): %s %s",
                show(post.uuid, 64),
                TICKET_VARIABLE,
                show(str(exc), 120),
            )
            return _outcome(400, "bad billing ticket\n", "malformed")
        accounts = self._accounts()
        if accounts is None:
            self._warn(
                "snapshot", "cdr post uuid=%s not billed yet (503): no current snapshot", show(post.uuid, 64)
            )
            return _outcome(503, "no current snapshot\n", "unavailable")

        def recorded(account_id: int) -> Decimal:
            value = accounts.calls_debited(account_id)
            return _ZERO if value is None else value

        item, rated, end = ticket_settlement(post.headers(), ticket, recorded)
        why = absurd(rated)
        if why is not None:
            # Only a forged post gets here (a billsec of centuries): Redis's 64-bit counters, or
            # the CDR writer, would refuse it and FreeSWITCH would be told to retry forever.
            self._warn("absurd", "cdr post uuid=%s refused (400): %s", show(post.uuid, 64), why)
            return _outcome(400, f"absurd call: {why}\n", "malformed")
        try:
            fresh = self._funds.settle(item)
        except FundsUnavailable as exc:
            self._warn(
                "redis",
                "cdr post uuid=%s not billed yet (503): Redis: %s",
                show(post.uuid, 64),
                show(str(exc), 120),
            )
            return _outcome(503, "not queued, retry\n", "unavailable")
        self._release(post.uuid)
        if not fresh:
            return _outcome(200, "already billed\n", "duplicate")
        # Not an anomaly by itself: the post often arrives before the engine's batched settle.
        log.debug("uuid=%s settled from FreeSWITCH's CDR: billsec=%d", show(post.uuid, 64), rated.billsec)
        notes = (*end.anomalies, *rated.notes)
        if notes:
            log.warning("uuid=%s billed with notes: %s", show(post.uuid, 64), show("; ".join(notes), 400))
        return _outcome(200, "billed\n", "billed")

    def _release(self, uuid: str) -> None:
        """Best effort: a failure leaves the slots to the reconciler, and never fails the post
        (the debit is queued; a retry would not help the limits)."""
        if self._release_limits is None:
            return
        try:
            self._release_limits(uuid)
        except Exception as exc:  # LimitsUnavailable, or anything redis-py raises
            self._warn(
                "limits",
                "cdr post uuid=%s: limit slots not released: %s",
                show(uuid, 64),
                show(str(exc), 120),
            )

    def _ignored(self, post: CdrPost) -> Outcome:
        kind = _ignored_kind(post)
        billsec = post.variables.get("billsec", "0")
        if kind != "ignored_b_leg" and billsec not in ("", "0"):
            # An answered call callgate never priced: a dialplan that bridges around callgate,
            # or a decision without accounting. Nothing here can bill it: say so.
            self._warn(
                kind,
                "cdr post uuid=%s: answered (billsec %s) without a %s ticket (%s): not billed",
                show(post.uuid, 64),
                show(billsec, 20),
                TICKET_VARIABLE,
                kind.removeprefix("ignored_").replace("_", " "),
            )
        return _outcome(200, "ignored\n", kind)

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        """At most one line per kind per minute (a broken switch posts for every call)."""
        now = self._clock()
        if now - self._logged.get(kind, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged[kind] = now
            log.warning(message, *args)
