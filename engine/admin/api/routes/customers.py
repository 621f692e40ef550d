"""The customer list: search, create, mass create, import, export, delete many."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime

from flask import Response
from flask_openapi3.blueprint import APIBlueprint
from flask_openapi3.models.tag import Tag

from engine.admin import csvio
from engine.admin import schemas as s
from engine.admin.api.http import json_response, service, streamed
from engine.admin.api.paths import CSV_RESPONSE, ImportForm
from engine.admin.service import AdminService

from . import blueprint

log = logging.getLogger("callgate.admin.api")

# The import takes a body up to [admin] max_import_bytes, every other route max_body_bytes.
IMPORT_ENDPOINT = "customers.import_customers"

customers = Tag(name="customers", description="list, create, import, export, delete")


def routes() -> APIBlueprint:
    api = blueprint("customers")

    @api.get(
        "/customers",
        tags=[customers],
        responses={200: s.CustomerPage},
        summary="Customer list: customers and providers, search, paging, sorting",
    )
    def list_customers(query: s.CustomerQuery) -> Response:
        return json_response(service().list_customers(query))

    @api.post("/customers", tags=[customers], responses={201: s.AccountCreated}, summary="Create customer")
    def create_customer(body: s.CustomerCreate) -> Response:
        return json_response(service().create_account(body, "customer"), 201)

    @api.post("/providers", tags=[customers], responses={201: s.AccountCreated},
              summary="Create provider (admin only)")  # fmt: skip
    def create_provider(body: s.CustomerCreate) -> Response:
        return json_response(service().create_account(body, "provider"), 201)

    @api.post(
        "/customers/mass-create",
        tags=[customers],
        responses={201: s.MassCreateResult},
        summary="Mass create: count accounts with a prefix, all or nothing",
    )
    def mass_create(body: s.MassCreate) -> Response:
        return json_response(service().mass_create(body), 201)

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
        text = io.TextIOWrapper(upload, encoding="utf-8-sig", newline="")

        def make(svc: AdminService) -> Iterator[str]:
            results = svc.import_csv(text, options)  # the header is checked now: 422 before streaming
            return _import_report(results, options)

        return Response(streamed(make, text), mimetype="application/json")

    @api.get(
        "/customers/export",
        tags=[customers],
        responses={200: CSV_RESPONSE},
        summary="Export the search as CSV (the grid's columns), streamed",
    )
    def export_customers(query: s.ExportQuery) -> Response:
        lines = streamed(lambda svc: csvio.export_lines(svc.iter_customers(query), query.balance_convention))
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
        return json_response(service().delete_accounts(body.numbers))

    return api


def _import_report(results: Iterator[s.ImportRowResult], options: s.ImportOptions) -> Iterator[str]:
    """The streamed ImportReport: rows in batches, then the summary (and why it stopped, if it did)."""
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
