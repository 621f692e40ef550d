"""One customer or provider: show, edit, delete, its alert threshold and its trunks."""

from __future__ import annotations

from flask import Response
from flask_openapi3.blueprint import APIBlueprint
from flask_openapi3.models.tag import Tag

from engine.admin import schemas as s
from engine.admin.api.http import json_response, list_response, service
from engine.admin.api.paths import NumberPath, TrunkList

from . import blueprint

account = Tag(name="account", description="one customer or provider and its sub-resources")


def routes() -> APIBlueprint:
    api = blueprint("account")

    @api.get("/customers/<number>", tags=[account], responses={200: s.AccountOut}, summary="Show an account")
    def get_customer(path: NumberPath) -> Response:
        return json_response(service().get_account(path.number))

    @api.patch(
        "/customers/<number>",
        tags=[account],
        responses={200: s.AccountOut},
        summary="Edit profile and settings",
    )
    def update_customer(path: NumberPath, body: s.CustomerUpdate) -> Response:
        return json_response(service().update_account(path.number, body))

    @api.delete(
        "/customers/<number>",
        tags=[account],
        responses={200: s.DeleteResult},
        summary="Delete (soft): off, related data removed, DIDs released",
    )
    def delete_customer(path: NumberPath) -> Response:
        return json_response(service().delete_accounts([path.number]))

    @api.get("/customers/<number>/alert-threshold", tags=[account], responses={200: s.AlertThresholdOut})
    def get_alert_threshold(path: NumberPath) -> Response:
        return json_response(service().get_alert_threshold(path.number))

    @api.put(
        "/customers/<number>/alert-threshold",
        tags=[account],
        responses={200: s.AlertThresholdOut},
        summary="Low-balance notification level (only the fields given change)",
    )
    def set_alert_threshold(path: NumberPath, body: s.AlertThreshold) -> Response:
        return json_response(service().set_alert_threshold(path.number, body))

    @api.get(
        "/customers/<number>/trunks",
        tags=[account],
        responses={200: TrunkList},
        summary="A provider's trunks",
    )
    def list_trunks(path: NumberPath) -> Response:
        return list_response(service().list_trunks(path.number))

    return api
