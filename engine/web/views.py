"""The web admin's pages: sign-in, the customer grid and its buttons, the account page's tabs."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg
from flask import (
    Blueprint,
    Response,
    abort,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)
from werkzeug.datastructures import MultiDict

from engine.admin import csvio
from engine.admin import schemas as s
from engine.admin.errors import FieldError, NotFound, ValidationFailed
from engine.admin.service import AdminService
from engine.web import auth, billing, forms, tabs
from engine.web.app import db, ext, new_csrf_token, page_error, service
from engine.web.jobs import Busy, Job

blueprint = Blueprint("web", __name__)
log = logging.getLogger("callgate.web")

PER_PAGE_CHOICES = (25, 50, 100, 500)
MAX_PAGE = 1_000_000  # beyond, OFFSET arithmetic could overflow; no grid has that many pages
REPORT_PAGE_ROWS = 500
# The grid's columns, as ASTPP's (Localization for the admin only): (sort key, title).
GRID_COLUMNS: tuple[tuple[str, str], ...] = (
    ("number", "Account"), ("first_name", "First name"), ("last_name", "Last name"), ("company", "Company"),
    ("rate_group", "Rate group"), ("balance", "Balance"), ("credit_limit", "Credit limit"),
    ("first_used", "First used"), ("expiry", "Expiry"), ("concurrent_calls", "CC"),
    ("localization", "Localization"), ("reseller", "Reseller"), ("created", "Created"), ("status", "Status"),
)  # fmt: skip
# The search panel: text fields with their operator, then ranges, then choices.
TEXT_FILTERS = (
    "number", "first_name", "last_name", "company", "email", "rate_group", "localization", "reseller",
)  # fmt: skip
RANGE_FILTERS = (
    ("balance", "balance_min", "balance_max"), ("credit_limit", "credit_limit_min", "credit_limit_max"),
    ("concurrent_calls", "concurrent_calls_min", "concurrent_calls_max"),
    ("first_used", "first_used_from", "first_used_to"), ("expiry", "expiry_from", "expiry_to"),
    ("created", "created_from", "created_to"),
)  # fmt: skip
CHOICE_FILTERS = ("entity_type", "account_type", "status", "billing_schedule")
OPERATORS = (("contains", "contains"), ("eq", "is"), ("ne", "is not"), ("begins", "begins with"),
             ("ends", "ends with"), ("not_contains", "does not contain"))  # fmt: skip


def _fmt(value: Any) -> str:
    return forms.shown(value)


blueprint.add_app_template_filter(_fmt, "fmt")
blueprint.add_app_template_global(forms.label, "label")


def _user() -> auth.WebUser:
    user: auth.WebUser = g.user
    return user


def _render(template: str, status: int = 200, **context: Any) -> Any:
    return render_template(template, user=g.get("user"), **context), status


# --------------------------------------------------------------------------- sign-in


def _safe_next(target: str | None) -> str:
    """Only a path on this site (never another host) is followed after sign-in."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("web.customers")
    parts = urlsplit(target)
    return target if not parts.netloc and not parts.scheme else url_for("web.customers")


@blueprint.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "GET":
        return _render("login.html", next=request.args.get("next", ""), error="", name="")
    name = request.form.get("username", "").strip()[:100]
    password = request.form.get("password", "")[:1000]
    source = request.remote_addr or "?"
    throttle: auth.Throttle = ext()["throttle"]
    wait = throttle.retry_after(name, source)
    if wait > 0:
        log.warning("web sign-in throttled: user %r from %s", name[:64], source)  # %r: no line breaks
        message = f"Too many failed sign-ins. Try again in {int(wait) // 60 + 1} minute(s)."
        return _render("login.html", 429, next=request.form.get("next", ""), error=message, name=name)
    user = auth.check_password(ext()["web"], db(), name, password) if name and password else None
    if user is None:
        log.warning("web sign-in failed: user %r from %s", name[:64], source)
        throttle.failed(name, source)
        return _render("login.html", 401, next=request.form.get("next", ""),
                       error="The user name or the password is not right.", name=name)  # fmt: skip
    throttle.succeeded(name)
    log.info("web sign-in: %s (%s) from %s", user.name, user.role, source)
    session.clear()  # a new session (and a new CSRF token) for the signed-in user
    session.permanent = True
    session.update({"u": user.name, "k": user.kind, "f": user.fingerprint, "t": time.time()})
    new_csrf_token()
    return redirect(_safe_next(request.form.get("next")))


@blueprint.route("/favicon.ico")
def favicon() -> Any:
    """No icon (pages say so too): answered here so that a browser's guess never lands on the sign-in
    page, whose answer would replace the session's CSRF token under a form being filled in."""
    return Response(status=204, headers={"Cache-Control": "max-age=86400"})


@blueprint.route("/logout", methods=["POST"])
def logout() -> Any:
    session.clear()
    return redirect(url_for("web.login"))


@blueprint.route("/")
def home() -> Any:
    return redirect(url_for("web.customers"))


# --------------------------------------------------------------------------- the grid


def _filters(args: Mapping[str, str]) -> dict[str, str]:
    """The non-empty search fields of a query string (what the grid and the export pass on)."""
    names = set(s.CustomerQuery.model_fields)
    return {k: v for k, v in args.items() if k in names and v.strip() != ""}


def _grid_query(args: Mapping[str, str]) -> tuple[dict[str, str], s.CustomerQuery | None, list[FieldError]]:
    given = _filters(args)
    given.setdefault("sort", "-number")
    given.setdefault("per_page", "50")
    try:
        return given, s.parse(s.CustomerQuery, given), []
    except ValidationFailed as exc:
        return given, None, exc.errors


@blueprint.route("/customers")
def customers() -> Any:
    given, query, errors = _grid_query(request.args)
    page = None
    if query is not None:
        if query.per_page > ext()["admin"].max_page_size:
            errors = [FieldError("per_page", f"at most {ext()['admin'].max_page_size}")]
        elif query.page > MAX_PAGE:
            errors = [FieldError("page", f"at most {MAX_PAGE}")]
        else:
            page = service().list_customers(query)
    last_page = max(1, -(-page.total // page.per_page)) if page else 1
    by_field = {e.field.split(".")[0]: e.message for e in errors}
    return _render(
        "customers.html",
        422 if errors else 200,
        page=page,
        given=given,
        errors=errors,
        by_field=by_field,
        last_page=last_page,
        columns=[c for c in GRID_COLUMNS if c[0] != "localization" or _user().is_admin],
        text_filters=TEXT_FILTERS,
        range_filters=RANGE_FILTERS,
        choice_filters={name: _choices(name) for name in CHOICE_FILTERS},
        operators=OPERATORS,
        per_page_choices=PER_PAGE_CHOICES,
        searching=any(k not in ("sort", "per_page", "page") for k in given),
    )


def _choices(name: str) -> list[str]:
    control = forms.controls(s.CustomerFilter, {}, (), [name])[0]
    return [value for value, _ in control.options if value]


@blueprint.route("/customers/export")
def export() -> Any:
    given = _filters(request.args)
    given.pop("page", None)
    given.pop("per_page", None)
    given.setdefault("balance_convention", request.args.get("balance_convention") or "held")
    try:
        query = s.parse(s.ExportQuery, given)
    except ValidationFailed as exc:
        return page_error(422, f"The search is not valid: {exc}")
    svc = AdminService(_connect(), ext()["admin"], _user().actor())

    def lines() -> Iterator[str]:
        try:
            yield from csvio.export_lines(svc.iter_customers(query), query.balance_convention)
        finally:
            svc.conn.close()

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Response(
        stream_with_context(lines()),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="customers-{stamp}.csv"'},
    )


def _connect() -> psycopg.Connection[Any]:
    """A connection the caller owns (a streamed answer outlives the request's teardown)."""
    conn = db()
    g.pop("conn", None)
    return conn


@blueprint.route("/customers/delete", methods=["POST"])
def delete_many() -> Any:
    numbers = [n for n in request.form.getlist("numbers") if n][:10000]
    if not numbers:
        return redirect(url_for("web.customers"))
    if request.form.get("confirmed") != "yes":
        return _render("confirm_delete.html", numbers=numbers, back=_safe_next(request.form.get("back")))
    try:
        result = service().delete_accounts(s.parse(s.DeleteRequest, {"numbers": numbers}).numbers)
    except ValidationFailed as exc:
        return page_error(422, str(exc))
    return _render("deleted.html", result=result)


@blueprint.route("/refills")
def refill_report() -> Any:
    """ASTPP's refill report: refills across the user's accounts, by account, reseller and period."""
    names = ("account", "reseller", "since", "until", "page")
    given = {k: v.strip() for k, v in request.args.items() if k in names and v.strip()}
    report, problem = None, ""
    if "page" in given and not (given["page"].isdigit() and len(given["page"]) <= 6):
        given.pop("page")
    try:
        report = service().refill_report(s.parse(s.RefillQuery, {"per_page": "100", **given}))
    except ValidationFailed as exc:
        problem = str(exc)
    last_page = max(1, -(-report.total // report.per_page)) if report else 1
    return _render("refills.html", 422 if problem else 200, report=report, given=given, problem=problem,
                   last_page=last_page)  # fmt: skip


# --------------------------------------------------------------------------- create


@blueprint.route("/customers/new", methods=["GET", "POST"])
def create() -> Any:
    kind = "provider" if request.values.get("kind") == "provider" else "customer"
    errors: list[FieldError] = []
    values: dict[str, Any] = {}
    if request.method == "POST":
        values = forms.read_create(s.CustomerCreate, request.form)
        try:
            created = service().create_account(s.parse(s.CustomerCreate, values), kind)
        except ValidationFailed as exc:
            errors = exc.errors
        else:
            return _render("created.html", created=created, kind=kind)
    model = s.CustomerCreate
    sections = forms.sections(model, values, errors)
    for _, group in sections:
        for control in group:
            if control.name == "reseller" and not _user().is_admin:
                control.label = "Reseller (account number; empty = you)"
    return _render(
        "account_form.html",
        422 if errors else 200,
        title="Create provider" if kind == "provider" else "Create customer",
        sections=sections,
        other_errors=forms.unplaced_errors(model, errors),
        action=url_for("web.create", kind=kind),
        button="Create",
        number=None,
        tabs=(),
    )


# --------------------------------------------------------------------------- long work


def _jobs() -> Any:
    return ext()["jobs"]


@blueprint.route("/customers/mass-create", methods=["GET", "POST"])
def mass_create() -> Any:
    errors: list[FieldError] = []
    values: dict[str, Any] = {}
    if request.method == "POST":
        values = forms.read_create(s.MassCreate, request.form)
        try:
            data = s.parse(s.MassCreate, values)
        except ValidationFailed as exc:
            errors = exc.errors
        else:
            user, admin = _user(), ext()["admin"]
            job = Job(user.name, "mass-create", f"mass create of {data.count}", total=data.count)
            return _start(
                job, lambda conn, job: AdminService(conn, admin, user.actor()).mass_create(data, job)
            )
    model = s.MassCreate
    return _render(
        "mass_create.html",
        422 if errors else 200,
        controls=forms.controls(model, values, errors),
        other_errors=forms.unplaced_errors(model, errors),
    )


def _start(job: Job, work: Any, cleanup: Any = None) -> Any:
    """Start `work(conn, job)` as a background job on a connection of its own; show its page.

    `work` runs in another thread: it must not use the request (capture what it needs first)."""
    config = ext()["config"]
    url, timeout = config.database.url, int(config.database.connect_timeout)

    def run(job: Job) -> Any:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=timeout) as conn:
                return work(conn, job)
        finally:
            if cleanup is not None:
                cleanup()

    try:
        _jobs().start(job, run)
    except Busy as exc:
        if cleanup is not None:
            cleanup()
        return page_error(429, str(exc))
    return redirect(url_for("web.job_page", job_id=job.id), code=303)


@blueprint.route("/customers/import", methods=["GET", "POST"])
def import_csv() -> Any:
    if request.method == "GET":
        return _render("import.html", error="", dry_run=False)
    upload = request.files.get("file")
    dry_run = request.form.get("dry_run") == "yes"
    if upload is None or not upload.filename:
        return _render("import.html", 422, error="Choose a CSV file to import.", dry_run=dry_run)
    try:
        options = s.parse(s.ImportOptions, {"dry_run": dry_run, **(
            {"balance_convention": request.form["balance_convention"]}
            if request.form.get("balance_convention") else {})})  # fmt: skip
    except ValidationFailed as exc:
        return _render("import.html", 422, error=str(exc), dry_run=dry_run)
    handle, path = tempfile.mkstemp(prefix="callgate-import-", suffix=".csv")
    with os.fdopen(handle, "wb") as out:
        upload.save(out)
    # The header is checked now, so that a bad header is an answer on this page, not a failed job.
    try:
        with open(path, "rb") as source:
            csvio.records(source, options)
    except ValidationFailed as exc:
        os.unlink(path)
        return _render("import.html", 422, error=str(exc), dry_run=dry_run)
    what = ("dry run of " if dry_run else "import of ") + (upload.filename or "")[:100]
    job = Job(_user().name, "import", what, total=csvio.count_records(path))
    user = _user()
    admin = ext()["admin"]

    def work(conn: psycopg.Connection[Any], job: Job) -> dict[str, Any]:
        svc = AdminService(conn, admin, user.actor())
        summary = s.ImportSummary(dry_run=dry_run)
        rows: list[s.ImportRowResult] = []
        with open(path, "rb") as source:
            for result in svc.import_csv(source, options, job):  # type: ignore[arg-type] # bytes: read per line
                csvio.summary_add(summary, result)
                rows.append(result)
        return {"summary": summary, "rows": rows}

    def cleanup() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    return _start(job, work, cleanup)


def _job_or_404(job_id: str) -> Job:
    job: Job | None = _jobs().get(job_id, _user().name)
    if job is None:
        raise NotFound("no such job (jobs are kept for a while, and only for whoever started them)")
    return job


@blueprint.route("/jobs/<job_id>.json")
def job_status(job_id: str) -> Any:
    return jsonify(_job_or_404(job_id).status())


@blueprint.route("/jobs/<job_id>")
def job_page(job_id: str) -> Any:
    job = _job_or_404(job_id)
    context: dict[str, Any] = {"job": job, "rows": [], "page": 1, "last_page": 1, "failures_only": False}
    if job.state == "done" and job.kind == "import":
        rows = job.result["rows"]
        failures_only = request.args.get("failures") == "1"
        if failures_only:
            rows = [r for r in rows if r.status == "failed"]
        page = max(1, min(_int(request.args.get("page"), 1), 10**6))
        last_page = max(1, -(-len(rows) // REPORT_PAGE_ROWS))
        page = min(page, last_page)
        context.update(
            rows=rows[(page - 1) * REPORT_PAGE_ROWS : page * REPORT_PAGE_ROWS],
            page=page,
            last_page=last_page,
            failures_only=failures_only,
            summary=job.result["summary"],
        )
    secrets_shown: Any = None
    if job.state == "done" and job.kind == "mass-create" and job.result is not None:
        # Generated PINs and SIP passwords are shown once: the result keeps only the count after.
        secrets_shown = job.result
        job.result = None
        context["count"] = secrets_shown.count
        context["accounts"] = secrets_shown.accounts
    return _render("job.html", **context)


def _int(text: str | None, default: int) -> int:
    return int(text) if text and text.isdigit() and len(text) < 10 else default


# --------------------------------------------------------------------------- one account


def _tab_nav(number: str) -> list[tuple[str, str, str]]:
    return [
        (slug, title, url_for("web.account_tab", number=number, tab=slug)) for slug, title in tabs.ALL_TABS
    ]


def _number(number: str) -> str:
    """An account number from a URL, or NotFound (never a 500 for what a URL may hold)."""
    if not number.isdigit() or len(number) > 20:
        raise NotFound(f"account {number[:40]} not found")
    return number


@blueprint.route("/customers/<number>", methods=["GET", "POST"])
def account(number: str) -> Any:
    number = _number(number)
    svc = service()
    current = svc.get_account(number)
    errors: list[FieldError] = []
    values = current.model_dump()
    saved = False
    model = s.CustomerUpdate
    if request.method == "POST":
        changes = forms.read_changes(model, request.form, values)
        try:
            current = svc.update_account(number, s.parse(model, changes))
            values, saved = current.model_dump(), True
        except ValidationFailed as exc:
            errors = exc.errors
            values = {**values, **{k: request.form.get(k, "") for k in model.model_fields}}
    return _render(
        "account_form.html",
        422 if errors else 200,
        title=f"Account {number}",
        account=current,
        sections=forms.sections(model, values, errors, editing=True),
        other_errors=forms.unplaced_errors(model, errors),
        action=url_for("web.account", number=number),
        button="Save",
        number=number,
        tabs=_tab_nav(number),
        active="account",
        saved=saved,
    )


@blueprint.route("/customers/<number>/<tab>", methods=["GET"])
def account_tab(number: str, tab: str) -> Any:
    number = _number(number)
    if tab == "account":
        return redirect(url_for("web.account", number=number))
    if tab in tabs.LIST_BY_SLUG:
        return _list_tab(number, tabs.LIST_BY_SLUG[tab])
    if tab in tabs.SINGLE_BY_SLUG:
        return _single_tab(number, tabs.SINGLE_BY_SLUG[tab])
    pages = {"refills": _refills_tab, "charges": _charges_tab, "cdrs": _cdrs_tab, "emails": _emails_tab,
             "audit": _audit_tab, "explain": _explain_tab}  # fmt: skip
    if tab not in pages:
        abort(404)
    return pages[tab](number, tab)


def _tab_context(number: str, tab: str, svc: AdminService) -> dict[str, Any]:
    account = svc.get_account(number)  # NotFound first for an account outside the scope
    return {"number": number, "account": account, "tabs": _tab_nav(number), "active": tab}


def _list_tab(number: str, tab: tabs.ListTab, errors: list[FieldError] | None = None,
              values: Mapping[str, Any] | None = None, status: int = 200, message: str = "",
              generated: str = "") -> Any:  # fmt: skip
    svc = service()
    context = _tab_context(number, tab.slug, svc)
    rows = [r.model_dump() for r in tab.list(svc, number)]
    create = forms.controls(tab.create_model, values or {}, errors or []) if tab.create_model else []
    unplaced = forms.unplaced_errors(tab.create_model, errors or []) if tab.create_model else []
    return _render("list_tab.html", status, tab=tab, rows=rows, create=create, other_errors=unplaced,
                   message=message, generated=generated, **context)  # fmt: skip


@blueprint.route("/customers/<number>/<tab>/add", methods=["POST"])
def tab_add(number: str, tab: str) -> Any:
    number = _number(number)
    spec = tabs.LIST_BY_SLUG.get(tab)
    if spec is None or spec.create_model is None or spec.create is None:
        abort(404)
    values = forms.read_create(spec.create_model, request.form)
    svc = service()
    try:
        created = spec.create(svc, number, s.parse(spec.create_model, values))
    except ValidationFailed as exc:
        svc.get_account(number)  # scope first: outside it is "not found", never a form with errors
        return _list_tab(number, spec, exc.errors, values, 422)
    generated = getattr(created, "generated_password", None) or ""
    if generated:  # shown once, on this answer: never stored where a reload would show it again
        return _list_tab(number, spec, message="Added.", generated=generated)
    return redirect(url_for("web.account_tab", number=number, tab=tab, done="added"), code=303)


@blueprint.route("/customers/<number>/<tab>/<key>/edit", methods=["GET", "POST"])
def tab_edit(number: str, tab: str, key: str) -> Any:
    number = _number(number)
    spec = tabs.LIST_BY_SLUG.get(tab)
    if spec is None or spec.update_model is None or spec.update is None:
        abort(404)
    svc = service()
    context = _tab_context(number, tab, svc)
    rows = {str(r.model_dump()[spec.key]): r.model_dump() for r in spec.list(svc, number)}
    if key not in rows:
        raise NotFound(f"{spec.title} entry {key[:60]} not found")
    current = rows[key]
    errors: list[FieldError] = []
    values: dict[str, Any] = dict(current)
    if request.method == "POST":
        changes = forms.read_changes(spec.update_model, request.form, current)
        try:
            spec.update(svc, number, key, s.parse(spec.update_model, changes))
        except ValidationFailed as exc:
            errors = exc.errors
            values = {**values, **{k: request.form.get(k, "") for k in spec.update_model.model_fields}}
        else:
            return redirect(url_for("web.account_tab", number=number, tab=tab, done="saved"), code=303)
    return _render("edit_row.html", 422 if errors else 200, tab=spec, key=key,
                   controls=forms.controls(spec.update_model, values, errors, editing=True),
                   other_errors=forms.unplaced_errors(spec.update_model, errors), **context)  # fmt: skip


@blueprint.route("/customers/<number>/<tab>/<key>/delete", methods=["POST"])
def tab_delete(number: str, tab: str, key: str) -> Any:
    number = _number(number)
    spec = tabs.LIST_BY_SLUG.get(tab)
    if spec is None or spec.delete is None:
        abort(404)
    spec.delete(service(), number, key[:200])
    return redirect(url_for("web.account_tab", number=number, tab=tab, done="deleted"), code=303)


def _single_tab(number: str, tab: tabs.SingleTab, errors: list[FieldError] | None = None,
                values: Mapping[str, Any] | None = None, status: int = 200) -> Any:  # fmt: skip
    svc = service()
    context = _tab_context(number, tab.slug, svc)
    current = tab.get(svc, number)
    shown = dict(values) if values is not None else (current.model_dump() if current is not None else {})
    return _render("single_tab.html", status, tab=tab, current=current,
                   controls=forms.controls(tab.model, shown, errors or []),
                   other_errors=forms.unplaced_errors(tab.model, errors or []), **context)  # fmt: skip


@blueprint.route("/customers/<number>/single/<tab>", methods=["POST"])
def single_set(number: str, tab: str) -> Any:
    number = _number(number)
    spec = tabs.SINGLE_BY_SLUG.get(tab)
    if spec is None:
        abort(404)
    svc = service()
    if request.form.get("action") == "clear" and spec.clear is not None:
        spec.clear(svc, number)
        return redirect(url_for("web.account_tab", number=number, tab=tab, done="cleared"), code=303)
    values = forms.read_create(spec.model, request.form)
    try:
        spec.set(svc, number, s.parse(spec.model, values))
    except ValidationFailed as exc:
        typed = {k: request.form.get(k, "") for k in spec.model.model_fields}
        return _single_tab(number, spec, exc.errors, typed, 422)
    return redirect(url_for("web.account_tab", number=number, tab=tab, done="saved"), code=303)


# -- money: refills, charges, statement


def _ledger_query(args: Mapping[str, str], kind: str | None) -> tuple[s.LedgerQuery | None, str]:
    given = {k: v for k, v in args.items() if k in ("since", "until", "page") and v.strip()}
    if "page" in given and not (given["page"].isdigit() and len(given["page"]) <= 6):
        given.pop("page")
    if kind:
        given["kind"] = kind
    try:
        return s.parse(s.LedgerQuery, {"per_page": "100", **given}), ""
    except ValidationFailed as exc:
        return None, str(exc)


def _money_tab(number: str, tab: str, kind: str | None, model: type[s._In], errors: list[FieldError],
               values: Mapping[str, Any], status: int = 200) -> Any:  # fmt: skip
    svc = service()
    context = _tab_context(number, tab, svc)
    query, problem = _ledger_query(request.args, kind)
    ledger = svc.ledger(number, query) if query is not None else None
    full_statement = None
    if kind is None and billing.AVAILABLE and query is not None:  # calls included
        full_statement = _billing_call(
            lambda: billing.statement(db(), _user().reseller_id, number, query.since, query.until)
        )
    return _render("money_tab.html", status, ledger=ledger, problem=problem, full_statement=full_statement,
                   controls=forms.controls(model, values, errors),
                   other_errors=forms.unplaced_errors(model, errors),
                   statement=kind is None, **context)  # fmt: skip


def _refills_tab(number: str, tab: str) -> Any:
    return _money_tab(number, tab, "refill", s.RefillIn, [], {})


def _charges_tab(number: str, tab: str) -> Any:
    return _money_tab(number, tab, None, s.ChargeIn, [], {})


@blueprint.route("/customers/<number>/money/<tab>", methods=["POST"])
def money_post(number: str, tab: str) -> Any:
    number = _number(number)
    if tab not in ("refills", "charges"):
        abort(404)
    model: type[s._In] = s.RefillIn if tab == "refills" else s.ChargeIn
    values = forms.read_create(model, request.form)
    svc = service()
    try:
        data = s.parse(model, values)
        svc.refill(number, data) if tab == "refills" else svc.charge(number, data)
    except ValidationFailed as exc:
        svc.get_account(number)
        return _money_tab(number, tab, "refill" if tab == "refills" else None, model, exc.errors, values, 422)
    return redirect(url_for("web.account_tab", number=number, tab=tab, done="saved"), code=303)


def _cdrs_tab(number: str, tab: str) -> Any:
    svc = service()
    context = _tab_context(number, tab, svc)
    if not billing.AVAILABLE:
        return _render("billing_tab.html", **context)
    found, form = billing.cdr_filter(number, request.args)
    page = None
    if found is not None:
        page = _billing_call(lambda: billing.list_cdrs(db(), _user().reseller_id, found,
                                                       _int(request.args.get("page"), 1)))  # fmt: skip
    last_page = max(1, -(-page.total // page.page_size)) if page else 1
    return _render("cdrs_tab.html", 422 if form.problem else 200, cdrs=page, form=form, last_page=last_page,
                   columns=billing.columns(_user().reseller_id), directions=billing.DIRECTIONS,
                   **context)  # fmt: skip


@blueprint.route("/customers/<number>/cdrs.csv")
def cdrs_csv(number: str) -> Any:
    number = _number(number)
    service().get_account(number)  # scope first
    if not billing.AVAILABLE:
        abort(404)
    found, form = billing.cdr_filter(number, request.args)
    if found is None:
        return page_error(422, form.problem)
    conn, reseller_id = _connect(), _user().reseller_id

    def lines() -> Iterator[str]:
        try:
            yield from billing.cdr_csv(conn, reseller_id, found)
        finally:
            conn.close()

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Response(
        stream_with_context(lines()),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="cdrs-{number}-{stamp}.csv"'},
    )


def _emails_tab(number: str, tab: str) -> Any:
    svc = service()
    context = _tab_context(number, tab, svc)
    if not billing.AVAILABLE:
        return _render("billing_tab.html", **context)
    emails = _billing_call(lambda: billing.email_log(db(), _user().reseller_id, number))
    return _render("emails_tab.html", emails=emails, **context)


def _billing_call(call: Any) -> Any:
    """An accounting service call; its "not found" is the admin's (a 404 page)."""
    try:
        return call()
    except billing.not_found_type() as exc:
        raise NotFound(str(exc)) from None


def _audit_tab(number: str, tab: str) -> Any:
    svc = service()
    context = _tab_context(number, tab, svc)
    page = _int(request.args.get("page"), 1)
    query = s.parse(s.AuditQuery, {"account": number, "page": min(page, 10**6), "per_page": 50})
    log_page = svc.audit_log(query)
    return _render("audit_tab.html", log=log_page, **context)


# -- explain


def _explain_tab(number: str, tab: str) -> Any:
    from engine.web.explain import explain_for_account

    svc = service()
    context = _tab_context(number, tab, svc)
    devices = [d.username for d in svc.list_sip_devices(number)]
    networks = [e.cidr for e in svc.list_ip_map(number)]
    form = MultiDict(request.args)
    result, problem = None, ""
    if form.get("dest"):
        result, problem = explain_for_account(
            ext()["config"], db(), number, form, devices, networks, _user().reseller_id
        )
    return _render("explain_tab.html", devices=devices, networks=networks, form=form, result=result,
                   problem=problem, **context)  # fmt: skip
