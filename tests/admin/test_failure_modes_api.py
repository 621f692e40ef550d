"""The failure modes and limits of docs/admin-api.md that no other test proved.

Each test takes a row of the page (a condition, and what the API answers) and shows it on the
application with the real test database: the Flask test client for most, a real `callgate api`
(gevent) where only a socket can show it (a body announced but never sent, or sent slowly), and
a database of the test's own where the database itself is made unreachable.

Proven elsewhere: an exhausted pool, a malformed token while it is, tokens created later or
revoked, the refresh rate (test_api_pool.py); every route's 401s, expired tokens, an inactive
reseller (test_api_auth_openapi.py); read-only tokens (test_api_read_only.py); the body limit,
nesting, the field count, text lengths, page, per_page, valid_days, NUL bytes (loosely: here
exactly), form fields, 20 listed errors, 405 (test_api_hardening.py); the logs (tests/test_logs.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from flask_openapi3.openapi import OpenAPI

from engine.admin import schemas as s
from engine.admin.api import create_app, shutdown
from engine.admin.service import Actor, AdminService
from engine.admin.settings import AdminSettings
from engine.config import load_config
from tests.admin.conftest import ROOT, Api, customer_body, prepare, serve_api
from tests.conftest import PG_ADMIN_URL
from tests.support import wait_until

TRUNCATED = "…[truncated]"

# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def make_app(config: Any) -> Iterator[Callable[..., OpenAPI]]:
    """make_app(**admin settings) -> the application on the module's database, with a pool of
    its own (closed after the test)."""
    made: list[OpenAPI] = []

    def make(**settings: Any) -> OpenAPI:
        app = create_app(config, AdminSettings(**settings))
        made.append(app)
        return app

    yield make
    for app in made:
        shutdown(app)


def backend_pids(url: str) -> set[int]:
    """The server backends of `url`'s database now (this query's own excepted)."""
    database = url.rpartition("/")[2]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [database]
        ).fetchall()
    return {int(pid) for (pid,) in rows}


def terminate(pids: set[int]) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, (response.status_code, response.body)
    assert response.body["error"] == "unavailable"
    assert response.headers["Retry-After"] == "1"


def pool_waiting(app: OpenAPI) -> int:
    stats: dict[str, int] = app.extensions["callgate.db"].pool.get_stats()
    return stats.get("requests_waiting", 0)


def status_line(sock: socket.socket) -> str:
    """The first line of the answer on `sock` (its timeout applies)."""
    received = b""
    while b"\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received.split(b"\r\n", 1)[0].decode(errors="replace")


def get(port: int, path: str, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --- the pool --------------------------------------------------------------------------------------


def test_more_requests_waiting_than_db_pool_max_waiting_get_503_at_once(
    make_app: Callable[..., OpenAPI], admin_token: str
) -> None:
    app = make_app(db_pool_size=1, db_pool_timeout=10.0, db_pool_max_waiting=1)
    api = Api(app.test_client(), admin_token)
    assert api.get("/customers?per_page=1").status_code == 200  # the token is known now
    db = app.extensions["callgate.db"]
    held = db.getconn()  # the only connection
    waited: list[Any] = []
    waiter = threading.Thread(
        target=lambda: waited.append(Api(app.test_client(), admin_token).get("/customers?per_page=1"))
    )
    try:
        waiter.start()
        wait_until(lambda: pool_waiting(app) == 1, what="one request waiting for the connection")
        started = time.monotonic()
        response = api.get("/customers?per_page=1")
        elapsed = time.monotonic() - started
        assert_unavailable(response)
        assert elapsed < 5, elapsed  # at once, not after the pool timeout (10 s)
    finally:
        db.putconn(held)
        waiter.join(20)
    assert [r.status_code for r in waited] == [200]  # the request that waited got the connection


def test_a_refresh_of_the_token_pre_check_without_a_connection_answers_503(
    make_app: Callable[..., OpenAPI], admin_token: str, service: AdminService
) -> None:
    """A well-formed token the process has not seen needs the database to tell whether it
    exists: without a connection the answer is 503, not 401."""
    app = make_app(db_pool_size=1, db_pool_timeout=0.5)
    api = Api(app.test_client(), admin_token)
    assert api.get("/customers?per_page=1").status_code == 200
    _, created_since = service.create_token("created-while-busy")
    forged = "cgt_" + secrets.token_urlsafe(32)
    db = app.extensions["callgate.db"]
    held = db.getconn()
    try:
        assert_unavailable(api.as_token(created_since).get("/customers?per_page=1"))
        assert_unavailable(api.as_token(forged).get("/customers?per_page=1"))
    finally:
        db.putconn(held)
    assert api.as_token(created_since).get("/customers?per_page=1").status_code == 200
    assert api.as_token(forged).get("/customers?per_page=1").status_code == 401


def test_a_pooled_connection_broken_by_a_database_restart_is_replaced_not_a_failed_request(
    make_app: Callable[..., OpenAPI], admin_token: str, db_url: str
) -> None:
    app = make_app(db_pool_size=1, db_pool_timeout=5.0)
    api = Api(app.test_client(), admin_token)
    assert api.get("/customers?per_page=1").status_code == 200
    db = app.extensions["callgate.db"]
    conn = db.getconn()
    pid = conn.info.backend_pid
    db.putconn(conn)
    terminate({pid})  # as a restart of PostgreSQL does to every connection
    wait_until(lambda: pid not in backend_pids(db_url), what="the backend gone")
    assert api.get("/customers?per_page=1").status_code == 200


def test_a_database_error_on_an_open_connection_answers_503_and_is_logged_with_its_traceback(
    make_app: Callable[..., OpenAPI], admin_token: str, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The route's connection is killed while its query waits (on a lock held here)."""
    app = make_app(db_pool_size=2, db_pool_timeout=2.0)
    api = Api(app.test_client(), admin_token)
    assert api.get("/audit?per_page=1").status_code == 200
    database = db_url.rpartition("/")[2]
    caplog.set_level(logging.WARNING, logger="callgate.admin.api")
    answers: list[Any] = []
    with psycopg.connect(db_url) as locker, psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        locker.execute("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE")
        request = threading.Thread(target=lambda: answers.append(api.get("/audit?per_page=1")))
        request.start()

        def blocked() -> int | None:
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
                " AND query ILIKE '%%audit_log%%'",
                [database],
            ).fetchone()
            return None if row is None else int(row[0])

        pid = wait_until(blocked, what="the route's query waiting for the lock")
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        request.join(20)
        locker.rollback()
    assert len(answers) == 1
    assert_unavailable(answers[0])
    assert answers[0].body["message"] == "the database is unavailable"
    logged = [
        r for r in caplog.records if r.name == "callgate.admin.api" and r.getMessage() == "database error"
    ]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR
    raised = logged[0].exc_info[0] if logged[0].exc_info else None
    assert raised is not None and issubclass(raised, psycopg.OperationalError)  # with its traceback
    assert api.get("/audit?per_page=1").status_code == 200  # the broken connection is not handed out again


def test_a_streamed_export_holds_its_connection_until_it_ends_or_the_client_goes_away(
    make_app: Callable[..., OpenAPI], admin_token: str
) -> None:
    """A pool of one connection: while an export streams, another request gets 503; the
    connection comes back when the stream ends, and when the server closes the response
    because the client went away (WSGI's close(), called here as a server calls it)."""
    app = make_app(db_pool_size=1, db_pool_timeout=0.5)
    api = Api(app.test_client(), admin_token)
    assert api.get("/customers?per_page=1").status_code == 200
    headers = {"Authorization": f"Bearer {admin_token}"}
    for client_leaves in (False, True):
        export = app.test_client().get("/api/v1/customers/export", headers=headers, buffered=False)
        assert export.status_code == 200
        stream = cast(Iterator[bytes], iter(export.response))  # the body, chunk by chunk
        assert next(stream).startswith(b"Entity Type,")  # the first lines: the stream has begun
        assert_unavailable(api.get("/customers?per_page=1"))  # the stream holds the only connection
        if not client_leaves:
            list(stream)  # read to its end
            assert api.get("/customers?per_page=1").status_code == 200  # given back at the end
        export.close()
        assert api.get("/customers?per_page=1").status_code == 200, client_leaves


@pytest.fixture
def own_database(fresh_pg_url: str, redis_url: str, key_prefix: str) -> tuple[Any, str]:
    """(config, an admin token) of a database of this test's own, which it may make unreachable."""
    prepare(fresh_pg_url)
    environ = {
        "CALLGATE_CONFIG": str(ROOT / "config" / "callgate.toml"),
        "CALLGATE_DATABASE_URL": fresh_pg_url,
        "CALLGATE_REDIS_URL": redis_url,
        "CALLGATE_REDIS__KEY_PREFIX": key_prefix,
    }
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        token = AdminService(conn, AdminSettings(), Actor(name="test:admin")).create_token("own")[1]
    return load_config(environ=environ), token


def test_an_unreachable_database_answers_503_after_the_pool_timeout_and_the_pool_reconnects(
    own_database: tuple[Any, str], fresh_pg_url: str
) -> None:
    config, token = own_database
    app = create_app(config, AdminSettings(db_pool_size=2, db_pool_timeout=0.5))
    api = Api(app.test_client(), token)
    name = fresh_pg_url.rpartition("/")[2]
    try:
        assert api.get("/customers?per_page=1").status_code == 200
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            try:
                terminate(backend_pids(fresh_pg_url))
                started = time.monotonic()
                response = api.get("/customers?per_page=1")
                elapsed = time.monotonic() - started
                assert_unavailable(response)
                assert elapsed >= 0.45, elapsed  # it waited db_pool_timeout for a connection
            finally:
                admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        # no restart: the pool's background reconnection makes the same application answer again
        wait_until(
            lambda: api.get("/customers?per_page=1").status_code == 200, timeout=20, what="answering again"
        )
    finally:
        shutdown(app)


# --- authentication -------------------------------------------------------------------------------


def test_a_reseller_token_stops_working_when_its_reseller_is_deleted(
    api: Api, service: AdminService, db_url: str
) -> None:
    service.create_account(
        s.CustomerCreate(
            first_name="R", email="gone-res@example.com", rate_group="retail", number="2300000011"
        )
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE accounts SET kind = 'reseller' WHERE number = '2300000011'")
        token = service.create_token("reseller-deleted", reseller="2300000011")[1]
        assert api.as_token(token).get("/customers").status_code == 200
        conn.execute("UPDATE accounts SET deleted = true, deleted_at = now() WHERE number = '2300000011'")
    response = api.as_token(token).get("/customers")
    assert response.status_code == 401 and response.body["error"] == "unauthorized"


def test_last_used_at_is_written_at_most_once_a_minute(api: Api, service: AdminService, db_url: str) -> None:
    row, token = service.create_token("usage")

    def last_used() -> Any:
        with psycopg.connect(db_url) as conn:
            found = conn.execute("SELECT last_used_at FROM api_tokens WHERE id = %s", [row["id"]]).fetchone()
        assert found is not None
        return found[0]

    assert last_used() is None
    assert api.as_token(token).get("/customers?per_page=1").status_code == 200
    first = last_used()
    assert first is not None
    assert api.as_token(token).get("/customers?per_page=1").status_code == 200
    assert last_used() == first  # not written again within the minute
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE api_tokens SET last_used_at = now() - interval '61 seconds' WHERE id = %s", [row["id"]]
        )
    stale = last_used()
    assert api.as_token(token).get("/customers?per_page=1").status_code == 200
    assert last_used() > stale


# --- limits ----------------------------------------------------------------------------------------


def test_an_import_body_over_max_import_bytes_is_refused_413(
    make_app: Callable[..., OpenAPI], admin_token: str
) -> None:
    app = make_app(max_body_bytes=1024, max_import_bytes=4096)
    api = Api(app.test_client(), admin_token)

    def import_of(rows: int) -> Any:
        csv = b"Account,First Name,Rate Group\n" + b"".join(b"57%08d,N,retail\n" % i for i in range(rows))
        return api.post(
            "/customers/import",
            data={"file": (io.BytesIO(csv), "deck.csv"), "options": '{"dry_run": true}'},
        ), len(csv)

    response, size = import_of(300)
    assert size > 4096
    assert response.status_code == 413, response.status_code
    assert response.body["error"] == "request_entity_too_large" and "4096" in response.body["message"]
    response, size = import_of(100)
    assert 1024 < size < 4096 - 500  # over the other routes' limit, under the import's (with the form)
    assert response.status_code == 200, response.body
    body = json.dumps(customer_body(number="5700000001", company="x" * 1100))
    response = api.post("/customers", data=body, content_type="application/json")
    assert response.status_code == 413 and "1024" in response.body["message"]


def test_a_query_parameter_given_twice_is_refused_422(api: Api) -> None:
    for path in ("/customers?per_page=1&per_page=2", "/audit?action=a&action=b", "/refills?page=1&page=1"):
        response = api.get(path)
        assert response.status_code == 422, (path, response.status_code)
        name = path.split("?")[1].split("=")[0]
        assert response.body["errors"] == [{"field": name, "message": "given more than once"}], path


def test_nul_and_surrogates_answer_400_in_a_body_or_form_and_422_naming_the_parameter_in_a_query(
    api: Api,
) -> None:
    number = "5700000002"
    assert api.post("/customers", json=customer_body(number=number)).status_code == 201
    for raw in ('{"company": "a\\u0000b"}', '{"company": "a\\ud800b"}', '{"a\\u0000": 1}', '{"a\\udfff": 1}'):
        response = api.patch(f"/customers/{number}", data=raw, content_type="application/json")
        assert response.status_code == 400, (raw, response.status_code)
        assert response.body["error"] == "bad_request"
    form = {"file": (io.BytesIO(b"Account\n1\n"), "a.csv"), "options": '{"mapping": {"a\\u0000": "number"}}'}
    response = api.post("/customers/import", data=form)
    assert response.status_code == 400 and response.body["message"].startswith("form field")
    for path, parameter in (("/customers", "first_name"), ("/audit", "action"), ("/refills", "reference")):
        response = api.get(path, query_string={parameter: "a\x00b"})
        assert response.status_code == 422, (path, response.status_code)
        assert parameter in response.body["message"] and "NUL" in response.body["message"]


def test_error_bodies_are_bounded_and_escaped(api: Api) -> None:
    number = "5700000003"
    assert api.post("/customers", json=customer_body(number=number)).status_code == 201
    unknown = {f"{n:02d}" + "k" * 500: 1 for n in range(25)}  # 25 errors, each naming 502 characters
    response = api.patch(f"/customers/{number}", json=unknown)
    assert response.status_code == 422
    errors = response.body["errors"]
    assert len(errors) == 21 and errors[-1] == {"field": "", "message": "5 more errors not shown"}
    for error in errors[:-1]:
        assert error["field"].endswith(TRUNCATED) and len(error["field"]) == 100 + len(TRUNCATED)
        assert len(error["message"]) <= 300 + len(TRUNCATED)
    message = response.body["message"]
    assert message.endswith(TRUNCATED) and len(message) == 300 + len(TRUNCATED)
    response = api.patch(f"/customers/{number}", json={"a\x1bb\x7fc\n": 1})
    assert response.status_code == 422
    assert response.body["errors"] == [{"field": "a\\x1bb\\x7fc\\n", "message": "unknown field"}]
    text = response.data.decode("utf-8")
    assert not any(ch in text for ch in "\x1b\x7f") and "\\n" in text


def test_an_unexpected_exception_answers_500_internal_error_and_is_logged_with_its_traceback(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: AdminService, query: Any) -> Any:
        raise RuntimeError("a bug in the service")

    monkeypatch.setattr(AdminService, "list_customers", broken)
    caplog.set_level(logging.WARNING, logger="callgate.admin.api")
    response = api.get("/customers")
    assert response.status_code == 500
    assert response.body["error"] == "internal_error"
    assert b"a bug in the service" not in response.data  # the details stay in the log
    logged = [r for r in caplog.records if r.getMessage() == "unexpected error"]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None and logged[0].exc_info[0] is RuntimeError


# --- a real server: what only a socket shows ----------------------------------------------------------


def test_an_announced_body_over_the_limit_is_refused_before_it_is_read(
    env: dict[str, str], admin_token: str, tmp_path: Path
) -> None:
    """The client announces 2 MB and sends none of it: the answer comes at once. (A server that
    read the body first would wait for it until the client gave up.)"""
    with serve_api(env, tmp_path / "api.log") as port:
        assert get(port, "/customers?per_page=1", admin_token)[0] == 200
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                (
                    "POST /api/v1/customers HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    f"Authorization: Bearer {admin_token}\r\nContent-Length: 2000000\r\n\r\n"
                ).encode()
            )
            assert status_line(sock).startswith("HTTP/1.1 413 ")


def test_a_client_sending_its_body_slowly_holds_no_database_connection(
    env: dict[str, str], admin_token: str, service: AdminService, db_url: str, tmp_path: Path
) -> None:
    """With a pool of one connection, three authenticated clients that have sent half of their
    bodies leave the connection free: another request is answered, not given 503."""
    tokens = [service.create_token(f"slow-{n}") for n in range(3)]

    def authenticated() -> bool:
        with psycopg.connect(db_url) as conn:
            rows = conn.execute(
                "SELECT count(*) FROM api_tokens WHERE id = ANY(%s) AND last_used_at IS NOT NULL",
                [[row["id"] for row, _ in tokens]],
            ).fetchone()
        return rows == (3,)

    pool = {"CALLGATE_ADMIN__DB_POOL_SIZE": "1", "CALLGATE_ADMIN__DB_POOL_TIMEOUT": "1"}
    with serve_api(env, tmp_path / "api.log", **pool) as port, contextlib.ExitStack() as sockets:
        bodies = []
        for n, (_, token) in enumerate(tokens):
            body = json.dumps(customer_body(number=f"57000001{n:02d}")).encode()
            sock = sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=20))
            sock.sendall(
                (
                    "POST /api/v1/customers HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body[: len(body) // 2]
            )
            bodies.append((sock, body[len(body) // 2 :]))
        wait_until(authenticated, what="the three slow clients past the token check")
        status, page = get(port, "/customers?per_page=1", admin_token)
        assert status == 200, page  # the only connection is free
        for sock, rest in bodies:
            sock.sendall(rest)
            assert status_line(sock).startswith("HTTP/1.1 201 ")  # they were waiting for their bodies
