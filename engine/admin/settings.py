"""The ``[admin]`` configuration section (customer management and the HTTP API).

:class:`AdminSettings` is defined in engine.config with the other sections, so that
engine.config imports nothing of engine.admin (no import loop, tests/test_layers.py); it is
re-exported here. :func:`admin_settings` falls back to its defaults for a config object
without the section.
"""

from __future__ import annotations

from typing import Any

from engine.config import AdminSettings

__all__ = ["AdminSettings", "admin_settings"]


def admin_settings(config: Any) -> AdminSettings:
    """The checked [admin] section of `config` (defaults when the section does not exist yet)."""
    settings = getattr(config, "admin", None)
    if not isinstance(settings, AdminSettings):
        settings = AdminSettings()
    settings.check()
    return settings
