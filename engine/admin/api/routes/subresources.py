"""An account's sub-resources: SIP devices, IP map, caller IDs, forced caller ID, DIDs, speed
dials, blocked codes."""

from __future__ import annotations

from flask import Response
from flask_openapi3.blueprint import APIBlueprint
from flask_openapi3.models.tag import Tag

from engine.admin import schemas as s
from engine.admin.api.http import json_response, list_response, no_content, service
from engine.admin.api.paths import (
    BlockedCodeList,
    BlockedCodePath,
    CallerIdList,
    CallerIdPath,
    DidList,
    DidPath,
    IpMapList,
    IpMapPath,
    NumberPath,
    SipDeviceList,
    SipDevicePath,
    SpeedDialList,
    SpeedDialPath,
)

from . import ResponseMap, blueprint

account = Tag(name="account", description="one customer or provider and its sub-resources")
DELETED: ResponseMap = {204: None}


def routes() -> APIBlueprint:
    api = blueprint("subresources")
    _sip_devices(api)
    _ip_map(api)
    _caller_ids(api)
    _dids(api)
    _speed_dials_and_blocked_codes(api)
    return api


def _sip_devices(api: APIBlueprint) -> None:
    @api.get("/customers/<number>/sip-devices", tags=[account], responses={200: SipDeviceList})
    def list_sip_devices(path: NumberPath) -> Response:
        return list_response(service().list_sip_devices(path.number))

    @api.post("/customers/<number>/sip-devices", tags=[account], responses={201: s.SipDeviceCreated})
    def add_sip_device(path: NumberPath, body: s.SipDeviceCreate) -> Response:
        return json_response(service().add_sip_device(path.number, body), 201)

    @api.patch("/customers/<number>/sip-devices/<username>", tags=[account], responses={200: s.SipDeviceOut})
    def update_sip_device(path: SipDevicePath, body: s.SipDeviceUpdate) -> Response:
        return json_response(service().update_sip_device(path.number, path.username, body))

    @api.delete("/customers/<number>/sip-devices/<username>", tags=[account], responses=DELETED)
    def delete_sip_device(path: SipDevicePath) -> Response:
        service().delete_sip_device(path.number, path.username)
        return no_content()


def _ip_map(api: APIBlueprint) -> None:
    @api.get("/customers/<number>/ip-map", tags=[account], responses={200: IpMapList})
    def list_ip_map(path: NumberPath) -> Response:
        return list_response(service().list_ip_map(path.number))

    @api.post("/customers/<number>/ip-map", tags=[account], responses={201: s.IpMapOut})
    def add_ip_map(path: NumberPath, body: s.IpMapCreate) -> Response:
        return json_response(service().add_ip_map(path.number, body), 201)

    @api.patch("/customers/<number>/ip-map/<int:entry_id>", tags=[account], responses={200: s.IpMapOut})
    def update_ip_map(path: IpMapPath, body: s.IpMapUpdate) -> Response:
        return json_response(service().update_ip_map(path.number, path.entry_id, body))

    @api.delete("/customers/<number>/ip-map/<int:entry_id>", tags=[account], responses=DELETED)
    def delete_ip_map(path: IpMapPath) -> Response:
        service().delete_ip_map(path.number, path.entry_id)
        return no_content()


def _caller_ids(api: APIBlueprint) -> None:
    @api.get("/customers/<number>/caller-ids", tags=[account], responses={200: CallerIdList})
    def list_caller_ids(path: NumberPath) -> Response:
        return list_response(service().list_caller_ids(path.number))

    @api.post("/customers/<number>/caller-ids", tags=[account], responses={201: s.CallerIdOut})
    def add_caller_id(path: NumberPath, body: s.CallerIdCreate) -> Response:
        return json_response(service().add_caller_id(path.number, body), 201)

    @api.patch("/customers/<number>/caller-ids/<caller_id>", tags=[account], responses={200: s.CallerIdOut})
    def update_caller_id(path: CallerIdPath, body: s.CallerIdUpdate) -> Response:
        return json_response(service().update_caller_id(path.number, path.caller_id, body))

    @api.delete("/customers/<number>/caller-ids/<caller_id>", tags=[account], responses=DELETED)
    def delete_caller_id(path: CallerIdPath) -> Response:
        service().delete_caller_id(path.number, path.caller_id)
        return no_content()

    @api.get("/customers/<number>/forced-caller-id", tags=[account], responses={200: s.ForcedCallerIdOut})
    def get_forced_caller_id(path: NumberPath) -> Response:
        return json_response(service().get_forced_caller_id(path.number))

    @api.put("/customers/<number>/forced-caller-id", tags=[account], responses={200: s.ForcedCallerIdOut})
    def set_forced_caller_id(path: NumberPath, body: s.ForcedCallerIdIn) -> Response:
        return json_response(service().set_forced_caller_id(path.number, body))

    @api.delete("/customers/<number>/forced-caller-id", tags=[account], responses=DELETED)
    def clear_forced_caller_id(path: NumberPath) -> Response:
        service().clear_forced_caller_id(path.number)
        return no_content()


def _dids(api: APIBlueprint) -> None:
    @api.get("/customers/<number>/dids", tags=[account], responses={200: DidList})
    def list_dids(path: NumberPath) -> Response:
        return list_response(service().list_dids(path.number))

    @api.post(
        "/customers/<number>/dids",
        tags=[account],
        responses={201: s.DidOut},
        summary="Assign a free DID (admin only)",
    )
    def assign_did(path: NumberPath, body: s.DidAssign) -> Response:
        return json_response(service().assign_did(path.number, body), 201)

    @api.patch("/customers/<number>/dids/<did>", tags=[account], responses={200: s.DidOut})
    def update_did(path: DidPath, body: s.DidUpdate) -> Response:
        return json_response(service().update_did(path.number, path.did, body))

    @api.delete("/customers/<number>/dids/<did>", tags=[account], responses=DELETED, summary="Release a DID")
    def release_did(path: DidPath) -> Response:
        service().release_did(path.number, path.did)
        return no_content()


def _speed_dials_and_blocked_codes(api: APIBlueprint) -> None:
    @api.get("/customers/<number>/speed-dials", tags=[account], responses={200: SpeedDialList})
    def list_speed_dials(path: NumberPath) -> Response:
        return list_response(service().list_speed_dials(path.number))

    @api.put("/customers/<number>/speed-dials/<key>", tags=[account], responses={200: s.SpeedDialOut})
    def set_speed_dial(path: SpeedDialPath, body: s.SpeedDialIn) -> Response:
        return json_response(service().set_speed_dial(path.number, path.key, body))

    @api.delete("/customers/<number>/speed-dials/<key>", tags=[account], responses=DELETED)
    def delete_speed_dial(path: SpeedDialPath) -> Response:
        service().delete_speed_dial(path.number, path.key)
        return no_content()

    @api.get("/customers/<number>/blocked-codes", tags=[account], responses={200: BlockedCodeList})
    def list_blocked_codes(path: NumberPath) -> Response:
        return list_response(service().list_blocked_codes(path.number))

    @api.post("/customers/<number>/blocked-codes", tags=[account], responses={201: s.BlockedCodeOut})
    def add_blocked_code(path: NumberPath, body: s.BlockedCodeCreate) -> Response:
        return json_response(service().add_blocked_code(path.number, body), 201)

    @api.delete("/customers/<number>/blocked-codes/<prefix>", tags=[account], responses=DELETED)
    def delete_blocked_code(path: BlockedCodePath) -> Response:
        service().delete_blocked_code(path.number, path.prefix)
        return no_content()
