"""Authentication before any connection, one bounded pool, 503 when it is exhausted (issue 15.4).

The first test runs `callgate api` (gevent, the `api_server` fixture) and counts the server
backends of the test database in pg_stat_activity while 80 clients without a valid token
hammer it."""

from __future__ import annotations

import itertools
import secrets
import socket
import threading
import time

import psycopg
import pytest

from engine.admin.api import create_app, shutdown
from engine.admin.settings import AdminSettings
from tests.admin.conftest import Api


def _backends(conn: psycopg.Connection, database: str) -> int:
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [database]).fetchone()
    assert row is not None
    return int(row[0])


def _request(port: int, authorization: str | None, slow_body: bool) -> str:
    """One request; with `slow_body`, the headers announce a body that is never sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        head = "POST /api/v1/customers HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        if authorization:
            head += f"Authorization: {authorization}\r\n"
        head += "Content-Length: 100000\r\n\r\n" if slow_body else "Content-Length: 2\r\n\r\n{}"
        sock.sendall(head.encode())
        return sock.recv(100).decode(errors="replace").split("\r\n")[0]


@pytest.mark.slow  # 3 s of load on a real server
def test_clients_without_a_valid_token_cause_no_server_backend(api_server, db_url, admin_token):
    database = db_url.rsplit("/", 1)[1]
    port = int(api_server[0].split(":")[2].split("/")[0])
    assert _request(port, f"Bearer {admin_token}", False).startswith("HTTP/1.1 422")  # pool warmed up
    with psycopg.connect(db_url, autocommit=True) as sampler:
        baseline = _backends(sampler, database)
        peak = baseline
        stop = threading.Event()
        statuses: list[str] = []

        def client(i: int) -> None:
            forged = "Bearer cgt_" + secrets.token_urlsafe(32)  # well formed, unknown
            headers = [forged, None, "Bearer nonsense", f"Basic {admin_token}"][i % 4]
            while not stop.is_set():
                statuses.append(_request(port, headers, slow_body=i % 2 == 0))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(80)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, _backends(sampler, database))
            time.sleep(0.01)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert len(statuses) >= 80
    assert {s.split(" ", 2)[1] for s in statuses} == {"401"}, set(statuses)
    assert peak == baseline, (peak, baseline)


@pytest.fixture
def small_app(config, service):
    """The app with a pool of one connection, waited for at most 0.5 s."""
    app = create_app(config, AdminSettings(db_pool_size=1, db_pool_timeout=0.5))
    yield app
    shutdown(app)


def test_an_exhausted_pool_answers_503_with_retry_after_quickly(small_app, admin_token):
    api = Api(small_app.test_client(), admin_token)
    assert api.get("/customers?per_page=1").status_code == 200  # the token is known now
    db = small_app.extensions["callgate.db"]
    held = db.getconn()  # the only connection
    try:
        started = time.monotonic()
        response = api.get("/customers?per_page=1")
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.body
        assert response.headers["Retry-After"] == "1"
        assert response.body["error"] == "unavailable"
        assert elapsed < 5, elapsed  # the pool timeout is 0.5 s; generous for a loaded machine
        # a token that is not even well formed is refused without waiting for the database
        started = time.monotonic()
        assert api.as_token("nonsense").get("/customers").status_code == 401
        assert api.as_token(None).get("/customers").status_code == 401
        assert time.monotonic() - started < 0.4
    finally:
        db.putconn(held)
    assert api.get("/customers?per_page=1").status_code == 200  # and it recovers


def test_a_token_created_after_the_cache_was_filled_works_at_once(api, service):
    assert api.get("/customers?per_page=1").status_code == 200
    _, token = service.create_token("created-later")
    assert api.as_token(token).get("/customers?per_page=1").status_code == 200
    row, revoked = service.create_token("revoked-later")
    assert api.as_token(revoked).get("/customers?per_page=1").status_code == 200
    service.revoke_token(row["id"])
    assert api.as_token(revoked).get("/customers?per_page=1").status_code == 401


def test_forged_tokens_cost_at_most_one_small_query_per_refresh_interval(app, api, monkeypatch):
    from engine.admin.api.auth import REFRESH_INTERVAL

    gate = app.extensions["callgate.gate"]
    refreshes: list[float] = []
    real = gate._refresh

    def recorded_refresh() -> None:  # the real refresh, its start time recorded
        refreshes.append(time.monotonic())
        real()

    monkeypatch.setattr(gate, "_refresh", recorded_refresh)
    stop = time.monotonic() + 1.5
    answers: list[int] = []

    def client() -> None:
        forger = api.as_token(None)
        while time.monotonic() < stop:
            forged = "cgt_" + secrets.token_urlsafe(32)
            answers.append(
                forger.client.get(
                    "/api/v1/customers", headers={"Authorization": f"Bearer {forged}"}
                ).status_code
            )

    threads = [threading.Thread(target=client) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert set(answers) == {401} and len(answers) > len(refreshes)
    assert len(refreshes) <= elapsed / REFRESH_INTERVAL + 2, (len(refreshes), elapsed)
    gaps = [b - a for a, b in itertools.pairwise(refreshes)]
    assert all(gap >= REFRESH_INTERVAL * 0.9 for gap in gaps), min(gaps)
