"""SIP devices of an account."""

from __future__ import annotations

from typing import Any

from engine.admin import numbers
from engine.admin import schemas as s
from engine.admin.errors import Conflict, FieldError
from engine.admin.service.base import (
    _SIP_DEVICES,
    ServiceBase,
    _non_null_changes,
)


class DevicesMixin(ServiceBase):
    """SIP devices."""

    _SIP_COLUMNS = (
        "active",
        "codecs",
        "caller_id_name",
        "caller_id_number",
        "context",
        "voicemail_enabled",
        "voicemail_password",
    )

    def list_sip_devices(self, number: str) -> list[s.SipDeviceOut]:
        rows = self._account_children(
            number, "SELECT * FROM sip_devices WHERE account_id = %s ORDER BY username"
        )
        return [s.SipDeviceOut(**r) for r in rows]

    def add_sip_device(self, number: str, data: s.SipDeviceCreate) -> s.SipDeviceCreated:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            username = data.username or account["number"]
            if self._taken_usernames([username]):
                raise Conflict([FieldError("username", f"{username} is already taken by another SIP device")])
            generated = None
            password = data.password
            if password is None:
                password = generated = numbers.generate_password(16)
            values = {c: getattr(data, c) for c in self._SIP_COLUMNS}
            image = self._insert_child(
                account, _SIP_DEVICES, username, {"username": username, "password": password, **values}
            )
        return s.SipDeviceCreated(device=s.SipDeviceOut(**image), generated_password=generated)

    def update_sip_device(self, number: str, username: str, data: Any) -> s.SipDeviceOut:
        image = self._update_child(number, _SIP_DEVICES, username, _non_null_changes(data))
        return s.SipDeviceOut(**image)

    def delete_sip_device(self, number: str, username: str) -> None:
        self._delete_child(number, _SIP_DEVICES, username)
