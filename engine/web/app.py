"""The web admin's Flask application: sign-in, sessions, CSRF, and the pages (engine.web.views).

Pages are rendered on the server (Jinja, autoescape on) from what the service layer returns; the
service decides everything (scope, validation, audit) and its errors are shown on the page. The
only JavaScript polls a job's progress and asks "are you sure?" before a delete (the delete also
has a confirmation page of its own, so nothing needs JavaScript).

Requests:
- no session: every page redirects to the sign-in page (no database connection is opened);
- a POST must carry the session's CSRF token in the ``csrf`` field, else a 400 page;
- a read-only user's POST (other than sign-out) is a 403 page: they change nothing;
- a service error becomes a page: not found (404, also for anything outside the user's scope),
  forbidden (403), or the form again with each message next to its field (422).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from datetime import timedelta
from typing import Any

import psycopg
from flask import Flask, Response, g, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException

from engine.admin.errors import AdminError, Forbidden, NotFound
from engine.admin.service import AdminService
from engine.admin.settings import admin_settings
from engine.config import Config, WebSettings
from engine.web import auth
from engine.web.jobs import Jobs

log = logging.getLogger("callgate.web")

# Pages anyone may open; the rest need a signed-in user.
PUBLIC_ENDPOINTS = frozenset({"web.login", "web.favicon", "static"})
# The only POSTs a read-only user may make.
READ_ONLY_POSTS = frozenset({"web.logout"})


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, with the Secure flag per [web] cookie_secure."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def get_cookie_secure(self, app: Flask) -> bool:
        if self.mode == "auto":
            return request.is_secure
        return self.mode == "always"


def new_csrf_token() -> str:
    token = secrets.token_urlsafe(32)
    session["c"] = token
    return token


def csrf_token() -> str:
    """The session's CSRF token (made on first use), for every form."""
    token = session.get("c")
    return token if isinstance(token, str) else new_csrf_token()


def _csrf_ok() -> bool:
    expected = session.get("c")
    given = request.form.get("csrf", "")
    return isinstance(expected, str) and hmac.compare_digest(expected.encode(), given.encode())


def create_app(config: Config, settings: WebSettings | None = None) -> Flask:
    """The web admin for `config` (its database, Redis, [admin] and [web] sections)."""
    web = settings or config.web
    app = Flask("engine.web", template_folder="templates", static_folder="static")
    if web.secret_key:
        app.secret_key = web.secret_key
    else:
        app.secret_key = secrets.token_urlsafe(48)
        log.warning("[web] secret_key is not set: sessions end when this process stops")
    app.session_interface = _SessionInterface(web.cookie_secure)
    app.config.update(
        SESSION_COOKIE_NAME="callgate_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(minutes=web.session_minutes),
        MAX_CONTENT_LENGTH=web.max_upload_mb << 20,
        MAX_FORM_MEMORY_SIZE=1 << 20,
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.jinja_env.autoescape = True
    app.extensions["callgate"] = {
        "config": config,
        "web": web,
        "admin": admin_settings(config),
        "jobs": Jobs(web.max_jobs),
        "throttle": auth.Throttle(web.login_max_failures, web.login_max_failures_per_source,
                                  web.login_window_seconds),
    }  # fmt: skip
    app.jinja_env.globals["csrf_token"] = csrf_token

    @app.before_request
    def _sign_in_and_csrf() -> Any:
        g.user = None
        if request.endpoint in PUBLIC_ENDPOINTS and request.method != "POST":
            return None
        if request.method == "POST" and not _csrf_ok():
            return page_error(400, "This form has expired or did not come from this site. "
                                   "Go back, reload the page and send it again.")  # fmt: skip
        if request.endpoint in PUBLIC_ENDPOINTS:
            return None
        if not _session_alive(web):
            session.clear()
            return redirect(url_for("web.login", next=request.full_path if request.method == "GET" else None))
        user = auth.load_user(web, db(), session)
        if user is None:
            session.clear()
            return redirect(url_for("web.login"))
        g.user = user
        if user.read_only and request.method == "POST" and request.endpoint not in READ_ONLY_POSTS:
            return page_error(403, "You are signed in read-only: you can look at everything you may see, "
                                   "but change nothing.")  # fmt: skip
        return None

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        return response

    @app.teardown_request
    def _close(_exc: BaseException | None) -> None:
        conn = g.pop("conn", None)
        if conn is not None:
            conn.close()

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound) -> Any:
        return page_error(404, str(exc))

    @app.errorhandler(Forbidden)
    def _forbidden(exc: Forbidden) -> Any:
        return page_error(403, str(exc))

    @app.errorhandler(AdminError)
    def _admin_error(exc: AdminError) -> Any:
        return page_error(exc.status if 400 <= exc.status < 500 else 400, str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        code = exc.code or 500
        messages = {
            404: "There is no such page.",
            405: "This page does not take that kind of request.",
            413: "The file is larger than this server accepts ([web] max_upload_mb).",
        }
        return page_error(code, messages.get(code, exc.description or "The request could not be handled."))

    @app.errorhandler(psycopg.OperationalError)
    def _db_error(exc: psycopg.OperationalError) -> Any:
        log.exception("database error")
        return page_error(503, "The database is unavailable; try again in a moment.")

    from engine.web.views import blueprint

    app.register_blueprint(blueprint)
    return app


def _session_alive(web: WebSettings) -> bool:
    started = session.get("t")
    return isinstance(started, (int, float)) and 0 <= time.time() - started <= web.session_minutes * 60


def page_error(status: int, message: str) -> Any:
    return render_template("error.html", status=status, message=message, user=g.get("user")), status


def ext() -> dict[str, Any]:
    from flask import current_app

    extensions: dict[str, Any] = current_app.extensions["callgate"]
    return extensions


def db() -> psycopg.Connection[Any]:
    """This request's database connection (opened on first use, closed at the end of the request)."""
    if "conn" not in g:
        config: Config = ext()["config"]
        g.conn = psycopg.connect(
            config.database.url, autocommit=True, connect_timeout=int(config.database.connect_timeout)
        )
    conn: psycopg.Connection[Any] = g.conn
    return conn


def service() -> AdminService:
    """The service for the signed-in user over this request's connection."""
    return AdminService(db(), ext()["admin"], g.user.actor())
