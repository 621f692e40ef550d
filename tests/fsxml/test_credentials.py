"""The carrier passwords callgate fsxml reads from PostgreSQL (engine.fsxml.credentials).

The policy (when to read, what is kept on failure, what is logged) runs over a reader
function; the reader itself runs against this run's real PostgreSQL, and against a port
where nothing listens for "PostgreSQL is down".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import psycopg
import pytest

from engine.db.migrate import migrate
from engine.fsxml.credentials import GatewayPasswords, postgres_reader
from tests.support import free_port, wait_until


class Reads:
    """A reader returning the next prepared answer (an exception is raised), counting the calls."""

    def __init__(self, *answers: Mapping[int, str] | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> Mapping[int, str]:
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


def passwords(reader: Reads, **kwargs: float) -> GatewayPasswords:
    return GatewayPasswords(reader, offload=lambda fn: fn(), **kwargs)


def test_nothing_is_served_before_the_first_read_and_a_failure_keeps_what_is_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    down = psycopg.OperationalError("connection to server at 127.0.0.1 failed: password=hunter2?")
    held = passwords(Reads(down, {7: "Carrier-Pw1"}, down, down, {7: "Carrier-Pw2"}))
    assert not held.refresh() and not held.loaded and held.password_of(7) == ""
    assert held.refresh() and held.loaded and held.password_of(7) == "Carrier-Pw1"
    assert not held.refresh() and not held.refresh()
    assert held.loaded and held.password_of(7) == "Carrier-Pw1" and held.failures == 2  # kept
    assert held.refresh() and held.password_of(7) == "Carrier-Pw2" and held.failures == 0
    assert held.password_of(8) == ""
    # one warning per failure streak, a line on recovery; no password, no driver message
    assert caplog.text.count("gateway credentials not read") == 2
    assert "read again after 2 failures" in caplog.text
    assert "Carrier-Pw" not in caplog.text and "hunter2" not in caplog.text


def test_only_gateway_changes_and_new_snapshots_ask_for_a_read() -> None:
    held = passwords(Reads({}))
    held.on_change(3, None, {"sip_devices": {"1"}, "origination_rates": {"9"}})
    assert not held._wanted.is_set()
    held.on_change(3, None, {"gateways": {"21"}})
    assert held._wanted.is_set()
    held._wanted.clear()
    held.on_swap(4, None)
    assert held._wanted.is_set()


def test_the_loop_reads_at_start_on_request_and_retries_while_failing() -> None:
    reader = Reads({1: "a"}, {1: "b"}, RuntimeError("down"), {1: "c"})
    held = passwords(reader, refresh_every=3600, retry_every=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=held.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: held.password_of(1) == "a", what="the read at start")
        assert reader.calls == 1  # then nothing until asked (refresh_every is an hour)
        held.request_refresh()
        wait_until(lambda: held.password_of(1) == "b", what="the read on request")
        held.request_refresh()  # this one fails: retried after retry_every, not after an hour
        wait_until(lambda: held.password_of(1) == "c", what="the retry")
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_the_postgres_reader_reads_passwords_and_fails_cleanly_when_postgresql_is_down(
    fresh_pg_url: str,
) -> None:
    migrate(fresh_pg_url)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO gateways (name, username, password) VALUES ('gw-a', 'u', 'Pw-A'), ('gw-b', '', '')"
        )
        ids: dict[str, int] = dict(conn.execute("SELECT name, id FROM gateways").fetchall())
    assert postgres_reader(fresh_pg_url, 5)() == {ids["gw-a"]: "Pw-A"}
    held = GatewayPasswords(postgres_reader(fresh_pg_url, 5), offload=lambda fn: fn())
    assert held.refresh() and held.password_of(ids["gw-a"]) == "Pw-A"
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    held._read = postgres_reader(nowhere, 1)  # PostgreSQL down
    assert not held.refresh()
    assert held.loaded and held.password_of(ids["gw-a"]) == "Pw-A"
