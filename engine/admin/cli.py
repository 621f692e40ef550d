"""``callgate admin ...`` (customer management) and ``callgate api`` (the HTTP API server).

Wiring into ``engine/cli.py``::

    from engine.admin import cli as admin_cli
    admin_cli.register(commands)          # in build_parser(), `commands` = the sub-parsers
    ... {"admin": admin_cli.handle, "api": admin_cli.handle}[args.command]

Nothing heavy is imported here at import time (``callgate serve`` must be able to
monkey-patch before psycopg is imported): ``register`` adds two thin parsers and
the ``admin`` sub-commands are parsed by :func:`build_admin_parser` when run.
Options of the create/update/search commands are generated from the pydantic
models, so the CLI and the API accept exactly the same fields.

Exit codes: 0 done; 1 refused (validation, not found, some import rows failed);
2 usage.

(Why one module of about 600 lines: it is the command table and one small handler per
command, each a call into the service layer; the business rules are all in
``engine.admin.service``.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from engine.admin import billing_cli

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    """Add the ``admin`` and ``api`` sub-commands to the ``callgate`` parser's sub-parsers."""
    admin = subparsers.add_parser(
        "admin", add_help=False, help="customer management (see `callgate admin --help`)",
        description="Customer management: customers, providers, tokens, refills, audit.",
    )  # fmt: skip
    admin.add_argument("-h", "--help", action="store_true", dest="admin_help", help="show the admin commands")
    admin.add_argument("admin_argv", nargs=argparse.REMAINDER, help="an admin command and its options")
    api = subparsers.add_parser("api", help="serve the admin JSON HTTP API (gevent WSGI)")
    api.add_argument("--host", help="override admin.listen_host")
    api.add_argument("--port", type=int, help="override admin.listen_port")


def handle(args: argparse.Namespace, config: Any) -> int:
    if args.command == "api":
        from gevent import monkey

        monkey.patch_all()
        from engine.admin.api import serve

        return serve(config, host=args.host, port=args.port)
    parser = build_admin_parser()
    argv = list(args.admin_argv)
    if args.admin_help or not argv:
        parser.print_help(sys.stdout if args.admin_help else sys.stderr)
        return EXIT_OK if args.admin_help else EXIT_USAGE
    try:
        sub = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return run(sub, config)


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """``callgate`` with only the admin and api commands (tests; until engine/cli.py is wired)."""
    from engine.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="callgate")
    parser.add_argument("--config")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, environ)
    except ConfigError as exc:
        print(f"callgate: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return handle(args, config)


# --------------------------------------------------------------------------- the admin parser


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (getattr(annotation, "__args__", None) or ()) == (bool, type(None))


def _model_options(parser: argparse.ArgumentParser, model: Any, skip: Sequence[str] = ()) -> None:
    """One --option per field of `model` (values validated by the model, not by argparse)."""
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        kwargs: dict[str, Any] = {"dest": f"f_{name}", "default": argparse.SUPPRESS}
        text = info.description or ""
        if info.default is not None and not callable(info.default_factory) and str(info.default) != "":
            text = f"{text} (default {info.default})".strip()
        if name in SECRET_OPTIONS:
            text = f"{text} ('-': read it from stdin, or a prompt; never on the command line)".strip()
        kwargs["help"] = text or None
        if _is_bool(info.annotation):
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs["metavar"] = name.upper()
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


# Options whose value "-" means: read it from stdin (or a prompt on a terminal), so that the
# secret never shows in `ps` or the shell history.
SECRET_OPTIONS = ("password", "pin", "sip_password", "voicemail_password")


def _values(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    values = {name: getattr(args, f"f_{name}") for name in model.model_fields if hasattr(args, f"f_{name}")}
    for name in getattr(args, "clear", None) or ():
        values[name.replace("-", "_")] = None
    for name in SECRET_OPTIONS:
        if values.get(name) == "-":
            values[name] = _read_secret(name)
    return values


def _read_secret(name: str) -> str:
    """One secret from a prompt (a terminal) or one line of stdin (a pipe), in SECRET_OPTIONS order."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"{name.replace('_', ' ')}: ")
    return sys.stdin.readline().rstrip("\r\n")


def _json_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _progress_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        default=None,
        help="always show a progress bar (default: when stderr is a terminal)",
    )
    group.add_argument("--no-progress", dest="progress", action="store_const", const=False)


def build_admin_parser() -> argparse.ArgumentParser:
    from engine.admin import schemas as s

    root = argparse.ArgumentParser(prog="callgate admin", description="callgate customer management")
    groups = root.add_subparsers(dest="group", required=True, metavar="GROUP")

    def group(name: str, help_text: str) -> Any:
        return groups.add_parser(name, help=help_text).add_subparsers(
            dest="action", required=True, metavar="ACTION"
        )

    def number(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("number", help="account number")
        return parser

    # tokens
    tokens = group("token", "API tokens (shown once, stored hashed)")
    p = _json_flag(tokens.add_parser("create", help="create an API token"))
    p.add_argument("--name", required=True)
    p.add_argument("--reseller", help="a reseller token (sees only that reseller's subtree); default admin")
    p.add_argument("--read-only", action="store_true", help="reads only: every write is refused (403)")
    p.add_argument("--expires-days", type=int)
    _json_flag(tokens.add_parser("list", help="list API tokens"))
    p = tokens.add_parser("revoke", help="revoke an API token")
    p.add_argument("token_id", type=int)

    # customers
    customers = group("customer", "customers and providers (ASTPP's customer module)")
    p = _json_flag(customers.add_parser("list", help="the customer grid: search, paging, sorting"))
    _model_options(p, s.CustomerQuery)
    p = _json_flag(number(customers.add_parser("show", help="one account")))
    p = _json_flag(customers.add_parser("create", help="create a customer (ASTPP's form)"))
    _model_options(p, s.CustomerCreate)
    p = _json_flag(number(customers.add_parser("update", help="edit profile and settings")))
    _model_options(p, s.CustomerUpdate)
    p.add_argument("--clear", action="append", metavar="FIELD", help="set an optional field to none")
    p = _json_flag(
        customers.add_parser("delete", help="delete (soft) one or more accounts, in one transaction")
    )
    p.add_argument("numbers", nargs="+", metavar="NUMBER")
    p = customers.add_parser("mass-create", help="create COUNT accounts, all or nothing")
    _model_options(p, s.MassCreate)
    p.add_argument("--output", help="CSV of the numbers and their PINs (default stdout)")
    _progress_flags(p)
    p = customers.add_parser("import", help="import customers from CSV, with a per-row report")
    p.add_argument("file", help="CSV file (UTF-8), first line the header")
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="HEADER=FIELD",
        help="map a CSV column to a field (empty FIELD ignores the column)",
    )
    p.add_argument(
        "--default",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="value of a field for rows that give none",
    )
    p.add_argument("--dry-run", action="store_true", help="check every row, write nothing")
    p.add_argument(
        "--balance-convention",
        choices=("held", "astpp"),
        help="how the file writes postpaid balances (held: negative = debt; astpp: amount owed)",
    )
    p.add_argument("--report", help="write the per-row report here (default stdout)")
    _progress_flags(p)
    p = customers.add_parser("export", help="CSV of the search (the grid's columns)")
    _model_options(p, s.ExportQuery)
    p.add_argument("--output", help="file (default stdout)")

    provider = group("provider", "providers (carriers)")
    p = _json_flag(provider.add_parser("create", help="create a provider (same form, admin only)"))
    _model_options(p, s.CustomerCreate, skip=("reseller",))
    _json_flag(number(provider.add_parser("trunks", help="a provider's trunks")))

    audit = group("audit", "the audit log of every change")
    p = _json_flag(audit.add_parser("list", help="audit entries, newest first"))
    _model_options(p, s.AuditQuery)

    def list_add_update_delete(
        name: str, help_text: str, key: str, create: Any, update: Any, key_type: Callable[[str], Any] = str
    ) -> None:
        actions = group(name, help_text)
        _json_flag(number(actions.add_parser("list")))
        _model_options(_json_flag(number(actions.add_parser("add"))), create)
        p = _json_flag(number(actions.add_parser("update")))
        p.add_argument(key, type=key_type)
        _model_options(p, update)
        number(actions.add_parser("delete")).add_argument(key, type=key_type)

    # sub-resources
    list_add_update_delete(
        "sip-device", "SIP devices of an account", "username", s.SipDeviceCreate, s.SipDeviceUpdate
    )
    list_add_update_delete(
        "ip-map", "IP authentication (IP map) of an account", "entry_id", s.IpMapCreate, s.IpMapUpdate, int
    )
    list_add_update_delete(
        "caller-id",
        "caller IDs of an account (the CLI pool's list)",
        "caller_id",
        s.CallerIdCreate,
        s.CallerIdUpdate,
    )

    forced = group("forced-caller-id", "the caller ID forced on an account's calls")
    _json_flag(number(forced.add_parser("show")))
    p = _json_flag(number(forced.add_parser("set")))
    _model_options(p, s.ForcedCallerIdIn)
    number(forced.add_parser("clear"))

    dids = group("did", "DIDs of an account")
    _json_flag(number(dids.add_parser("list")))
    p = _json_flag(number(dids.add_parser("assign", help="assign a free DID (admin)")))
    _model_options(p, s.DidAssign)
    p = _json_flag(number(dids.add_parser("update")))
    p.add_argument("did")
    _model_options(p, s.DidUpdate)
    p = number(dids.add_parser("release"))
    p.add_argument("did")

    speed = group("speed-dial", "speed dials of an account")
    _json_flag(number(speed.add_parser("list")))
    p = _json_flag(number(speed.add_parser("set")))
    p.add_argument("key")
    _model_options(p, s.SpeedDialIn)
    p = number(speed.add_parser("delete"))
    p.add_argument("key")

    blocked = group("blocked-code", "blocked destination prefixes of an account")
    _json_flag(number(blocked.add_parser("list")))
    p = _json_flag(number(blocked.add_parser("add")))
    _model_options(p, s.BlockedCodeCreate)
    p = number(blocked.add_parser("delete"))
    p.add_argument("prefix")

    alert = group("alert", "low-balance alert threshold of an account")
    _json_flag(number(alert.add_parser("show")))
    p = _json_flag(number(alert.add_parser("set")))
    _model_options(p, s.AlertThreshold)
    p.add_argument("--clear", action="append", metavar="FIELD", help="set notify_balance_below/email to none")

    refill = group("refill", "refills (top-ups) and the refill report")
    p = _json_flag(number(refill.add_parser("add", help="top up an account")))
    _model_options(p, s.RefillIn)
    p = _json_flag(number(refill.add_parser("list", help="an account's refills")))
    _model_options(p, s.LedgerQuery, skip=("kind",))
    p = _json_flag(refill.add_parser("report", help="refills across accounts"))
    _model_options(p, s.RefillQuery)

    charge = group("charge", "charges and the charge history of balance changes")
    p = _json_flag(number(charge.add_parser("add", help="post a charge (debit)")))
    _model_options(p, s.ChargeIn)
    p = _json_flag(number(charge.add_parser("history", help="every balance change of an account")))
    _model_options(p, s.LedgerQuery)

    billing_cli.add_parsers(group, number, _json_flag, _model_options)  # cdr, statement, email
    return root


# --------------------------------------------------------------------------- running a command


class _Bar:
    """engine.admin.service.Progress on tqdm (stderr)."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = enabled  # None = when stderr is a terminal
        self.bar: Any = None

    def begin(self, total: int | None, label: str) -> None:
        from tqdm import tqdm

        self.end()
        disable = None if self.enabled is None else not self.enabled
        self.bar = tqdm(total=total, desc=label, unit="rows", file=sys.stderr, disable=disable,
                        dynamic_ncols=True, mininterval=0.2)  # fmt: skip

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _dump(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _show(value: Any, as_json: bool, columns: Sequence[str] | None = None) -> None:
    data = _dump(value)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    if isinstance(data, dict) and "items" in data and isinstance(data["items"], list):
        _table(data["items"], columns)
        extra = {k: v for k, v in data.items() if k != "items"}
        print("  ".join(f"{k}: {v}" for k, v in extra.items() if not isinstance(v, list)))
        for total in extra.get("totals", []):
            print(f"total {total['currency']}: {total['amount']} ({total['count']} entries)")
        return
    if isinstance(data, list):
        _table(data, columns)
        return
    _pairs(data)


def _pairs(data: dict[str, Any], indent: str = "") -> None:
    width = max((len(k) for k in data), default=0)
    for key, value in data.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _pairs(value, indent + "  ")
        else:
            print(f"{indent}{key:<{width}}  {'' if value is None else value}")


def _table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    if not rows:
        print("(none)")
        return
    cols = list(columns or rows[0].keys())
    text = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip())


GRID_COLUMNS = (
    "entity_type", "account_type", "number", "first_name", "last_name", "company", "rate_group",
    "balance", "credit_limit", "first_used", "expiry", "concurrent_calls", "localization", "reseller",
    "created", "status",
)  # fmt: skip


def run(args: argparse.Namespace, config: Any) -> int:
    """Run one parsed admin command against the configured database, as the CLI actor (admin)."""
    import psycopg

    from engine.admin.errors import AdminError, ValidationFailed
    from engine.admin.service import Actor, AdminService
    from engine.admin.settings import admin_settings
    from engine.config import ConfigError

    try:
        settings = admin_settings(config)
    except ConfigError as exc:
        print(f"callgate: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        conn = psycopg.connect(config.database.url, autocommit=True,
                               connect_timeout=int(config.database.connect_timeout))  # fmt: skip
    except psycopg.OperationalError as exc:
        print(f"callgate: cannot reach the database: {exc}".strip(), file=sys.stderr)
        return EXIT_FAILED
    try:
        svc = AdminService(conn, settings, Actor.cli())
        command = _COMMANDS[(args.group, args.action)]
        return command(svc, args)
    except ValidationFailed as exc:
        for error in exc.errors:
            print(f"callgate: {error}", file=sys.stderr)
        return EXIT_FAILED
    except AdminError as exc:
        print(f"callgate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"callgate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        conn.close()


def _parse(model_name: str, args: argparse.Namespace) -> Any:
    from engine.admin import schemas as s

    model = getattr(s, model_name)
    return s.parse(model, _values(args, model))


Command = Callable[[Any, argparse.Namespace], int]
_COMMANDS: dict[tuple[str, str], Command] = {}
_COMMANDS.update(billing_cli.commands(lambda a, m: _values(a, m), lambda r, c: _table(r, c)))


def _command(group: str, action: str) -> Callable[[Command], Command]:
    def decorator(fn: Command) -> Command:
        _COMMANDS[(group, action)] = fn
        return fn

    return decorator


def _printing(group: str, action: str, call: Callable[[Any, argparse.Namespace], Any],
              columns: Sequence[str] | None = None) -> None:  # fmt: skip
    def fn(svc: Any, args: argparse.Namespace) -> int:
        result = call(svc, args)
        if result is not None:
            _show(result, getattr(args, "json", False), columns)
        return EXIT_OK

    _COMMANDS[(group, action)] = fn


# -- tokens


@_command("token", "create")
def _token_create(svc: Any, args: argparse.Namespace) -> int:
    row, token = svc.create_token(args.name, args.reseller, args.expires_days, args.read_only)
    if args.json:
        print(json.dumps({**_dump(row), "token": token}, indent=2, default=str))
    else:
        print(f"token {row['id']} ({row['scope']}) created; it is shown only now:", file=sys.stderr)
        print(token)
    return EXIT_OK


_printing("token", "list", lambda svc, a: svc.list_tokens(),
          ("id", "name", "token_hint", "scope", "read_only", "reseller", "created_at", "expires_at",
           "last_used_at", "revoked_at"))  # fmt: skip


@_command("token", "revoke")
def _token_revoke(svc: Any, args: argparse.Namespace) -> int:
    svc.revoke_token(args.token_id)
    print(f"token {args.token_id} revoked", file=sys.stderr)
    return EXIT_OK


# -- customers

_printing("customer", "list", lambda svc, a: svc.list_customers(_parse("CustomerQuery", a)), GRID_COLUMNS)
_printing("customer", "show", lambda svc, a: svc.get_account(a.number))
_printing("customer", "create", lambda svc, a: svc.create_account(_parse("CustomerCreate", a), "customer"))
_printing("provider", "create", lambda svc, a: svc.create_account(_parse("CustomerCreate", a), "provider"))
_printing("provider", "trunks", lambda svc, a: svc.list_trunks(a.number))
_printing("customer", "update", lambda svc, a: svc.update_account(a.number, _parse("CustomerUpdate", a)))
_printing("customer", "delete", lambda svc, a: svc.delete_accounts(a.numbers))
_printing("audit", "list", lambda svc, a: svc.audit_log(_parse("AuditQuery", a)),
          ("id", "at", "actor", "action", "account", "entity", "entity_key"))  # fmt: skip


@_command("customer", "mass-create")
def _mass_create(svc: Any, args: argparse.Namespace) -> int:
    import csv

    data = _parse("MassCreate", args)
    bar = _Bar(args.progress if data.count >= 1000 or args.progress else False)
    try:
        result = svc.mass_create(data, bar)
    finally:
        bar.end()
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["number", "pin", "sip_password"])
        for account in result.accounts:
            writer.writerow([account.number, account.pin or "", account.sip_password or ""])
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"created {result.count} accounts", file=sys.stderr)
    return EXIT_OK


@_command("customer", "import")
def _import(svc: Any, args: argparse.Namespace) -> int:
    from engine.admin import csvio
    from engine.admin import schemas as s

    mapping = {k: (v or None) for k, v in csvio.mapping_pairs(args.map, "map").items()}
    options = s.parse(s.ImportOptions, {
        "mapping": mapping, "defaults": dict(csvio.mapping_pairs(args.default, "default")),
        "dry_run": args.dry_run, "balance_convention": args.balance_convention,
    })  # fmt: skip
    bar = _Bar(args.progress)
    with open(args.file, encoding="utf-8-sig", newline="") as source:
        results = svc.import_csv(source, options, bar)  # checks the header now
        bar.begin(csvio.count_records(args.file), "importing" if not options.dry_run else "checking")
        out = open(args.report, "w", newline="", encoding="utf-8") if args.report else sys.stdout  # noqa: SIM115
        try:
            summary = csvio.write_report(results, out, options.dry_run)
        finally:
            bar.end()
            if out is not sys.stdout:
                out.close()
    verb = "would import" if options.dry_run else "imported"
    print(f"{summary.rows} rows: {verb} {summary.imported}, failed {summary.failed}", file=sys.stderr)
    return EXIT_OK if summary.failed == 0 else EXIT_FAILED


@_command("customer", "export")
def _export(svc: Any, args: argparse.Namespace) -> int:
    from engine.admin import csvio

    query = _parse("ExportQuery", args)
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for piece in csvio.export_lines(svc.iter_customers(query), query.balance_convention):
            out.write(piece)
    finally:
        if out is not sys.stdout:
            out.close()
    return EXIT_OK


# -- sub-resources

_printing("sip-device", "list", lambda svc, a: svc.list_sip_devices(a.number))
_printing("sip-device", "add", lambda svc, a: svc.add_sip_device(a.number, _parse("SipDeviceCreate", a)))
_printing(
    "sip-device",
    "update",
    lambda svc, a: svc.update_sip_device(a.number, a.username, _parse("SipDeviceUpdate", a)),
)
_printing("sip-device", "delete", lambda svc, a: svc.delete_sip_device(a.number, a.username))
_printing("ip-map", "list", lambda svc, a: svc.list_ip_map(a.number))
_printing("ip-map", "add", lambda svc, a: svc.add_ip_map(a.number, _parse("IpMapCreate", a)))
_printing(
    "ip-map", "update", lambda svc, a: svc.update_ip_map(a.number, a.entry_id, _parse("IpMapUpdate", a))
)
_printing("ip-map", "delete", lambda svc, a: svc.delete_ip_map(a.number, a.entry_id))
_printing("caller-id", "list", lambda svc, a: svc.list_caller_ids(a.number))
_printing("caller-id", "add", lambda svc, a: svc.add_caller_id(a.number, _parse("CallerIdCreate", a)))
_printing(
    "caller-id",
    "update",
    lambda svc, a: svc.update_caller_id(a.number, a.caller_id, _parse("CallerIdUpdate", a)),
)
_printing("caller-id", "delete", lambda svc, a: svc.delete_caller_id(a.number, a.caller_id))
_printing("forced-caller-id", "show", lambda svc, a: svc.get_forced_caller_id(a.number))
_printing(
    "forced-caller-id",
    "set",
    lambda svc, a: svc.set_forced_caller_id(a.number, _parse("ForcedCallerIdIn", a)),
)
_printing("forced-caller-id", "clear", lambda svc, a: svc.clear_forced_caller_id(a.number))
_printing("did", "list", lambda svc, a: svc.list_dids(a.number))
_printing("did", "assign", lambda svc, a: svc.assign_did(a.number, _parse("DidAssign", a)))
_printing("did", "update", lambda svc, a: svc.update_did(a.number, a.did, _parse("DidUpdate", a)))
_printing("did", "release", lambda svc, a: svc.release_did(a.number, a.did))
_printing("speed-dial", "list", lambda svc, a: svc.list_speed_dials(a.number))
_printing("speed-dial", "set", lambda svc, a: svc.set_speed_dial(a.number, a.key, _parse("SpeedDialIn", a)))
_printing("speed-dial", "delete", lambda svc, a: svc.delete_speed_dial(a.number, a.key))
_printing("blocked-code", "list", lambda svc, a: svc.list_blocked_codes(a.number))
_printing(
    "blocked-code", "add", lambda svc, a: svc.add_blocked_code(a.number, _parse("BlockedCodeCreate", a))
)
_printing("blocked-code", "delete", lambda svc, a: svc.delete_blocked_code(a.number, a.prefix))
_printing("alert", "show", lambda svc, a: svc.get_alert_threshold(a.number))
_printing("alert", "set", lambda svc, a: svc.set_alert_threshold(a.number, _parse("AlertThreshold", a)))
_printing("refill", "add", lambda svc, a: svc.refill(a.number, _parse("RefillIn", a)))
_printing(
    "refill",
    "list",
    lambda svc, a: svc.ledger(a.number, _parse("LedgerQuery", a).model_copy(update={"kind": "refill"})),
    ("id", "at", "account", "amount", "balance_after", "currency", "method", "reference", "actor"),
)
_printing(
    "refill",
    "report",
    lambda svc, a: svc.refill_report(_parse("RefillQuery", a)),
    ("id", "at", "account", "amount", "balance_after", "currency", "method", "reference", "actor"),
)
_printing("charge", "add", lambda svc, a: svc.charge(a.number, _parse("ChargeIn", a)))
_printing(
    "charge",
    "history",
    lambda svc, a: svc.ledger(a.number, _parse("LedgerQuery", a)),
    ("id", "at", "kind", "amount", "balance_after", "currency", "description", "reference", "actor"),
)
