"""Shared parts of the admin service: the actor, scope, audit and the child-table writes."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from itertools import islice
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb, set_json_loads

from engine.admin.errors import FieldError, Forbidden, NotFound, ValidationFailed
from engine.admin.settings import AdminSettings

T = TypeVar("T")

ACCOUNT_KINDS = ("customer", "provider")

# database constraint -> (field, message), for writes that lose a race to another writer
CONSTRAINT_MESSAGES = {
    "accounts_number_live_key": ("number", "is already used by another account"),
    "accounts_email_live_key": ("email", "is already used by another account"),
    "sip_devices_username_key": ("username", "is already taken by another SIP device"),
    "ip_map_cidr_prefix_key": ("cidr", "this network with this tech prefix is already mapped"),
    "caller_ids_account_number_key": ("number", "is already a caller ID of this account"),
    "blocked_codes_account_prefix_key": ("prefix", "is already blocked for this account"),
}


def _dumps(value: Any) -> str:
    """JSON text for jsonb with exact decimals (json.dumps would need floats or strings)."""
    if isinstance(value, Decimal) and value.is_finite():
        return format(value, "f")
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    if isinstance(value, datetime):
        return json.dumps(value.isoformat())
    return json.dumps(value, default=str)


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- actor and progress


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: written into the audit log, and the scope of what they can see."""

    name: str
    reseller_id: int | None = None  # None = the admin
    reseller_number: str | None = None
    token_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.reseller_id is None

    @classmethod
    def cli(cls) -> Actor:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # pragma: no cover - no passwd entry
            user = "unknown"
        return cls(name=f"cli:{user}")


class Progress(Protocol):
    def begin(self, total: int | None, label: str) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def end(self) -> None: ...


class NoProgress:
    def begin(self, total: int | None, label: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def end(self) -> None:
        pass


# --------------------------------------------------------------------------- internal records


@dataclass
class _RefCache:
    rate_groups: dict[str, tuple[int, int | None, bool] | None] = field(default_factory=dict)
    localizations: dict[str, int | None] = field(default_factory=dict)
    resellers: dict[str, int | None] = field(default_factory=dict)


def _batched(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(iterable)
    while chunk := list(islice(it, size)):
        yield chunk


_DETAIL_SELECT = """
SELECT a.*, r.number AS reseller_number, rg.name AS rate_group_name, nrg.name AS non_cli_rate_group_name,
       loc.name AS localization_name
  FROM accounts a
  LEFT JOIN accounts r ON r.id = a.reseller_id
  LEFT JOIN rate_groups rg ON rg.id = a.rate_group_id
  LEFT JOIN rate_groups nrg ON nrg.id = a.non_cli_rate_group_id
  LEFT JOIN localizations loc ON loc.id = a.localization_id
"""


# Secrets never enter an audit image: a SIP device's password and voicemail password (stored in
# clear for FreeSWITCH), and the hashes of account passwords and PINs (callgate_audit_account).
SECRET_KEYS = frozenset(
    {
        "password",
        "voicemail_password",
        "pin",
        "sip_password",
        "password_hash",
        "pin_hash",
        "token",
        "token_sha256",
    }
)
_CHILD_IMAGE = "to_jsonb({t}.*) - 'updated_at' - 'change_version' - 'password' - 'voicemail_password'"


def without_secrets(value: Any) -> Any:
    """`value` (an audit image: dicts, lists, scalars) with every key of SECRET_KEYS removed, at any depth.

    Images are built without secrets; this is the second line, for rows written before that
    and for any image a future change might build with one."""
    if isinstance(value, Mapping):
        return {k: without_secrets(v) for k, v in value.items() if k not in SECRET_KEYS}
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class _ChildTable:
    """A per-account sub-resource table whose rows are found by one key column within the account."""

    table: str
    key_column: str
    entity: str  # audit entity; the audit actions are `<entity>.create`, `.update` and `.delete`
    label: str  # what a missing row is called in NotFound

    def missing(self, key: str | int) -> str:
        return f"{self.label} {key} not found"

    def row_condition(self) -> sql.Composed:
        return sql.SQL("account_id = %s AND {} = %s").format(sql.Identifier(self.key_column))

    def locked_image_query(self) -> sql.Composed:
        return sql.SQL("SELECT {} FROM {} WHERE {} FOR UPDATE").format(
            sql.SQL(_CHILD_IMAGE.format(t=self.table)), sql.Identifier(self.table), self.row_condition()
        )


_SIP_DEVICES = _ChildTable("sip_devices", "username", "sip_device", "SIP device")
_IP_MAP = _ChildTable("ip_map", "id", "ip_map", "IP map entry")
_CALLER_IDS = _ChildTable("caller_ids", "number", "caller_id", "caller ID")
_SPEED_DIALS = _ChildTable("speed_dials", "key", "speed_dial", "speed dial")
_BLOCKED_CODES = _ChildTable("blocked_codes", "prefix", "blocked_code", "blocked code")


class ServiceBase:
    """One actor over one autocommit connection: scope, lookups, audit and child-table writes."""

    def __init__(self, conn: psycopg.Connection[Any], settings: AdminSettings, actor: Actor) -> None:
        if not conn.autocommit:
            raise ValueError("AdminService needs an autocommit connection (it opens its own transactions)")
        self.conn = conn
        self.settings = settings
        self.actor = actor
        set_json_loads(partial(json.loads, parse_float=Decimal), conn)

    # ================================================================= scope and lookups

    def _scope(self, alias: str = "a") -> sql.Composable:
        if self.actor.is_admin:
            return sql.SQL("TRUE")
        return sql.SQL(
            "{a}.id IN (WITH RECURSIVE subtree(id) AS ("
            " SELECT id FROM accounts WHERE reseller_id = {r}"
            " UNION SELECT c.id FROM accounts c JOIN subtree t ON c.reseller_id = t.id)"
            " SELECT id FROM subtree)"
        ).format(a=sql.Identifier(alias), r=sql.Literal(self.actor.reseller_id))

    def _find(self, number: str, *, lock: bool = False) -> dict[str, Any]:
        """The live customer or provider `number` within the actor's scope (NotFound otherwise)."""
        query = sql.SQL(
            _DETAIL_SELECT + " WHERE a.number = %s AND NOT a.deleted AND a.kind = ANY(%s) AND {}"
        ).format(self._scope())
        if lock:
            query = sql.SQL("{} FOR UPDATE OF a").format(query)
        with self.conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(query, [number, list(ACCOUNT_KINDS)]).fetchone()
        if row is None:
            raise NotFound(f"account {number} not found")
        return row

    def _require_admin(self, what: str) -> None:
        if not self.actor.is_admin:
            raise Forbidden(f"{what} needs an admin token")

    # ================================================================= audit

    def _audit(
        self,
        action: str,
        entity: str,
        key: str,
        account_id: int | None,
        before: Any = None,
        after: Any = None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO audit_log (actor, token_id, action, account_id, entity, entity_key, before, after)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [
                self.actor.name,
                self.actor.token_id,
                action,
                account_id,
                entity,
                key,
                None if before is None else Jsonb(without_secrets(before), dumps=_dumps),
                None if after is None else Jsonb(without_secrets(after), dumps=_dumps),
            ],
        )

    def _account_image(self, account_id: int) -> dict[str, Any]:
        row = self.conn.execute(
            "SELECT callgate_audit_account(a) FROM accounts a WHERE a.id = %s", [account_id]
        ).fetchone()
        assert row is not None
        image: dict[str, Any] = row[0]
        return image

    def _execute_write(self, query: Any, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        try:
            with self.conn.transaction():
                return self.conn.execute(query, params)
        except (pg_errors.UniqueViolation, pg_errors.CheckViolation, pg_errors.ForeignKeyViolation) as exc:
            raise _constraint_error(exc) from None

    def _reseller_id(self, number: str, cache: _RefCache) -> int | None:
        """A live reseller the actor may place accounts under (itself or one below it)."""
        if number not in cache.resellers:
            query = sql.SQL(
                "SELECT a.id FROM accounts a WHERE a.number = %s AND a.kind = 'reseller' AND NOT a.deleted"
                " AND ({} OR a.id = %s)"
            ).format(self._scope())
            row = self.conn.execute(query, [number, self.actor.reseller_id]).fetchone()
            cache.resellers[number] = row[0] if row else None
        return cache.resellers[number]

    def _taken_usernames(self, usernames: list[str]) -> set[str]:
        if not usernames:
            return set()
        rows = self.conn.execute("SELECT username FROM sip_devices WHERE username = ANY(%s)", [usernames])
        return {r[0] for r in rows}

    # ================================================================= sub-resources

    def _child_rows(self, query: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(query, params).fetchall()

    def _account_children(self, number: str, query: str) -> list[dict[str, Any]]:
        """The rows `query` selects for the account `number` (its one parameter is the account's id)."""
        return self._child_rows(query, [self._find(number)["id"]])

    def _child_write(
        self,
        account: Mapping[str, Any],
        action: str,
        entity: str,
        key: str,
        query: Any,
        params: Sequence[Any],
        *,
        before_query: Any = None,
        before_params: Sequence[Any] = (),
        names: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """Run one child-table write (RETURNING the row's image) and audit it; None if nothing matched.

        `before_query` (if any) must return the row's image before the write, or no row when there is
        nothing to change."""
        before = None
        if before_query is not None:
            found = self.conn.execute(before_query, before_params).fetchone()
            if found is None:
                return None
            before = found[0]
        try:
            with self.conn.transaction():
                row = self.conn.execute(query, params).fetchone()
        except (pg_errors.UniqueViolation, pg_errors.CheckViolation) as exc:
            raise _constraint_error(exc, names) from None
        after = row[0] if row else None
        if before is None and after is None:
            return None
        self._audit(action, entity, key, account["id"], before, after)
        return after if after is not None else before  # a removal returns what was removed

    def _insert_child(
        self, account: Mapping[str, Any], child: _ChildTable, key: str, values: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Insert the account's `child` row of `values` (audited as keyed `key`); the row's image."""
        image = self._child_write(
            account,
            f"{child.entity}.create",
            child.entity,
            key,
            sql.SQL("INSERT INTO {} (account_id, {}) VALUES (%s, {}) RETURNING {}").format(
                sql.Identifier(child.table),
                sql.SQL(", ").join(map(sql.Identifier, values)),
                sql.SQL(", ").join(sql.Placeholder() * len(values)),
                sql.SQL(_CHILD_IMAGE.format(t=child.table)),
            ),
            [account["id"], *values.values()],
        )
        assert image is not None
        return image

    def _add_child(
        self, number: str, child: _ChildTable, key: str, values: Mapping[str, Any]
    ) -> dict[str, Any]:
        with self.conn.transaction():
            return self._insert_child(self._find(number, lock=True), child, key, values)

    def _update_child(
        self, number: str, child: _ChildTable, key: str, given: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Set `given` on the account's `child` row keyed `key` (audited); the row's image after."""
        with self.conn.transaction():
            account = self._find(number, lock=True)
            where = [account["id"], key]
            if given:
                image = self._child_write(
                    account,
                    f"{child.entity}.update",
                    child.entity,
                    key,
                    sql.SQL("UPDATE {} SET {} WHERE {} RETURNING {}").format(
                        sql.Identifier(child.table),
                        _set_clause(given),
                        child.row_condition(),
                        sql.SQL(_CHILD_IMAGE.format(t=child.table)),
                    ),
                    [*given.values(), *where],
                    before_query=child.locked_image_query(),
                    before_params=where,
                )
            else:
                found = self.conn.execute(child.locked_image_query(), where).fetchone()
                image = None if found is None else found[0]
            if image is None:
                raise NotFound(child.missing(key))
        return image

    def _delete_child(self, number: str, child: _ChildTable, key: str | int) -> None:
        """Delete the account's `child` row keyed `key` (audited); NotFound if there is none."""
        with self.conn.transaction():
            account = self._find(number, lock=True)
            where = [account["id"], key]
            image = self._child_write(
                account,
                f"{child.entity}.delete",
                child.entity,
                str(key),
                sql.SQL("DELETE FROM {} WHERE {} RETURNING NULL").format(
                    sql.Identifier(child.table), child.row_condition()
                ),
                where,
                before_query=child.locked_image_query(),
                before_params=where,
            )
            if image is None:
                raise NotFound(child.missing(key))


def _row(row: T | None) -> T:
    """The row a statement always returns (an aggregate, a RETURNING on a row held locked)."""
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


def _non_null_changes(data: Any) -> dict[str, Any]:
    """The fields an update request sets; none of them may be set to null."""
    given: dict[str, Any] = data.model_dump(exclude_unset=True)
    nulls = [k for k, v in given.items() if v is None]
    if nulls:
        raise ValidationFailed([FieldError(k, "must not be null") for k in nulls])
    return given


def _set_clause(values: Mapping[str, Any]) -> sql.Composable:
    """`col = %s, ...` for the columns of `values`, in their order."""
    return sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in values)


def _notify_problem(enabled: bool | None, below: Decimal | None) -> str | None:
    if enabled and below is None:
        return "required when notify_enabled is true"
    return None


def _constraint_error(exc: psycopg.Error, names: Mapping[str, str] | None = None) -> ValidationFailed:
    diag = exc.diag
    hint = CONSTRAINT_MESSAGES.get(diag.constraint_name or "")
    if hint is not None:
        field_name = (names or {}).get(hint[0], hint[0])
        return ValidationFailed.one(field_name, hint[1])
    return ValidationFailed.one("", f"rejected by the database: {diag.message_primary}")


# accounts column -> PostgreSQL type, for the bulk insert through unnest()
