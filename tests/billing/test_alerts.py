"""Low-balance e-mails through a real SMTP server on loopback (aiosmtpd): exactly once per crossing."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from decimal import Decimal
from email import message_from_bytes
from typing import Any

import psycopg
import pytest
import redis

from engine.billing.alerts import Mailer, SmtpSettings
from engine.billing.funds import Funds
from engine.billing.metrics import BillingMetrics
from engine.billing.statement import NotFound, Scope, email_log
from engine.sync.cdrs import CdrWriter
from tests.billing.conftest import make_account, settle_all, settlement

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")

D = Decimal


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, SmtpSettings]]:
    inbox = Inbox()
    with socket.socket() as probe:  # an OS-assigned free port (the controller cannot take port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = aiosmtpd_controller.Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, SmtpSettings(host="127.0.0.1", port=port, sender="billing@callgate.test")
    finally:
        controller.stop()


def refill(db: psycopg.Connection, account_id: int, amount: str) -> None:
    """A refill as the admin service writes it: the ledger row and the balance, in one transaction."""
    with db.transaction():
        row = db.execute(
            "UPDATE accounts SET balance = balance + %s WHERE id = %s RETURNING balance",
            [D(amount), account_id],
        ).fetchone()
        assert row is not None, account_id
        (balance,) = row
        db.execute(
            "INSERT INTO balance_changes (account_id, kind, amount, balance_after, currency, actor)"
            " VALUES (%s, 'refill', %s, %s, 'USD', 'test')",
            [account_id, D(amount), balance],
        )


def test_one_email_per_crossing_through_the_cdr_writer(
    db: psycopg.Connection,
    db_url: str,
    client: redis.Redis,
    key_prefix: str,
    smtp: tuple[Inbox, SmtpSettings],
) -> None:
    inbox, settings = smtp
    account = make_account(
        db, "901", "10", notify_enabled=True, notify_balance_below=D("5"), notify_email="owner@example.test"
    )
    metrics = BillingMetrics()
    mailer = Mailer(settings, metrics=metrics)
    writer = CdrWriter(
        client,
        key_prefix,
        lambda: psycopg.connect(db_url),
        "w",
        batch=3,
        metrics=metrics,
        after_commit=mailer.send_pending,
    )
    funds = Funds(client, key_prefix)

    def calls(start: int, n: int, amount: str) -> None:
        settle_all(funds, [settlement(f"c{start + i}", [(account, amount)]) for i in range(n)])
        while writer.process_once(0).entries:
            pass

    calls(0, 4, "1")  # 10 -> 6: above the threshold, no e-mail
    assert inbox.messages == []
    calls(10, 6, "1")  # 6 -> 0 over two batches: crosses once, one e-mail
    assert len(inbox.messages) == 1
    recipients, message = inbox.messages[0]
    assert recipients == ["owner@example.test"]
    assert "901" in message["Subject"]
    assert "below your alert threshold" in message.get_payload()
    refill(db, account, "3")  # 0 -> 3: still below, still no repeat
    calls(20, 1, "1")
    assert len(inbox.messages) == 1
    refill(db, account, "10")  # 2 -> 12: back above: re-armed
    calls(30, 8, "1")  # 12 -> 4: the second crossing
    assert len(inbox.messages) == 2
    log = db.execute(
        "SELECT kind, recipient, status FROM account_emails WHERE account_id = %s", [account]
    ).fetchall()
    assert log == [("low_balance", "owner@example.test", "sent")] * 2
    assert metrics.emails.labels("sent")._value.get() == 2
    entries = email_log(db, Scope(), "901")
    assert [(e.kind, e.status, e.recipient) for e in entries] == [
        ("low_balance", "sent", "owner@example.test")
    ] * 2
    with pytest.raises(NotFound):
        email_log(db, Scope(reseller_id=account), "901")  # not in that (non-)reseller's subtree


def test_an_unreachable_smtp_server_keeps_the_email_pending_then_sends_it(
    db: psycopg.Connection, smtp: tuple[Inbox, SmtpSettings]
) -> None:
    inbox, settings = smtp
    account = make_account(
        db, "901", "10", notify_enabled=True, notify_balance_below=D("5"), email="a@example.test"
    )
    db.execute("UPDATE accounts SET balance = 1 WHERE id = %s", [account])
    dead = Mailer(SmtpSettings(host="127.0.0.1", port=1, timeout=2))
    assert dead.send_pending(db) == 0
    assert db.execute("SELECT status, attempts FROM account_emails").fetchone() == ("pending", 1)
    assert Mailer(settings).send_pending(db) == 1
    assert db.execute("SELECT status FROM account_emails").fetchone() == ("sent",)
    assert [r for r, _ in inbox.messages] == [["a@example.test"]]


def test_an_account_without_address_logs_a_failed_email(db: psycopg.Connection) -> None:
    account = make_account(db, "901", "10", notify_enabled=True, notify_balance_below=D("5"))
    db.execute("UPDATE accounts SET balance = 1 WHERE id = %s", [account])
    assert db.execute("SELECT status, error FROM account_emails").fetchone() == (
        "failed",
        "the account has no e-mail address",
    )
