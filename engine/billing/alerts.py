"""Low-balance e-mails: send what the database queued, record the outcome in the account's e-mail log.

The decision to alert is taken in PostgreSQL (migration 0005, trigger ``accounts_low_balance``),
in the very transaction that moves the balance, whoever moves it (a CDR batch, an admin's
charge): the first time the available balance is strictly below the account's threshold, a row
in ``low_balance_alerts`` and a ``pending`` row in ``account_emails`` are written; no new alert
until the balance has been back at or above the threshold (the row is then deleted).

:class:`Mailer` sends the pending rows through the configured SMTP server, each in its own short
transaction (``FOR UPDATE SKIP LOCKED``, so several workers never send one e-mail twice), and
marks it ``sent`` (or ``failed`` after ``max_attempts``). A crash between the SMTP server's
acceptance and the commit sends that one e-mail again on the next run: delivery is at least
once, the window being one SMTP transaction.
"""

from __future__ import annotations

import logging
import os
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any

import psycopg

from engine.billing.metrics import BillingMetrics

if TYPE_CHECKING:
    from engine.config import SmtpConfig

log = logging.getLogger("callgate.billing.alerts")


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    host: str
    port: int = 25
    sender: str = "callgate@localhost"
    username: str = ""
    password: str = field(default="", repr=False)  # never logged nor shown
    starttls: bool = False
    timeout: float = 10.0

    @classmethod
    def from_config(cls, config: SmtpConfig) -> SmtpSettings | None:
        """The ``[smtp]`` section (engine.config, environment overrides applied); None = no e-mail."""
        if not config.host:
            return None
        return cls(
            host=config.host,
            port=config.port,
            sender=config.sender,
            username=config.username,
            password=config.password,
            starttls=config.starttls,
            timeout=config.timeout,
        )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SmtpSettings | None:
        """``CALLGATE_SMTP_HOST`` (unset = no e-mail), ``_PORT``, ``_FROM``, ``_USER``, ``_PASSWORD``,
        ``_STARTTLS`` (1/0)."""
        env = os.environ if environ is None else environ
        host = env.get("CALLGATE_SMTP_HOST", "")
        if not host:
            return None
        return cls(
            host=host,
            port=int(env.get("CALLGATE_SMTP_PORT", "25")),
            sender=env.get("CALLGATE_SMTP_FROM", "callgate@localhost"),
            username=env.get("CALLGATE_SMTP_USER", ""),
            password=env.get("CALLGATE_SMTP_PASSWORD", ""),
            starttls=env.get("CALLGATE_SMTP_STARTTLS", "0") == "1",
        )


_NEXT = """
SELECT e.id, e.recipient, e.subject, e.body, e.attempts
  FROM account_emails e
 WHERE e.status = 'pending'
 ORDER BY e.id
 LIMIT 1
   FOR UPDATE SKIP LOCKED
"""


class Mailer:
    def __init__(
        self, settings: SmtpSettings, *, metrics: BillingMetrics | None = None, max_attempts: int = 5
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.max_attempts = max_attempts

    def send_pending(self, conn: psycopg.Connection[Any], limit: int = 100) -> int:
        """Send up to ``limit`` pending e-mails; the number sent. Never raises for an SMTP failure."""
        sent = 0
        for _ in range(limit):
            with conn.transaction():
                row = conn.execute(_NEXT).fetchone()
                if row is None:
                    break
                email_id, recipient, subject, body, attempts = row
                error = self._send(recipient, subject, body)
                if error is None:
                    conn.execute(
                        "UPDATE account_emails SET status = 'sent', sent_at = now(), attempts = attempts + 1,"
                        " error = '' WHERE id = %s",
                        [email_id],
                    )
                    sent += 1
                    self._count("sent")
                    continue
                final = attempts + 1 >= self.max_attempts
                conn.execute(
                    "UPDATE account_emails SET attempts = attempts + 1, error = %s, status = %s"
                    " WHERE id = %s",
                    [error[:500], "failed" if final else "pending", email_id],
                )
                self._count("failed" if final else "retry")
                log.warning("low-balance e-mail %s not sent (attempt %d): %s", email_id, attempts + 1, error)
                break  # the server is refusing: try again on the next round, not in a tight loop
        return sent

    def _send(self, recipient: str, subject: str, body: str) -> str | None:
        s = self.settings
        message = EmailMessage()
        message["From"] = s.sender
        message["To"] = recipient
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain="callgate")
        message.set_content(body)
        try:
            with smtplib.SMTP(s.host, s.port, timeout=s.timeout) as smtp:
                if s.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if s.username:
                    smtp.login(s.username, s.password)
                smtp.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.emails.labels(status).inc()
