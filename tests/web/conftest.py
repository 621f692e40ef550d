"""Fixtures of the web admin's tests: the admin tests' database and catalogue, staff users and
reseller passwords, the Flask test client signed in as someone, and a live server for the browser.

Staff users (engine.config.WebSettings.users): ``root`` (admin) and ``viewer`` (read-only).
Resellers sign in with their account number: 2100000001 (ACME, with a sub-reseller 2100000002)
and 2200000001 (Other), whose passwords are set here.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from engine.config import Config, WebSettings
from engine.db.hashing import hash_secret
from engine.web.app import create_app
from tests.admin.conftest import config, db_url, env, service, service_for  # noqa: F401 - fixtures

ROOT_PASSWORD = "root-password-123"
VIEWER_PASSWORD = "viewer-password-123"
LOCKED_PASSWORD = "locked-password-123"  # the user the throttling tests lock out
RESELLER_PASSWORD = "Reseller-pass-1"
ACME, ACME_SUB, OTHER = "2100000001", "2100000002", "2200000001"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def web_settings(**overrides: Any) -> WebSettings:
    base: dict[str, Any] = {
        "secret_key": "t" * 48,
        "users": {
            "root": "admin:" + hash_secret(ROOT_PASSWORD, n=2**10),
            "viewer": "readonly:" + hash_secret(VIEWER_PASSWORD, n=2**10),
            "locked": "admin:" + hash_secret(LOCKED_PASSWORD, n=2**10),
        },
        "login_window_seconds": 600,
    }
    return WebSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def web_config(config: Config, db_url: str) -> Config:  # noqa: F811 - the imported fixture
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE accounts SET password_hash = %s WHERE number = ANY(%s)",
            [hash_secret(RESELLER_PASSWORD, n=2**10), [ACME, ACME_SUB, OTHER]],
        )
    return dataclasses.replace(config, web=web_settings())


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "the page has no CSRF field"
    return found.group(1)


class Browser:
    """The Flask test client with the session's CSRF token at hand."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.csrf = ""

    def get(self, path: str, **kwargs: Any) -> Any:
        response = self.client.get(path, **kwargs)
        if response.mimetype == "text/html":
            found = _CSRF.search(response.get_data(as_text=True))
            if found:
                self.csrf = found.group(1)
        return response

    def post(self, path: str, data: dict[str, Any] | None = None, *, csrf: bool = True, **kwargs: Any) -> Any:
        body = dict(data or {})
        if csrf:
            body.setdefault("csrf", self.csrf)
        response = self.client.post(path, data=body, **kwargs)
        if response.mimetype == "text/html":
            found = _CSRF.search(response.get_data(as_text=True))
            if found:
                self.csrf = found.group(1)
        return response

    def login(self, name: str, password: str) -> Any:
        self.get("/login")
        return self.post("/login", {"username": name, "password": password})

    def text(self, response: Any) -> str:
        return str(response.get_data(as_text=True))


@pytest.fixture(scope="module")
def web_app(web_config: Config) -> Any:
    app = create_app(web_config)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def browser_for(web_app: Any) -> Callable[..., Browser]:
    """browser_for(name, password) -> a test client signed in as that user."""

    def make(name: str | None = None, password: str | None = None) -> Browser:
        browser = Browser(web_app.test_client())
        if name is not None:
            response = browser.login(name, password or "")
            assert response.status_code == 302, browser.text(response)
        return browser

    return make


@pytest.fixture
def admin(browser_for: Callable[..., Browser]) -> Browser:
    return browser_for("root", ROOT_PASSWORD)


@pytest.fixture(scope="module")
def live_server(web_config: Config) -> Iterator[str]:
    """The web admin served on an OS-assigned loopback port, for the browser."""
    from engine.web.server import make_server

    server = make_server(web_config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


@pytest.fixture(autouse=True)
def fresh_throttle(request: pytest.FixtureRequest) -> None:
    """Each Flask-client test starts with no failed sign-ins counted (the app is per module)."""
    if "web_app" in request.fixturenames:
        from engine.web.auth import Throttle

        app = request.getfixturevalue("web_app")
        web = app.extensions["callgate"]["web"]
        app.extensions["callgate"]["throttle"] = Throttle(
            web.login_max_failures, web.login_max_failures_per_source, web.login_window_seconds
        )
