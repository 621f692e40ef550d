"""What every route shares: the JSON codec, bounded error bodies, response helpers, and the
request's database connection (taken from the pool only when a route needs it)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from typing import Any

from flask import Flask, Response, current_app, g
from flask.json.provider import DefaultJSONProvider
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import BadRequest

from engine.admin import schemas as s
from engine.admin.errors import FieldError
from engine.admin.service import Actor, AdminService
from engine.admin.settings import AdminSettings

from .db import Database

PREFIX = "/api/v1"

# Error bodies are bounded whatever the request was: at most this many field errors, each
# message and field name cut to these lengths (a 3.5 MB body of unknown keys gets a short answer).
MAX_REPORTED_ERRORS = 20
MAX_MESSAGE_CHARS = 300
MAX_FIELD_CHARS = 100
# Deeper JSON than this is refused before validation: no request of this API nests beyond 3.
MAX_JSON_DEPTH = 32

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str, limit: int) -> str:
    """`text` safe to echo: control characters and lone surrogates backslash-escaped, cut to
    `limit` characters with a marker saying how much was cut."""
    if len(text) > limit * 4:
        text = text[: limit * 4]  # enough to fill `limit` after escaping; never scan megabytes
        cut = True
    else:
        cut = False
    text = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    if len(text) > limit or cut:
        return text[:limit] + "…[truncated]"
    return text


class JSONCodec(DefaultJSONProvider):
    """Exact decimals both ways (JSON numbers in, strings out); request bodies too deep or
    carrying text PostgreSQL cannot store are refused with 400 before any validation."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            value = json.loads(s, parse_float=Decimal, **kwargs)
        except RecursionError:
            raise BadRequest(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
        except ValueError as exc:  # includes UnicodeDecodeError
            raise BadRequest(f"the body is not valid JSON: {printable(str(exc), 200)}") from None
        problem = unstorable(value)
        if problem:
            raise BadRequest(problem)
        return value

    @staticmethod
    def default(o: Any) -> Any:
        if isinstance(o, Decimal):
            return s.format_money(o)
        return DefaultJSONProvider.default(o)


def unstorable(value: Any) -> str | None:
    """Why a decoded JSON value cannot be accepted (too deep, NUL, lone surrogate), or None."""
    try:
        s.check_text_tree(value, max_depth=MAX_JSON_DEPTH)
    except ValueError as exc:
        return str(exc)
    return None


def error(status: int, code: str, message: str, errors: Iterable[FieldError] = ()) -> Response:
    """The JSON error body, bounded in size whatever it reports."""
    listed = list(errors)
    shown = [
        s.FieldErrorOut(
            field=printable(e.field, MAX_FIELD_CHARS), message=printable(e.message, MAX_MESSAGE_CHARS)
        )
        for e in listed[:MAX_REPORTED_ERRORS]
    ]
    if len(listed) > MAX_REPORTED_ERRORS:
        shown.append(
            s.FieldErrorOut(field="", message=f"{len(listed) - MAX_REPORTED_ERRORS} more errors not shown")
        )
    body = s.ErrorOut(error=code, message=printable(message, MAX_MESSAGE_CHARS), errors=shown)
    response = Response(body.model_dump_json(), status=status, mimetype="application/json")
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="callgate"'
    if status == 503:
        response.headers["Retry-After"] = "1"
    return response


def validation_error(exc: ValidationError) -> Response:
    errors = s.field_errors(exc)
    return error(422, "validation_failed", "; ".join(str(e) for e in errors[:MAX_REPORTED_ERRORS]), errors)


def json_response(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status=status, mimetype="application/json")


def list_response(models: Iterable[BaseModel]) -> Response:
    return Response("[" + ",".join(m.model_dump_json() for m in models) + "]", mimetype="application/json")


def no_content() -> Response:
    return Response(status=204)


def database(app: Flask | None = None) -> Database:
    db: Database = (app or current_app).extensions["callgate.db"]
    return db


def settings() -> AdminSettings:
    value: AdminSettings = current_app.extensions["callgate.settings"]
    return value


def service() -> AdminService:
    """The service for this request's actor, on a pooled connection taken now (503 if none is
    free) and given back when the request ends."""
    if "conn" not in g:
        g.conn = database().getconn()
    actor: Actor = g.actor
    return AdminService(g.conn, settings(), actor)


def release_connection() -> None:
    conn = g.pop("conn", None)
    if conn is not None:
        database().putconn(conn)


def streamed(make: Callable[[AdminService], Iterator[str]], *owned: Any) -> Iterator[str]:
    """Run `make(service)` -> iterator of text on the request's connection, which the stream now
    owns with `owned` (files): they are given back or closed when the stream ends. (Flask tears the
    request down before a streamed body is sent, so a stream must not need it.)"""
    svc = service()
    db = database()
    conn = g.pop("conn")

    def close() -> None:
        db.putconn(conn)
        for thing in owned:
            thing.close()

    try:
        pieces = make(svc)
    except BaseException:
        close()
        raise

    def run() -> Iterator[str]:
        try:
            yield from pieces
        finally:
            close()

    return run()
