"""The JSON HTTP API (``callgate api``): Flask + flask-openapi3, served by gevent's WSGI server.

Every route, the OpenAPI document included, needs ``Authorization: Bearer <token>``
(tokens come from ``callgate admin token create``). Requests are validated
against the pydantic models of :mod:`engine.admin.schemas`; the work is done by
:class:`engine.admin.service.AdminService`. Errors are JSON: ``{"error": code,
"message": ..., "errors": [{"field": ..., "message": ...}]}`` with 401 (no or
bad token), 403 (scope), 404 (not found or outside the scope), 422 (invalid).

JSON numbers in requests are read as ``Decimal`` (never binary floats); money
in responses is a string.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
from flask import Response, g, request
from flask.json.provider import DefaultJSONProvider
from flask_openapi3 import APIBlueprint, FileStorage, Info, OpenAPI, Tag
from pydantic import BaseModel, Field, RootModel, ValidationError
from werkzeug.exceptions import HTTPException

from engine.admin import csvio
from engine.admin import schemas as s
from engine.admin.billing_routes import billing_routes
from engine.admin.errors import AdminError, FieldError, Unauthorized
from engine.admin.service import AdminService, authenticate
from engine.admin.settings import AdminSettings, admin_settings

log = logging.getLogger("callgate.admin.api")

PREFIX = "/api/v1"
SECURITY = [{"bearerAuth": []}]


class _JSON(DefaultJSONProvider):
    """Exact decimals both ways: JSON numbers in, strings out."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return json.loads(s, parse_float=Decimal, **kwargs)

    @staticmethod
    def default(o: Any) -> Any:
        if isinstance(o, Decimal):
            return s._format_money(o)
        return DefaultJSONProvider.default(o)


def _error(status: int, code: str, message: str, errors: list[FieldError] | None = None) -> Response:
    body = s.ErrorOut(error=code, message=message, errors=[s.FieldErrorOut(field=e.field, message=e.message)
                                                           for e in errors or []])  # fmt: skip
    response = Response(body.model_dump_json(), status=status, mimetype="application/json")
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="callgate"'
    return response


def _validation_error(exc: ValidationError) -> Response:
    errors = s.field_errors(exc)
    return _error(422, "validation_failed", "; ".join(str(e) for e in errors), errors)


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status=status, mimetype="application/json")


def _list(models: list[Any]) -> Response:
    return Response("[" + ",".join(m.model_dump_json() for m in models) + "]", mimetype="application/json")


def _no_content() -> Response:
    return Response(status=204)


def _svc() -> AdminService:
    return AdminService(g.conn, g.settings, g.actor)


def _streamed(make: Any, *owned: Any) -> Iterator[str]:
    """Run `make(service)` -> iterator of text over the request's connection, which the stream now
    owns with `owned` (files): they are closed when the stream ends. (Flask tears the request down
    before a streamed body is sent, so a stream must not need it.)"""
    svc = AdminService(g.pop("conn"), g.settings, g.actor)

    def close() -> None:
        svc.conn.close()
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


# --------------------------------------------------------------------------- path models


class NumberPath(BaseModel):
    number: s.AccountNumber = Field(description="the account number")


class SipDevicePath(NumberPath):
    username: s.SipUser


class IpMapPath(NumberPath):
    entry_id: int


class CallerIdPath(NumberPath):
    caller_id: s.Digits


class DidPath(NumberPath):
    did: s.Digits


class SpeedDialPath(NumberPath):
    key: s.SpeedDialKey


class BlockedCodePath(NumberPath):
    prefix: s.Digits


class ImportForm(BaseModel):
    file: FileStorage = Field(description="the CSV file (UTF-8); the first line is the header")
    options: s.ImportOptions | None = Field(
        None, description="JSON: mapping, defaults, dry_run, balance_convention"
    )


CSV_RESPONSE = {"description": "CSV (UTF-8)", "content": {"text/csv": {"schema": {"type": "string"}}}}


class SipDeviceList(RootModel[list[s.SipDeviceOut]]):
    pass


class IpMapList(RootModel[list[s.IpMapOut]]):
    pass


class CallerIdList(RootModel[list[s.CallerIdOut]]):
    pass


class DidList(RootModel[list[s.DidOut]]):
    pass


class SpeedDialList(RootModel[list[s.SpeedDialOut]]):
    pass


class BlockedCodeList(RootModel[list[s.BlockedCodeOut]]):
    pass


class TrunkList(RootModel[list[s.TrunkOut]]):
    pass


# --------------------------------------------------------------------------- the application


def create_app(config: Any, settings: AdminSettings | None = None) -> OpenAPI:
    """The WSGI application for `config` (its database and [admin] section)."""
    settings = settings or admin_settings(config)
    database_url = config.database.url
    connect_timeout = int(getattr(config.database, "connect_timeout", 5))

    app = OpenAPI(
        "callgate.admin",
        info=Info(title="callgate admin API", version="1",
                  description="Customer management (ASTPP's customer module) for admins and resellers."),
        security_schemes={"bearerAuth": {"type": "http", "scheme": "bearer"}},
        responses={401: s.ErrorOut, 404: s.ErrorOut, 422: s.ErrorOut},
        validation_error_status=422,
        validation_error_model=s.ErrorOut,
        validation_error_callback=_validation_error,
        doc_ui=False,
    )  # fmt: skip
    app.json = _JSON(app)
    app.config["MAX_CONTENT_LENGTH"] = 1 << 30  # a 100k-row import is ~15 MB; spooled to disk by werkzeug

    @app.before_request
    def _authenticate() -> Response | None:
        g.settings = settings
        token = None
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
        try:
            g.conn = psycopg.connect(database_url, autocommit=True, connect_timeout=connect_timeout)
        except psycopg.OperationalError:
            log.exception("database unreachable")
            return _error(503, "unavailable", "the database is unreachable")
        try:
            g.actor = authenticate(g.conn, token)
        except Unauthorized as exc:
            return _error(401, exc.code, str(exc))
        return None

    @app.teardown_request
    def _close(_exc: BaseException | None) -> None:
        conn = g.pop("conn", None)
        if conn is not None:
            conn.close()

    @app.errorhandler(AdminError)
    def _admin_error(exc: AdminError) -> Response:
        errors = getattr(exc, "errors", None)
        return _error(exc.status, exc.code, str(exc), errors)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if exc.response is not None and exc.response.mimetype == "application/json":
            return exc.response  # flask-openapi3's validation response, already ours
        name = (exc.name or "error").lower().replace(" ", "_")
        return _error(exc.code or 500, name, exc.description or name)

    @app.errorhandler(psycopg.OperationalError)
    def _db_error(exc: psycopg.OperationalError) -> Response:
        log.exception("database error")
        return _error(503, "unavailable", "the database is unavailable")

    @app.get(f"{PREFIX}/openapi.json", doc_ui=False)
    def openapi_document() -> Response:
        return Response(json.dumps(app.api_doc), mimetype="application/json")

    app.register_api(_routes())
    app.register_api(billing_routes())  # CDRs, statements, e-mail log (engine/admin/billing_routes.py)
    return app


def _routes() -> APIBlueprint:
    customers = Tag(name="customers", description="list, create, import, export, delete")
    account = Tag(name="account", description="one customer or provider and its sub-resources")
    balance = Tag(name="balance", description="refills, charges, the refill report")
    audit = Tag(name="audit", description="the audit log")
    api = APIBlueprint(
        "admin", __name__, url_prefix=PREFIX, abp_security=SECURITY,
        abp_responses={401: s.ErrorOut, 404: s.ErrorOut, 422: s.ErrorOut},
    )  # fmt: skip

    # -- customers -----------------------------------------------------------------

    @api.get(
        "/customers",
        tags=[customers],
        responses={200: s.CustomerPage},
        summary="Customer list: customers and providers, search, paging, sorting",
    )
    def list_customers(query: s.CustomerQuery) -> Response:
        return _json(_svc().list_customers(query))

    @api.post("/customers", tags=[customers], responses={201: s.AccountCreated}, summary="Create customer")
    def create_customer(body: s.CustomerCreate) -> Response:
        return _json(_svc().create_account(body, "customer"), 201)

    @api.post(
        "/providers",
        tags=[customers],
        responses={201: s.AccountCreated, 403: s.ErrorOut},
        summary="Create provider (admin only)",
    )
    def create_provider(body: s.CustomerCreate) -> Response:
        return _json(_svc().create_account(body, "provider"), 201)

    @api.post(
        "/customers/mass-create",
        tags=[customers],
        responses={201: s.MassCreateResult},
        summary="Mass create: count accounts with a prefix, all or nothing",
    )
    def mass_create(body: s.MassCreate) -> Response:
        return _json(_svc().mass_create(body), 201)

    @api.post(
        "/customers/import",
        tags=[customers],
        responses={200: s.ImportReport},
        summary="Import customers from CSV (multipart: file, options); the report is streamed",
    )
    def import_customers(form: ImportForm) -> Response:
        options = form.options or s.ImportOptions()
        upload = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # noqa: SIM115 - the stream closes it
        shutil.copyfileobj(form.file.stream, upload)
        upload.seek(0)
        stream = io.TextIOWrapper(upload, encoding="utf-8-sig", newline="")

        def make(svc: AdminService) -> Iterator[str]:
            results = svc.import_csv(stream, options)  # the header is checked now: 422 before streaming
            return body(results)

        def body(results: Iterator[s.ImportRowResult]) -> Iterator[str]:
            summary = s.ImportSummary(dry_run=options.dry_run)
            yield '{"rows":['
            batch: list[str] = []
            failure = ""
            try:
                for r in results:
                    csvio.summary_add(summary, r)
                    batch.append(r.model_dump_json())
                    if len(batch) >= 200:
                        yield ("," if summary.rows > len(batch) else "") + ",".join(batch)
                        batch = []
            except Exception:  # the status is sent already: say it in the body, which stays JSON
                log.exception("import stopped")
                failure = "the import stopped early (see the server log); rows after the last one listed"
                failure += " were not imported"
            if batch:
                yield ("," if summary.rows > len(batch) else "") + ",".join(batch)
            tail = ',"error":' + json.dumps(failure) if failure else ""
            yield '],"summary":' + summary.model_dump_json() + tail + "}"

        return Response(_streamed(make, stream), mimetype="application/json")

    @api.get(
        "/customers/export",
        tags=[customers],
        responses={200: CSV_RESPONSE},
        summary="Export the search as CSV (the grid's columns), streamed",
    )
    def export_customers(query: s.ExportQuery) -> Response:
        lines = _streamed(lambda svc: csvio.export_lines(svc.iter_customers(query), query.balance_convention))
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return Response(
            lines,
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="customers-{stamp}.csv"'},
        )

    @api.post(
        "/customers/delete",
        tags=[customers],
        responses={200: s.DeleteResult},
        summary="Delete several accounts in one transaction",
    )
    def delete_many(body: s.DeleteRequest) -> Response:
        return _json(_svc().delete_accounts(body.numbers))

    # -- one account ---------------------------------------------------------------

    @api.get("/customers/<number>", tags=[account], responses={200: s.AccountOut}, summary="Show an account")
    def get_customer(path: NumberPath) -> Response:
        return _json(_svc().get_account(path.number))

    @api.patch(
        "/customers/<number>",
        tags=[account],
        responses={200: s.AccountOut},
        summary="Edit profile and settings",
    )
    def update_customer(path: NumberPath, body: s.CustomerUpdate) -> Response:  # type: ignore[valid-type]
        return _json(_svc().update_account(path.number, body))

    @api.delete(
        "/customers/<number>",
        tags=[account],
        responses={200: s.DeleteResult},
        summary="Delete (soft): off, related data removed, DIDs released",
    )
    def delete_customer(path: NumberPath) -> Response:
        return _json(_svc().delete_accounts([path.number]))

    @api.get("/customers/<number>/sip-devices", tags=[account], responses={200: SipDeviceList})
    def list_sip_devices(path: NumberPath) -> Response:
        return _list(_svc().list_sip_devices(path.number))

    @api.post("/customers/<number>/sip-devices", tags=[account], responses={201: s.SipDeviceCreated})
    def add_sip_device(path: NumberPath, body: s.SipDeviceCreate) -> Response:
        return _json(_svc().add_sip_device(path.number, body), 201)

    @api.patch("/customers/<number>/sip-devices/<username>", tags=[account], responses={200: s.SipDeviceOut})
    def update_sip_device(path: SipDevicePath, body: s.SipDeviceUpdate) -> Response:  # type: ignore[valid-type]
        return _json(_svc().update_sip_device(path.number, path.username, body))

    @api.delete("/customers/<number>/sip-devices/<username>", tags=[account], responses={204: None})
    def delete_sip_device(path: SipDevicePath) -> Response:
        _svc().delete_sip_device(path.number, path.username)
        return _no_content()

    @api.get("/customers/<number>/ip-map", tags=[account], responses={200: IpMapList})
    def list_ip_map(path: NumberPath) -> Response:
        return _list(_svc().list_ip_map(path.number))

    @api.post("/customers/<number>/ip-map", tags=[account], responses={201: s.IpMapOut})
    def add_ip_map(path: NumberPath, body: s.IpMapCreate) -> Response:
        return _json(_svc().add_ip_map(path.number, body), 201)

    @api.patch("/customers/<number>/ip-map/<int:entry_id>", tags=[account], responses={200: s.IpMapOut})
    def update_ip_map(path: IpMapPath, body: s.IpMapUpdate) -> Response:  # type: ignore[valid-type]
        return _json(_svc().update_ip_map(path.number, path.entry_id, body))

    @api.delete("/customers/<number>/ip-map/<int:entry_id>", tags=[account], responses={204: None})
    def delete_ip_map(path: IpMapPath) -> Response:
        _svc().delete_ip_map(path.number, path.entry_id)
        return _no_content()

    @api.get("/customers/<number>/caller-ids", tags=[account], responses={200: CallerIdList})
    def list_caller_ids(path: NumberPath) -> Response:
        return _list(_svc().list_caller_ids(path.number))

    @api.post("/customers/<number>/caller-ids", tags=[account], responses={201: s.CallerIdOut})
    def add_caller_id(path: NumberPath, body: s.CallerIdCreate) -> Response:
        return _json(_svc().add_caller_id(path.number, body), 201)

    @api.patch("/customers/<number>/caller-ids/<caller_id>", tags=[account], responses={200: s.CallerIdOut})
    def update_caller_id(path: CallerIdPath, body: s.CallerIdUpdate) -> Response:  # type: ignore[valid-type]
        return _json(_svc().update_caller_id(path.number, path.caller_id, body))

    @api.delete("/customers/<number>/caller-ids/<caller_id>", tags=[account], responses={204: None})
    def delete_caller_id(path: CallerIdPath) -> Response:
        _svc().delete_caller_id(path.number, path.caller_id)
        return _no_content()

    @api.get("/customers/<number>/forced-caller-id", tags=[account], responses={200: s.ForcedCallerIdOut})
    def get_forced_caller_id(path: NumberPath) -> Response:
        return _json(_svc().get_forced_caller_id(path.number))

    @api.put("/customers/<number>/forced-caller-id", tags=[account], responses={200: s.ForcedCallerIdOut})
    def set_forced_caller_id(path: NumberPath, body: s.ForcedCallerIdIn) -> Response:
        return _json(_svc().set_forced_caller_id(path.number, body))

    @api.delete("/customers/<number>/forced-caller-id", tags=[account], responses={204: None})
    def clear_forced_caller_id(path: NumberPath) -> Response:
        _svc().clear_forced_caller_id(path.number)
        return _no_content()

    @api.get("/customers/<number>/dids", tags=[account], responses={200: DidList})
    def list_dids(path: NumberPath) -> Response:
        return _list(_svc().list_dids(path.number))

    @api.post(
        "/customers/<number>/dids",
        tags=[account],
        responses={201: s.DidOut, 403: s.ErrorOut},
        summary="Assign a free DID (admin only)",
    )
    def assign_did(path: NumberPath, body: s.DidAssign) -> Response:
        return _json(_svc().assign_did(path.number, body), 201)

    @api.patch("/customers/<number>/dids/<did>", tags=[account], responses={200: s.DidOut})
    def update_did(path: DidPath, body: s.DidUpdate) -> Response:
        return _json(_svc().update_did(path.number, path.did, body))

    @api.delete(
        "/customers/<number>/dids/<did>", tags=[account], responses={204: None}, summary="Release a DID"
    )
    def release_did(path: DidPath) -> Response:
        _svc().release_did(path.number, path.did)
        return _no_content()

    @api.get("/customers/<number>/speed-dials", tags=[account], responses={200: SpeedDialList})
    def list_speed_dials(path: NumberPath) -> Response:
        return _list(_svc().list_speed_dials(path.number))

    @api.put("/customers/<number>/speed-dials/<key>", tags=[account], responses={200: s.SpeedDialOut})
    def set_speed_dial(path: SpeedDialPath, body: s.SpeedDialIn) -> Response:
        return _json(_svc().set_speed_dial(path.number, path.key, body))

    @api.delete("/customers/<number>/speed-dials/<key>", tags=[account], responses={204: None})
    def delete_speed_dial(path: SpeedDialPath) -> Response:
        _svc().delete_speed_dial(path.number, path.key)
        return _no_content()

    @api.get("/customers/<number>/blocked-codes", tags=[account], responses={200: BlockedCodeList})
    def list_blocked_codes(path: NumberPath) -> Response:
        return _list(_svc().list_blocked_codes(path.number))

    @api.post("/customers/<number>/blocked-codes", tags=[account], responses={201: s.BlockedCodeOut})
    def add_blocked_code(path: NumberPath, body: s.BlockedCodeCreate) -> Response:
        return _json(_svc().add_blocked_code(path.number, body), 201)

    @api.delete("/customers/<number>/blocked-codes/<prefix>", tags=[account], responses={204: None})
    def delete_blocked_code(path: BlockedCodePath) -> Response:
        _svc().delete_blocked_code(path.number, path.prefix)
        return _no_content()

    @api.get("/customers/<number>/alert-threshold", tags=[account], responses={200: s.AlertThresholdOut})
    def get_alert_threshold(path: NumberPath) -> Response:
        return _json(_svc().get_alert_threshold(path.number))

    @api.put(
        "/customers/<number>/alert-threshold",
        tags=[account],
        responses={200: s.AlertThresholdOut},
        summary="Low-balance notification level (only the fields given change)",
    )
    def set_alert_threshold(path: NumberPath, body: s.AlertThreshold) -> Response:
        return _json(_svc().set_alert_threshold(path.number, body))

    @api.get(
        "/customers/<number>/trunks",
        tags=[account],
        responses={200: TrunkList},
        summary="A provider's trunks",
    )
    def list_trunks(path: NumberPath) -> Response:
        return _list(_svc().list_trunks(path.number))

    # -- balance -------------------------------------------------------------------

    @api.post(
        "/customers/<number>/refills",
        tags=[balance],
        responses={201: s.LedgerEntryOut},
        summary="Refill (top-up)",
    )
    def refill(path: NumberPath, body: s.RefillIn) -> Response:
        return _json(_svc().refill(path.number, body), 201)

    @api.get(
        "/customers/<number>/refills",
        tags=[balance],
        responses={200: s.LedgerPage},
        summary="The account's refills",
    )
    def account_refills(path: NumberPath, query: s.LedgerQuery) -> Response:
        return _json(_svc().ledger(path.number, query.model_copy(update={"kind": "refill"})))

    @api.post(
        "/customers/<number>/charges",
        tags=[balance],
        responses={201: s.LedgerEntryOut},
        summary="Post a charge (debit)",
    )
    def charge(path: NumberPath, body: s.ChargeIn) -> Response:
        return _json(_svc().charge(path.number, body), 201)

    @api.get(
        "/customers/<number>/charges",
        tags=[balance],
        responses={200: s.LedgerPage},
        summary="Charge history: every balance change (opening balance, refills, charges)",
    )
    def charge_history(path: NumberPath, query: s.LedgerQuery) -> Response:
        return _json(_svc().ledger(path.number, query))

    @api.get("/refills", tags=[balance], responses={200: s.LedgerPage}, summary="Refill report")
    def refill_report(query: s.RefillQuery) -> Response:
        return _json(_svc().refill_report(query))

    # -- audit ---------------------------------------------------------------------

    @api.get("/audit", tags=[audit], responses={200: s.AuditPage}, summary="The audit log, newest first")
    def audit_log(query: s.AuditQuery) -> Response:
        return _json(_svc().audit_log(query))

    return api


def serve(config: Any, host: str | None = None, port: int | None = None) -> int:
    """Run the API on gevent's WSGI server until interrupted (the caller monkey-patched already)."""
    import signal

    import gevent
    from gevent.pywsgi import WSGIServer

    from engine.logs import setup_logging

    setup_logging(config.logging)
    settings = admin_settings(config)
    app = create_app(config, settings)
    address = (host or settings.listen_host, settings.listen_port if port is None else port)
    server = WSGIServer(address, app, log=logging.getLogger("callgate.admin.access"), error_log=log)
    server.start()
    gevent.signal_handler(signal.SIGTERM, server.close)  # stop accepting; requests in flight finish
    print(f"callgate admin API listening on http://{address[0]}:{server.server_port}{PREFIX}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(timeout=5)
    return 0
