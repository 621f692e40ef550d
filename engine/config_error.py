"""The one error a bad configuration raises.

Its own module so that every settings section (engine.config, engine.admin.settings...) can
raise it without importing engine.config, which imports the sections: no import loop.
"""


class ConfigError(Exception):
    """A configuration file, key or value is invalid; the message names it."""
