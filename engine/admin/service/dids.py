"""DIDs: the admin's inventory given to accounts, and where their calls go."""

from __future__ import annotations

from psycopg import sql

from engine.admin import schemas as s
from engine.admin.errors import Conflict, FieldError, NotFound, ValidationFailed
from engine.admin.service.base import (
    _CHILD_IMAGE,
    _non_null_changes,
    _row,
    _set_clause,
)
from engine.admin.service.claims import ClaimsMixin
from engine.rules.text import is_sip_uri, show


class DidsMixin(ClaimsMixin):
    """DIDs."""

    def list_dids(self, number: str) -> list[s.DidOut]:
        rows = self._account_children(number, "SELECT * FROM dids WHERE account_id = %s ORDER BY number")
        return [s.DidOut(**r) for r in rows]

    def _did_destination_problem(self, account_id: int, dtype: str, destination: str) -> FieldError | None:
        if dtype == "number" and not destination.isdigit() and destination != "":
            return FieldError("destination", "a 'number' destination must be digits")
        if dtype == "device" and destination:
            row = self.conn.execute(
                "SELECT 1 FROM sip_devices WHERE account_id = %s AND username = %s", [account_id, destination]
            ).fetchone()
            if row is None:
                return FieldError("destination", f"{destination!r} is not a SIP device of this account")
        if dtype == "uri" and not destination:
            return FieldError("destination", "a 'uri' destination must not be empty")
        if dtype == "uri" and not is_sip_uri(destination):  # the call path's own rule
            return FieldError(
                "destination",
                f"{show(destination)} is not a SIP URI a call can be bridged to (user@host[:port][;params])",
            )
        return None

    def assign_did(self, number: str, data: s.DidAssign) -> s.DidOut:
        """Give the account a free DID (admin only: DIDs are the admin's inventory)."""
        self._require_admin("assigning a DID")
        with self.conn.transaction():
            account = self._find(number, lock=True)
            did = self.conn.execute(
                "SELECT id, account_id FROM dids WHERE number = %s FOR UPDATE", [data.number]
            ).fetchone()
            if did is None:
                raise ValidationFailed.one("number", f"no DID {data.number}")
            if did[1] is not None:
                raise Conflict([FieldError("number", f"DID {data.number} is already assigned")])
            self._check_number_claim(account, data.number, "number")
            problem = self._did_destination_problem(account["id"], data.destination_type, data.destination)
            if problem:
                raise ValidationFailed([problem])
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="dids"))
            image = self._child_write(
                account,
                "did.assign",
                "did",
                data.number,
                sql.SQL(
                    "UPDATE dids SET account_id = %s, destination_type = %s, destination = %s WHERE id = %s"
                    " RETURNING {}"
                ).format(image_sql),
                [account["id"], data.destination_type, data.destination, did[0]],
                before_query=sql.SQL("SELECT {} FROM dids WHERE id = %s").format(image_sql),
                before_params=[did[0]],
            )
        return s.DidOut(**_row(image))

    def update_did(self, number: str, did_number: str, data: s.DidUpdate) -> s.DidOut:
        given = _non_null_changes(data)
        with self.conn.transaction():
            account = self._find(number, lock=True)
            current = self._child_rows(
                "SELECT * FROM dids WHERE account_id = %s AND number = %s FOR UPDATE",
                [account["id"], did_number],
            )
            if not current:
                raise NotFound(f"DID {did_number} not found")
            if not given:
                return s.DidOut(**current[0])
            merged = {**current[0], **given}
            problem = self._did_destination_problem(
                account["id"], merged["destination_type"], merged["destination"]
            )
            if problem:
                raise ValidationFailed([problem])
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="dids"))
            image = self._child_write(
                account,
                "did.update",
                "did",
                did_number,
                sql.SQL("UPDATE dids SET {} WHERE id = %s RETURNING {}").format(
                    _set_clause(given), image_sql
                ),
                [*given.values(), current[0]["id"]],
                before_query=sql.SQL("SELECT {} FROM dids WHERE id = %s").format(image_sql),
                before_params=[current[0]["id"]],
            )
        return s.DidOut(**_row(image))

    def release_did(self, number: str, did_number: str) -> None:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="dids"))
            image = self._child_write(
                account,
                "did.release",
                "did",
                did_number,
                sql.SQL(
                    "UPDATE dids SET account_id = NULL, destination_type = 'device', destination = ''"
                    " WHERE account_id = %s AND number = %s RETURNING {}"
                ).format(image_sql),
                [account["id"], did_number],
                before_query=sql.SQL(
                    "SELECT {} FROM dids WHERE account_id = %s AND number = %s FOR UPDATE"
                ).format(image_sql),
                before_params=[account["id"], did_number],
            )
            if image is None:
                raise NotFound(f"DID {did_number} not found")
