"""The path parameters and list bodies of the routes (pydantic models for flask-openapi3)."""

from __future__ import annotations

from flask_openapi3.models.file import FileStorage
from pydantic import BaseModel, Field, RootModel

from engine.admin import schemas as s


class NumberPath(BaseModel):
    number: s.AccountNumber = Field(description="the account number")


class SipDevicePath(NumberPath):
    username: s.SipUser


class IpMapPath(NumberPath):
    entry_id: int = Field(ge=1, le=2**63 - 1)


class CallerIdPath(NumberPath):
    caller_id: s.Digits


class DidPath(NumberPath):
    did: s.Digits


class SpeedDialPath(NumberPath):
    key: s.SpeedDialKey


class BlockedCodePath(NumberPath):
    prefix: s.Digits


class ImportForm(BaseModel):
    file: FileStorage = Field(description="the CSV file (UTF-8); the first line is the header")
    options: s.ImportOptions | None = Field(
        None, description="JSON: mapping, defaults, dry_run, balance_convention"
    )


CSV_RESPONSE = {"description": "CSV (UTF-8)", "content": {"text/csv": {"schema": {"type": "string"}}}}


class SipDeviceList(RootModel[list[s.SipDeviceOut]]):
    pass


class IpMapList(RootModel[list[s.IpMapOut]]):
    pass


class CallerIdList(RootModel[list[s.CallerIdOut]]):
    pass


class DidList(RootModel[list[s.DidOut]]):
    pass


class SpeedDialList(RootModel[list[s.SpeedDialOut]]):
    pass


class BlockedCodeList(RootModel[list[s.BlockedCodeOut]]):
    pass


class TrunkList(RootModel[list[s.TrunkOut]]):
    pass
