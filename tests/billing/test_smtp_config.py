"""`[smtp]` in the configuration (engine.config.SmtpConfig) and what the mailer gets from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.billing.alerts import SmtpSettings
from engine.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_file_sends_no_email() -> None:
    config = load_config(ROOT / "config" / "callgate.toml", environ={})
    assert config.smtp.host == "" and SmtpSettings.from_config(config.smtp) is None


def test_file_values_and_both_environment_spellings(tmp_path: Path) -> None:
    path = tmp_path / "callgate.toml"
    path.write_text('[smtp]\nhost = "mail.example"\nport = 587\nsender = "billing@example.com"\n')
    config = load_config(path, environ={})
    assert (config.smtp.host, config.smtp.port, config.smtp.sender) == (
        "mail.example",
        587,
        "billing@example.com",
    )
    environ = {
        "CALLGATE_SMTP_HOST": "127.0.0.1",
        "CALLGATE_SMTP_PORT": "2525",
        "CALLGATE_SMTP_FROM": "alerts@example.com",
        "CALLGATE_SMTP_USER": "alerts",
        "CALLGATE_SMTP_PASSWORD": "s3cret-pw",
        "CALLGATE_SMTP_STARTTLS": "1",
        "CALLGATE_SMTP__TIMEOUT": "3.5",
    }
    settings = SmtpSettings.from_config(load_config(path, environ=environ).smtp)
    assert settings == SmtpSettings(
        host="127.0.0.1",
        port=2525,
        sender="alerts@example.com",
        username="alerts",
        password="s3cret-pw",
        starttls=True,
        timeout=3.5,
    )


def test_the_password_is_never_shown(tmp_path: Path) -> None:
    environ = {"CALLGATE_SMTP_HOST": "h", "CALLGATE_SMTP_USER": "u", "CALLGATE_SMTP_PASSWORD": "s3cret-pw"}
    config = load_config(None, environ=environ)
    settings = SmtpSettings.from_config(config.smtp)
    assert "s3cret-pw" not in repr(config) and "s3cret-pw" not in repr(settings)


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"CALLGATE_SMTP_PORT": "0"}, "port must be 1-65535"),
        ({"CALLGATE_SMTP_PORT": "x"}, "cannot read 'x' as int"),
        ({"CALLGATE_SMTP_HOST": "h", "CALLGATE_SMTP_FROM": "nobody"}, "is not an e-mail address"),
        ({"CALLGATE_SMTP_PASSWORD": "pw"}, "a password needs a username"),
        ({"CALLGATE_SMTP_STARTTLS": "maybe"}, "cannot read 'maybe' as bool"),
    ],
)
def test_bad_settings_are_refused_at_start_up(environ: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(None, environ=environ)
