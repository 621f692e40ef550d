"""The WSGI application: authentication first, bounded bodies, errors as bounded JSON."""

from __future__ import annotations

import json
import logging
from typing import Any

import psycopg
from flask import Response, g, request
from flask_openapi3.models.info import Info
from flask_openapi3.openapi import OpenAPI
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from engine.admin import schemas as s
from engine.admin.errors import AdminError, FieldError
from engine.admin.settings import AdminSettings, admin_settings

from .auth import SAFE_METHODS, TokenGate, bearer_token
from .db import Database, Unavailable
from .http import (
    PREFIX,
    JSONCodec,
    database,
    error,
    printable,
    release_connection,
    unstorable,
    validation_error,
)
from .routes import ERROR_RESPONSES, account, balance, billing, customers, subresources

log = logging.getLogger("callgate.admin.api")

UNAUTHORIZED = "a valid API token is required (Authorization: Bearer <token>)"


def create_app(config: Any, settings: AdminSettings | None = None) -> OpenAPI:
    """The WSGI application for `config` (its database and [admin] section). Its connection pool
    opens now; :func:`shutdown` closes it."""
    settings = settings or admin_settings(config)
    app = OpenAPI(
        "callgate.admin",
        info=Info(title="callgate admin API", version="1",
                  description="Customer management (ASTPP's customer module) for admins and resellers."),
        security_schemes={"bearerAuth": {"type": "http", "scheme": "bearer"}},
        responses=dict(ERROR_RESPONSES),
        validation_error_status=422,
        validation_error_model=s.ErrorOut,
        validation_error_callback=validation_error,
        doc_ui=False,
    )  # fmt: skip
    app.json = JSONCodec(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    db = Database(
        config.database.url,
        max_size=settings.db_pool_size,
        timeout=settings.db_pool_timeout,
        connect_timeout=int(getattr(config.database, "connect_timeout", 5)),
        max_waiting=settings.db_pool_max_waiting,
    )
    gate = TokenGate(db)
    app.extensions["callgate.db"] = db
    app.extensions["callgate.gate"] = gate
    app.extensions["callgate.settings"] = settings
    _hooks(app, gate, settings)
    _error_handlers(app)

    @app.get(f"{PREFIX}/openapi.json", doc_ui=False)
    def openapi_document() -> Response:
        return Response(json.dumps(_document(app, settings)), mimetype="application/json")

    for module in (customers, account, subresources, balance, billing):
        app.register_api(module.routes())
    return app


def shutdown(app: OpenAPI) -> None:
    """Close the application's connection pool."""
    database(app).close()


def _hooks(app: OpenAPI, gate: TokenGate, settings: AdminSettings) -> None:
    @app.before_request
    def _before_any_work() -> Response | None:
        """In this order: the body's size, the token (no connection for a bad one), read-only,
        then what flask-openapi3 would otherwise turn into a 500 or silently drop."""
        return _oversized(settings) or _authenticate(gate) or _unreadable_input()

    @app.teardown_request
    def _give_back(_exc: BaseException | None) -> None:
        release_connection()


def _oversized(settings: AdminSettings) -> Response | None:
    large = request.endpoint == customers.IMPORT_ENDPOINT
    limit = settings.max_import_bytes if large else settings.max_body_bytes
    request.max_content_length = limit  # a body without Content-Length is cut there too (413)
    if request.content_length is not None and request.content_length > limit:
        return error(413, "request_entity_too_large", f"the request body is larger than {limit} bytes")
    return None


def _authenticate(gate: TokenGate) -> Response | None:
    digest = gate.known(bearer_token(request.headers.get("Authorization", "")))
    identity = None if digest is None else gate.identify(digest)
    if identity is None:
        return error(401, "unauthorized", UNAUTHORIZED)
    g.actor = identity.actor
    if identity.read_only and request.method not in SAFE_METHODS:
        return error(403, "forbidden", "this token is read-only")
    return None


def _unreadable_input() -> Response | None:
    if request.mimetype == "multipart/form-data":
        problem = _form_problem()
        if problem:
            return error(400, "bad_request", problem)
    repeated = [key for key, values in request.args.lists() if len(values) > 1]
    if repeated:  # no query parameter is a list: a repeat would otherwise be silently dropped
        errors = [FieldError(key, "given more than once") for key in repeated]
        return error(422, "validation_failed", "; ".join(map(str, errors)), errors)
    return None


def _form_problem() -> str | None:
    """Why a multipart form's text fields cannot be taken. flask-openapi3 parses each one as JSON
    with the standard library, which would raise RecursionError (a 500) on deep nesting: the fields
    are parsed here first, with the API's own limits."""
    for name, value in request.form.items():
        try:
            decoded = json.loads(value)
        except RecursionError:
            return f"form field {printable(name, 50)}: nested too deeply"
        except ValueError:
            decoded = value  # not JSON: validated as text
        problem = unstorable({name: decoded})
        if problem:
            return f"form field {problem}"
    return None


def _error_handlers(app: OpenAPI) -> None:
    @app.errorhandler(AdminError)
    def _admin_error(exc: AdminError) -> Response:
        return error(exc.status, exc.code, str(exc), getattr(exc, "errors", ()))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if exc.response is not None and exc.response.mimetype == "application/json":
            return exc.response  # type: ignore[return-value]  # flask-openapi3's validation response
        name = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or name
        if isinstance(exc, RequestEntityTooLarge):
            message = f"the request body is larger than {request.max_content_length} bytes"
        response = error(exc.code or 500, name, message)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    @app.errorhandler(Unavailable)
    def _unavailable(exc: Unavailable) -> Response:
        log.warning("answering 503: %s", exc)
        return error(503, "unavailable", str(exc))

    @app.errorhandler(psycopg.OperationalError)
    def _db_error(exc: psycopg.OperationalError) -> Response:
        log.exception("database error")
        return error(503, "unavailable", "the database is unavailable")

    @app.errorhandler(Exception)
    def _bug(exc: Exception) -> Response:
        log.exception("unexpected error")
        return error(500, "internal_error", "an unexpected error; see the server log")


def _document(app: OpenAPI, settings: AdminSettings) -> dict[str, Any]:
    """The OpenAPI document, with what the configuration decides written in: the largest page."""
    doc: dict[str, Any] = app.api_doc
    for item in doc["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "per_page":
                    parameter["schema"]["maximum"] = settings.max_page_size
    for schema in doc.get("components", {}).get("schemas", {}).values():
        per_page = schema.get("properties", {}).get("per_page")
        if per_page is not None and "minimum" in per_page:  # the query models, not the page bodies
            per_page["maximum"] = settings.max_page_size
    return doc
