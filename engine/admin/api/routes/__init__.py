"""The routes, one blueprint per resource group; :func:`blueprint` gives each the same prefix,
security and documented error responses."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from flask_openapi3.blueprint import APIBlueprint
from pydantic import BaseModel

from engine.admin import schemas as s
from engine.admin.api.http import PREFIX

SECURITY: list[dict[str, list[Any]]] = [{"bearerAuth": []}]
ResponseMap = dict[str | int | HTTPStatus, type[BaseModel] | dict[Any, Any] | None]

# Every status any route can answer besides its success (the OpenAPI document lists them all):
# 400 unreadable body, 401 no valid token, 403 scope or read-only token, 404 not found or out of
# scope, 409 identification data claimed by another tenant, 413 body too large, 422 invalid input,
# 503 no database connection free.
ERROR_RESPONSES: ResponseMap = {code: s.ErrorOut for code in (400, 401, 403, 404, 409, 413, 422, 503)}


def blueprint(name: str) -> APIBlueprint:
    return APIBlueprint(
        name, __name__, url_prefix=PREFIX, abp_security=SECURITY, abp_responses=dict(ERROR_RESPONSES)
    )
