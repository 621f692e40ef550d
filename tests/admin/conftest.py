"""Fixtures of the customer-management tests: a catalogue in a private database, an admin
token, the Flask test client of the API, the CLI run in-process, and the service itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine.admin import cli as admin_cli
from engine.admin.api import create_app, shutdown
from engine.admin.service import Actor, AdminService
from engine.admin.settings import AdminSettings
from engine.config import load_config
from engine.db.fixtures import load_document
from engine.db.migrate import migrate
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]

# Rate groups, a provider with a trunk, resellers (one with a sub-reseller) and free DIDs.
BASE_CATALOGUE: dict[str, Any] = {
    "localizations": [{"name": "uk", "number_originate": "00/, 0/44"}, {"name": "intl"}],
    "gateways": [{"name": "gw-main"}],
    "providers": [
        {
            "number": "9100000001",
            "company": "Carrier One",
            "trunks": [
                {
                    "name": "carrier-one",
                    "gateway": "gw-main",
                    "termination_rates": [{"prefix": "44", "cost_per_minute": "0.0050"}],
                }
            ],
        }
    ],
    "rate_groups": [
        {
            "name": "retail",
            "trunks": ["carrier-one"],
            "rates": [{"prefix": "44", "cost_per_minute": "0.0100"}],
        },
        {
            "name": "noncli",
            "trunks": ["carrier-one"],
            "rates": [{"prefix": "44", "cost_per_minute": "0.0200"}],
        },
        {"name": "closed", "active": False},
        {
            "name": "acme-retail",
            "reseller": "2100000001",
            "trunks": ["carrier-one"],
            "rates": [{"prefix": "44", "cost_per_minute": "0.0150"}],
        },
        {"name": "sub-retail", "reseller": "2100000002"},
    ],
    "resellers": [
        {
            "number": "2100000001",
            "company": "ACME Reseller",
            "email": "ops@acme.example",
            "balance": "100.00",
            "rate_group": "retail",
            "resellers": [
                {
                    "number": "2100000002",
                    "company": "ACME Sub",
                    "email": "sub@acme.example",
                    "rate_group": "acme-retail",
                }
            ],
        },
        {"number": "2200000001", "company": "Other Reseller", "email": "ops@other.example"},
    ],
    "dids": [{"number": f"4420711100{i:02d}"} for i in range(1, 21)],
}


def prepare(url: str, document: dict[str, Any] | None = None) -> None:
    migrate(url)
    with psycopg.connect(url) as conn:
        load_document(conn, document or BASE_CATALOGUE)


@pytest.fixture(scope="module")
def db_url(module_pg_url: str) -> str:
    """A migrated database of this module holding BASE_CATALOGUE."""
    prepare(module_pg_url)
    return module_pg_url


@pytest.fixture(scope="module")
def env(db_url: str, redis_url: str, module_key_prefix: str) -> dict[str, str]:
    """The environment a `callgate` command of these tests sees: this module's database, and a
    Redis prefix of its own, so that a command reaching Redis never meets a deployment's keys."""
    return {
        "CALLGATE_CONFIG": str(ROOT / "config" / "callgate.toml"),
        "CALLGATE_DATABASE_URL": db_url,
        "CALLGATE_REDIS_URL": redis_url,
        "CALLGATE_REDIS__KEY_PREFIX": module_key_prefix,
    }


@pytest.fixture(scope="module")
def config(env: dict[str, str]) -> Any:
    return load_config(environ=env)


@pytest.fixture(scope="module")
def service_for(db_url: str) -> Iterator[Callable[..., AdminService]]:
    """service_for(actor=None, **settings) -> an AdminService on its own connection."""
    conns: list[psycopg.Connection[Any]] = []

    def make(actor: Actor | None = None, **settings: Any) -> AdminService:
        conn = psycopg.connect(db_url, autocommit=True)
        conns.append(conn)
        return AdminService(conn, AdminSettings(**settings), actor or Actor(name="test:admin"))

    yield make
    for conn in conns:
        conn.close()


@pytest.fixture(scope="module")
def service(service_for: Callable[..., AdminService]) -> AdminService:
    return service_for()


def query(url: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


@dataclass
class Api:
    """The API's Flask test client with a bearer token."""

    client: Any
    token: str | None

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}) or {})
        if self.token is not None:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        response = self.client.open(f"/api/v1{path}", method=method, headers=headers, **kwargs)
        response.body = json.loads(response.data) if response.mimetype == "application/json" else None
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.call("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.call("PATCH", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.call("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.call("DELETE", path, **kwargs)

    def as_token(self, token: str | None) -> Api:
        return Api(self.client, token)


@pytest.fixture(scope="module")
def app(config: Any) -> Iterator[Any]:
    application = create_app(config)
    yield application
    shutdown(application)


@pytest.fixture(scope="module")
def admin_token(service: AdminService) -> str:
    return service.create_token("tests-admin")[1]


@pytest.fixture(scope="module")
def api(app: Any, admin_token: str) -> Api:
    return Api(app.test_client(), admin_token)


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cli(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """cli("admin", "customer", "list", ...) -> CliResult: `callgate` run in-process."""

    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        rc = admin_cli.main(list(argv), environ=env)
        captured = capsys.readouterr()
        return CliResult(rc, captured.out, captured.err)

    return run


def customer_body(**overrides: Any) -> dict[str, Any]:
    """A valid create-customer request (unique e-mail from the number, if one is given)."""
    body: dict[str, Any] = {"first_name": "Test", "rate_group": "retail"}
    body.update(overrides)
    if "email" not in body:
        body["email"] = f"c{overrides.get('number', id(body))}@example.com"
    return body


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_api(env: dict[str, str], log: Path, **environment: str) -> Iterator[int]:
    """`callgate api` (gevent) on a free port, with `environment` added to `env`; yields the port.
    Its output goes to `log`; it is stopped with SIGINT (killed after 10 s) on the way out."""
    port = _free_port()
    code = "import sys; from engine.admin.cli import main; sys.exit(main(sys.argv[1:]))"
    variables = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")} | env | environment
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", code, "api", "--port", str(port)],
            cwd=ROOT,
            env=variables,
            stdout=out,
            stderr=out,
        )

    def listening() -> bool:
        assert process.poll() is None, log.read_text()
        return "listening on" in log.read_text()

    try:
        wait_until(listening, timeout=20, interval=0.05, what="callgate api listening")
        yield port
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def api_server(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`callgate api` (gevent) on a free port: (its base URL, its log file)."""
    log = tmp_path / "api.log"
    with serve_api(env, log) as port:
        yield f"http://127.0.0.1:{port}/api/v1", log
