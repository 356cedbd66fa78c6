"""Configuration: the TOML contract, environment overrides, secrets files, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcbridge.cli import main
from tcbridge.config import load_settings
from tcbridge.errors import ConfigError

TOKEN = "tok-9f3a-0123456789abcdef0123456789"
TOKEN_LINE = f'bearer_token = "{TOKEN}"'
MINIMAL = f"""
mode = "hybrid"
[tradecloud]
username = "integration@example.com"
password = "pw"
[webhook]
auth = "bearer"
{TOKEN_LINE}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tcbridge.toml"
    path.write_text(text)
    return path


EXAMPLE = Path(__file__).parent.parent / "config.example.toml"


def test_example_config_is_valid_once_its_placeholders_are_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TCBRIDGE_WEBHOOK__BEARER_TOKEN", TOKEN)
    settings = load_settings(EXAMPLE)
    assert settings.mode == "hybrid"
    assert settings.webhook.port == 8080


def test_example_config_as_shipped_is_refused() -> None:
    # `make run` on the example must not listen on 0.0.0.0 with a published token.
    with pytest.raises(ConfigError, match=r"placeholder.*secrets\.token_urlsafe"):
        load_settings(EXAMPLE)


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ("", "set \\[webhook\\] auth"),  # no section at all: no open default any more
        ('host = "0.0.0.0"', "set \\[webhook\\] auth"),
        ('auth = "none"', "allow_unauthenticated = true"),
        ('auth = "bearer"\nbearer_token = "short-token"', "shorter than 32.*token_urlsafe"),
        ('auth = "bearer"\nbearer_token = "change-me-to-a-long-random-token-0123456789"',
         "placeholder"),
        ('auth = "basic"\nbasic_username = "tc"\nbasic_password = "change-me"', "placeholder"),
    ],
)
def test_webhook_authentication_must_be_chosen(
    tmp_path: Path, webhook: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = f'mode = "webhook"\n[webhook]\n{webhook}\n' if webhook else 'mode = "webhook"\n'
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text))
    assert main(["check-config", "--config", str(tmp_path / "tcbridge.toml")]) == 2


def test_unauthenticated_webhook_when_asked_for_and_poll_mode_without_webhook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = 'mode = "webhook"\n[webhook]\nauth = "none"\nallow_unauthenticated = true\n'
    assert load_settings(write(tmp_path, text)).webhook.auth == "none"
    assert main(["check-config", "--config", str(tmp_path / "tcbridge.toml")]) == 0
    assert "warning: webhook.auth = 'none'" in capsys.readouterr().err
    poll = 'mode = "poll"\n[tradecloud]\nusername = "u"\npassword = "p"\n'
    assert load_settings(write(tmp_path, poll)).webhook.auth is None


def test_parse_budget_follows_the_body_limit_unless_set(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, MINIMAL)).webhook.max_parse_bytes == 20 * 1024 * 1024
    raised = load_settings(write(tmp_path, MINIMAL + "max_body_bytes = 50000000\n")).webhook
    assert raised.max_parse_bytes == 100_000_000
    with pytest.raises(ConfigError, match="max_parse_bytes must be at least max_body_bytes"):
        load_settings(write(tmp_path, MINIMAL + "max_parse_bytes = 5000\n"))


def test_defaults_and_values(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.store.path == Path("var/tcbridge.db")
    assert settings.tradecloud.api == "poll"
    assert settings.poll.kinds == ["order", "shipment"]
    assert settings.poll.interval_s == 300
    assert settings.webhook.bearer_token is not None
    assert settings.webhook.bearer_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings)


def test_environment_overrides_nested_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCBRIDGE_WEBHOOK__PORT", "9000")
    monkeypatch.setenv("TCBRIDGE_MODE", "poll")
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.webhook.port == 9000
    assert settings.webhook.bearer_token is not None  # the rest of the section survives
    assert settings.mode == "poll"


def test_secret_files(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("from-file\n")
    (tmp_path / "token").write_text("token-file-0123456789abcdef0123456789")
    text = MINIMAL.replace('password = "pw"', f'password_file = "{tmp_path / "password"}"')
    text = text.replace(TOKEN_LINE, f'bearer_token_file = "{tmp_path / "token"}"')
    settings = load_settings(write(tmp_path, text))
    assert settings.tradecloud.password is not None
    assert settings.tradecloud.password.get_secret_value() == "from-file"
    assert settings.webhook.bearer_token is not None
    assert settings.webhook.bearer_token.get_secret_value() == \
        "token-file-0123456789abcdef0123456789"


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        (('mode = "hybrid"', 'mode = "push"'), "mode", "'webhook', 'poll' or 'hybrid'"),
        ((TOKEN_LINE, TOKEN_LINE + '\nport = "x"'), "webhook.port",
         "valid integer"),
        ((TOKEN_LINE, ""), "webhook", "needs bearer_token"),
        (('password = "pw"', 'password_file = "/nonexistent"'), "tradecloud",
         "cannot read secret file"),
        (('password = "pw"', 'password = "pw"\npassword_file = "/etc/hostname"'), "tradecloud",
         "not both"),
        (('mode = "hybrid"', 'mode = "hybrid"\nunknown = 1'), "unknown", "Extra inputs"),
        (('mode = "hybrid"', 'mode = "hybrid"\n[poll]\npage_size = 500'), "poll.page_size",
         "less than or equal to 100"),
        (('mode = "hybrid"', 'mode = "hybrid"\n[poll]\nstart_from = "yesterday"'),
         "poll.start_from", "not an ISO 8601"),
        ((TOKEN_LINE, TOKEN_LINE + '\nallowed_ips = ["nope"]'),
         "webhook.allowed_ips", "not an IP address"),
        (('username = "integration@example.com"', 'username = ""'), "(top level)",
         "set tradecloud.username"),
    ],
)
def test_errors_name_key_and_file(
    tmp_path: Path, change: tuple[str, str], key: str, message: str
) -> None:
    path = write(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert str(path) in text
    assert key in text
    assert message in text


def test_duplicate_handler_names(tmp_path: Path) -> None:
    handler = '[[handlers]]\nname = "a"\ntype = "file"\ndirectory = "out"\n'
    with pytest.raises(ConfigError, match="handler names must be unique: a"):
        load_settings(write(tmp_path, MINIMAL + handler + handler))


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "mode = "))
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "missing.toml")


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(write(tmp_path, MINIMAL))]) == 0
    bad = write(tmp_path, MINIMAL.replace('mode = "hybrid"', 'mode = "push"'))
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "mode" in err and str(bad) in err
