"""What the service layer raises; both front ends turn these into messages (CLI) or statuses (API)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str  # the request field (or CSV column) at fault; "" = the request as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class AdminError(Exception):
    status = 400
    code = "bad_request"


class ValidationFailed(AdminError):
    """One or more fields are invalid; nothing was written."""

    status = 422
    code = "validation_failed"

    def __init__(self, errors: Iterable[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    @classmethod
    def one(cls, field: str, message: str) -> ValidationFailed:
        return cls([FieldError(field, message)])


class NotFound(AdminError):
    """The resource does not exist, or is outside the caller's scope (never told apart)."""

    status = 404
    code = "not_found"


class Forbidden(AdminError):
    """The caller's scope does not allow the operation at all (e.g. a reseller creating a provider)."""

    status = 403
    code = "forbidden"


class Unauthorized(AdminError):
    status = 401
    code = "unauthorized"
