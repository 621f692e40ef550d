"""What the service layer raises; both front ends turn these into messages (CLI) or statuses (API)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str  # the request field (or CSV column) at fault; "" = the request as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class AdminError(Exception):
    """Subclasses name their HTTP status and error code: ``class X(AdminError, status=..., code=...)``."""

    status = 400
    code = "bad_request"

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
        if code is not None:
            cls.code = code


class ValidationFailed(AdminError, status=422, code="validation_failed"):
    """One or more fields are invalid; nothing was written."""

    def __init__(self, errors: Iterable[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    @classmethod
    def one(cls, field: str, message: str) -> ValidationFailed:
        return cls([FieldError(field, message)])


class NotFound(AdminError, status=404, code="not_found"):
    """The resource does not exist, or is outside the caller's scope (never told apart)."""


class Forbidden(AdminError, status=403, code="forbidden"):
    """The caller's scope does not allow the operation at all (e.g. a reseller creating a provider)."""


class Unauthorized(AdminError, status=401, code="unauthorized"):
    """The request carries no valid API token."""


class Conflict(ValidationFailed, status=409, code="conflict"):
    """The data is already claimed elsewhere (identification data of another tenant, a taken name)."""
