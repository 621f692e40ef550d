"""`callgate web`: serve the web admin; `callgate web hash-password`: a [web] users entry."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import signal
import sys
import threading
from typing import Any

from engine.config import WEB_ROLES, Config


def register(commands: Any) -> None:
    web = commands.add_parser("web", help="serve the web admin (browser screens for customer management)")
    web.add_argument("--host", help="override web.listen_host")
    web.add_argument("--port", type=int, help="override web.listen_port")
    sub = web.add_subparsers(dest="web_command")
    hashing = sub.add_parser("hash-password", help="print a [web.users] entry for a staff user")
    hashing.add_argument("name", help="the user name")
    hashing.add_argument("--role", choices=WEB_ROLES, default="admin")


def handle(args: argparse.Namespace, config: Config) -> int:
    if getattr(args, "web_command", None) == "hash-password":
        return _hash_password(args)
    return serve(config, args.host, args.port)


def _hash_password(args: argparse.Namespace) -> int:
    from engine.db.hashing import hash_secret

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("callgate: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 12:
        print("callgate: a staff password needs at least 12 characters", file=sys.stderr)
        return 2
    print(f'{args.name} = "{args.role}:{hash_secret(password)}"')
    return 0


def make_server(config: Config, host: str | None = None, port: int | None = None) -> Any:
    """The threaded WSGI server of the web admin (not started). Threads, not gevent: a page may
    wait on PostgreSQL or on scrypt, and background jobs hash secrets, without holding others."""
    from werkzeug.serving import make_server as werkzeug_server

    from engine.web.app import create_app

    settings = config.web
    app = create_app(config, settings)
    return werkzeug_server(
        host or settings.listen_host, settings.listen_port if port is None else port, app, threaded=True
    )


def serve(config: Config, host: str | None = None, port: int | None = None) -> int:
    from engine.logs import setup_logging

    setup_logging(config.logging)
    server = make_server(config, host, port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log of every page by default
    print(f"callgate web admin listening on http://{server.host}:{server.server_port}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0
