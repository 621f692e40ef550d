"""Versioned SQL migrations.

The files live in the package ``engine.db.migrations`` and are named
``NNNN_name.sql``; the number is the version, applied in ascending order. Each
file runs in its own transaction together with its row in ``schema_migrations``,
under a transaction-level advisory lock, so concurrent migrators serialise and
a crash leaves no half-applied file. A file whose content changed after it was
applied is refused, as is a database that knows a version the code does not.

    python -m engine.db.migrate postgresql://postgres@127.0.0.1/callgate
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from os import PathLike
from pathlib import Path

import psycopg

MIGRATIONS_PACKAGE = "engine.db.migrations"

# pg_advisory_xact_lock key: fixed, so every migrator of every version agrees on it.
ADVISORY_LOCK_KEY = 0x63616C6C67617465  # "callgate"

_FILE_NAME = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migrations cannot be applied safely (changed, unknown or broken file)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # the file name without ".sql", e.g. "0001_accounts"
    sql: str
    checksum: str  # sha256 of the file's bytes, hex


def discover(directory: str | PathLike[str] | Traversable | None = None) -> list[Migration]:
    """The migration files, in version order (the package's unless `directory` is given)."""
    root: Traversable
    if directory is None:
        root = resources.files(MIGRATIONS_PACKAGE)
    elif isinstance(directory, (str, PathLike)):
        root = Path(directory)
    else:
        root = directory
    found: dict[int, Migration] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file name {entry.name!r} is not NNNN_lower_case_name.sql")
        version = int(match["version"])
        if version in found:
            raise MigrationError(
                f"two migration files have version {version}: {found[version].name}.sql and {entry.name}"
            )
        data = entry.read_bytes()
        found[version] = Migration(
            version=version,
            name=entry.name[: -len(".sql")],
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).hexdigest(),
        )
    return [found[v] for v in sorted(found)]


def _verify_applied(applied: dict[int, tuple[str, str]], available: list[Migration]) -> None:
    by_version = {m.version: m for m in available}
    for version, (name, checksum) in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {name} (version {version}) that this code does not know; "
                "refusing to run an older release against a newer schema"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"migration {migration.name} was changed after it was applied "
                f"(recorded checksum {checksum[:12]}…, file now {migration.checksum[:12]}…); "
                "never edit an applied migration, add a new one"
            )


def migrate(conninfo: str, *, directory: str | PathLike[str] | Traversable | None = None) -> list[str]:
    """Apply the pending migrations in order; return the names applied (empty when up to date).

    Safe to run concurrently from several processes: each file is applied in its
    own transaction holding ``pg_advisory_xact_lock(ADVISORY_LOCK_KEY)``, and the
    applied set is re-read under the lock.
    """
    available = discover(directory)
    applied_now: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        while True:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
                conn.execute(_CREATE_TABLE)
                rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
                applied = {version: (name, checksum) for version, name, checksum in rows}
                _verify_applied(applied, available)
                pending = [m for m in available if m.version not in applied]
                if not pending:
                    return applied_now
                migration = pending[0]
                try:
                    # No parameters: psycopg sends the file with the simple query protocol,
                    # so a file may hold many statements (and dollar-quoted bodies).
                    conn.execute(migration.sql.encode("utf-8"))
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
            applied_now.append(migration.name)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m engine.db.migrate CONNINFO", file=sys.stderr)
        return 2
    try:
        names = migrate(args[0])
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(f"applied {name}" for name in names) or "up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
