"""`callgate` command line: db migrate, load, sync, image publish, serve, explain, fsxml, cdr replay."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine.admin import cli as admin_cli  # light: imports neither psycopg nor Flask
from engine.config import Config, ConfigError, load_config

EXIT_USAGE = 2
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callgate", description="Call authorization for FreeSWITCH")
    parser.add_argument("--config", help="TOML file (default: $CALLGATE_CONFIG or config/callgate.toml)")
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db", help="PostgreSQL schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("migrate", help="apply pending migrations (idempotent)")

    load = commands.add_parser("load", help="load a YAML/JSON fixture document into PostgreSQL")
    load.add_argument("file")

    sync = commands.add_parser(
        "sync", help="mirror PostgreSQL into the Redis snapshot, continuously (LISTEN + catch-up)"
    )
    sync_mode = sync.add_mutually_exclusive_group()
    sync_mode.add_argument("--once", action="store_true", help="publish one full snapshot and exit")
    sync_mode.add_argument("--status", action="store_true", help="print the sync lag and versions and exit")
    sync.add_argument("--json", action="store_true", help="with --status: machine-readable output")

    reconcile = commands.add_parser(
        "reconcile",
        help="release counted calls that no FreeSWITCH lists, re-count live ones the registry lacks"
        " (limits.switches, or --switch)",
    )
    reconcile.add_argument(
        "--switch", action="append", default=[], help="host:port of an inbound event socket"
    )
    reconcile.add_argument(
        "--grace", type=float, default=5.0, help="leave calls admitted this recently (seconds) as they are"
    )

    image = commands.add_parser(
        "image", help="catalogue images in Redis: engines on new hosts start from them (docs/sync.md)"
    )
    image_commands = image.add_subparsers(dest="image_command", required=True)
    image_publish = image_commands.add_parser(
        "publish", help="build the current snapshot's catalogue image and publish it in Redis"
    )
    image_publish.add_argument(
        "--force", action="store_true", help="build it again even if this version has one of this code"
    )

    serve = commands.add_parser("serve", help="run the engine (FreeSWITCH outbound event socket)")
    serve.add_argument("--host", help="override engine.listen_host")
    serve.add_argument("--port", type=int, help="override engine.listen_port")

    explain = commands.add_parser("explain", help="show the decision for a call without placing it")
    who = explain.add_mutually_exclusive_group(required=True)
    who.add_argument("--sip-user", help="SIP username the caller authenticated as")
    who.add_argument("--ip", help="source IP of the caller (IP map)")
    explain.add_argument("--dest", required=True, help="dialled number")
    explain.add_argument("--cid", default="", help="caller ID number")
    explain.add_argument("--cid-name", default="", help="caller ID name")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    fsxml = commands.add_parser(
        "fsxml", help="serve FreeSWITCH's directory and sofia gateways over HTTP (mod_xml_curl)"
    )
    fsxml.add_argument("--host", help="override fsxml.listen_host")
    fsxml.add_argument("--port", type=int, help="override fsxml.listen_port")
    cdr = commands.add_parser("cdr", help="FreeSWITCH's CDRs (mod_json_cdr)")
    cdr_commands = cdr.add_subparsers(dest="cdr_command", required=True)
    replay = cdr_commands.add_parser(
        "replay",
        help="post the CDRs saved in FreeSWITCH's err-log-dir to callgate fsxml's /cdr; done files move"
        " to <dir>/replayed",
    )
    replay.add_argument("directory", help="mod_json_cdr's err-log-dir (its <uuid>.cdr.json files)")
    replay.add_argument(
        "--url", help="the /cdr endpoint (default: http://<fsxml.listen_host>:<fsxml.listen_port>/cdr)"
    )
    replay.add_argument("--done-dir", help="where done files go (default: <directory>/replayed)")
    replay.add_argument("--timeout", type=float, default=10.0, help="seconds per post")
    admin_cli.register(commands)
    from engine.web.server import register as register_web  # light: imports no Flask

    register_web(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"callgate: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    handler = {
        "db": _db,
        "load": _load,
        "sync": _sync,
        "reconcile": _reconcile,
        "image": _image,
        "serve": _serve,
        "explain": _explain,
        "fsxml": _fsxml,
        "cdr": _cdr,
        "admin": admin_cli.handle,
        "api": admin_cli.handle,
        "web": _web,
    }[args.command]
    try:
        return handler(args, config)
    except KeyboardInterrupt:
        return 130


def _db(args: argparse.Namespace, config: Config) -> int:
    from engine.db.migrate import MigrationError, migrate

    try:
        applied = migrate(config.database.url)
    except MigrationError as exc:
        print(f"callgate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print("applied: " + ", ".join(applied) if applied else "schema up to date")
    return 0


def _load(args: argparse.Namespace, config: Config) -> int:
    import psycopg

    from engine.db.fixtures import FixtureError, load_file

    try:
        with psycopg.connect(config.database.url) as conn:
            report = load_file(conn, args.file)
    except (FixtureError, OSError) as exc:
        print(f"callgate: {args.file}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(report)
    return 0


def _sync(args: argparse.Namespace, config: Config) -> int:
    if args.status:
        from engine.sync.status import print_status

        return print_status(config, as_json=args.json)
    if args.once:
        from engine.sync import publish_once

        version, counts = publish_once(config)
        summary = ", ".join(f"{name}={count}" for name, count in counts.items())
        print(f"snapshot {version} published ({summary})")
        return 0
    import signal
    import threading

    from engine.logs import setup_logging
    from engine.sync.worker import SyncWorker

    setup_logging(config.logging)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    image_job, fingerprint = None, None
    if config.sync.publish_images:
        from engine.imagejob import image_fingerprint, produce_in_child

        image_job, fingerprint = produce_in_child, image_fingerprint()
    SyncWorker(config, image_job=image_job, image_fingerprint=fingerprint).run(stop)
    return 0


def _image(args: argparse.Namespace, config: Config) -> int:
    from engine.imagejob import publish_image
    from engine.logs import setup_logging

    setup_logging(config.logging)
    result = publish_image(config, force=args.force)
    if result is None:
        print("callgate: no snapshot to build an image of (or it moved on meanwhile)", file=sys.stderr)
        return EXIT_FAILURE
    done = "published" if result.published else "already published (--force builds it again)"
    print(
        f"catalogue image of version {result.stamp.version} (changes {result.stamp.changes}) {done}: "
        f"{result.size / 1e6:.1f} MB in {result.chunks} chunks; build {result.build_seconds:.1f}s, "
        f"upload {result.upload_seconds:.1f}s"
    )
    return 0


def _reconcile(args: argparse.Namespace, config: Config) -> int:
    import dataclasses

    from engine.billing.funds import Funds
    from engine.billing.ticket import ticket_keys
    from engine.limits_runtime import switch_addresses
    from engine.reconcile import reconcile
    from engine.recount import Recounter
    from engine.state.limits import Limiter
    from engine.state.redisconn import redis_client

    settings = config.limits
    if args.switch:
        settings = dataclasses.replace(settings, switches=tuple(args.switch))
    try:
        switches = switch_addresses(settings)
    except ConfigError as exc:
        print(f"callgate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not switches:
        print("callgate: no switches to list (set limits.switches or pass --switch)", file=sys.stderr)
        return EXIT_USAGE
    client = redis_client(config.redis, socket_timeout=10)
    funds = Funds(client, config.redis.key_prefix, margin_seconds=config.limits.margin_seconds)
    limiter = Limiter(client, config.redis.key_prefix, margin_seconds=config.limits.margin_seconds)
    try:
        # The reservations of the calls released go back too, as in the engine's own reconciler:
        # without it a run from the command line freed the slots and left the funds locked.
        report = reconcile(
            limiter,
            switches,
            grace_seconds=args.grace,
            release_funds=funds.release_calls,
            reserved_calls=funds.reserved_calls,
            # and the live calls whose acquire was lost (a Redis failover) are counted again
            recounter=Recounter(limiter, funds, ticket_keys=ticket_keys(config.billing.ticket_keys)),
        )
    finally:
        client.close()
    if not report.ran:
        print("reconciliation skipped, nothing released: " + "; ".join(report.errors), file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"{report.counted} counted calls, {report.live_channels} live channels on "
        f"{report.switches} switch(es); released {len(report.released)}, kept {report.kept} recent; "
        f"{len(report.funds_only)} reservations of calls neither live nor counted given back; "
        f"recounted {len(report.recounted)} live calls the registry lacked"
        f" ({report.unrecountable} uncounted live calls without a usable ticket)"
    )
    for error in report.errors:  # the slots were released; a funds failure is only reported
        print(f"callgate: {error}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace, config: Config) -> int:
    from gevent import monkey

    monkey.patch_all()
    from engine.runtime import serve

    return serve(config, host=args.host, port=args.port)


def _fsxml(args: argparse.Namespace, config: Config) -> int:
    from gevent import monkey

    monkey.patch_all()
    from engine.fsxml.server import serve

    try:
        return serve(config, host=args.host, port=args.port)
    except ValueError as exc:  # an unreadable fsxml.sofia_template
        print(f"callgate: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _cdr(args: argparse.Namespace, config: Config) -> int:
    """``cdr replay``: one line per file, a summary, exit 1 when any file was not done (kept)."""
    from pathlib import Path
    from urllib.parse import urlsplit

    from engine.fsxml.replay import http_poster, replay_directory

    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"callgate: {args.directory!r} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    settings = config.fsxml
    host = settings.listen_host if settings.listen_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = args.url or f"http://{host}:{settings.listen_port}/cdr"
    post = http_poster(url, settings.username, settings.password, args.timeout)
    results = replay_directory(directory, post, Path(args.done_dir) if args.done_dir else None)
    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
        kept = "" if result.done else " (kept)"
        print(f"{result.path.name}: {result.outcome}{kept}: {result.detail}")
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "nothing to replay"
    shown = urlsplit(url)._replace(netloc=urlsplit(url).netloc.rpartition("@")[2]).geturl()  # no userinfo
    print(f"{len(results)} file(s) posted to {shown}: {summary}")
    return EXIT_FAILURE if any(not r.done for r in results) else 0


def _web(args: argparse.Namespace, config: Config) -> int:
    from engine.web.server import handle

    return handle(args, config)


def _explain(args: argparse.Namespace, config: Config) -> int:
    from engine.explain import explain_call

    return explain_call(config, args)


if __name__ == "__main__":
    sys.exit(main())
