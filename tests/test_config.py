"""Configuration: the TOML contract, environment overrides, secrets files, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tcbridge.cli import main
from tcbridge.config import Settings, load_settings
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
    monkeypatch.setenv("TCBRIDGE_TRADECLOUD__PASSWORD", "the-integration-user's-password")
    settings = load_settings(EXAMPLE)
    assert settings.mode == "hybrid"
    assert settings.webhook.port == 8080


def test_example_config_as_shipped_is_refused() -> None:
    # `make run` on the example must not listen on 0.0.0.0 with a published token.
    with pytest.raises(ConfigError, match=r"placeholder.*secrets\.token_urlsafe"):
        load_settings(EXAMPLE)


def test_the_example_tradecloud_password_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCBRIDGE_WEBHOOK__BEARER_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match="tradecloud: password is the example's placeholder"):
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
    assert settings.store.path == tmp_path / "var/tcbridge.db"  # beside the file
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


def test_a_file_handler_has_more_slots_by_default_than_the_others(tmp_path: Path) -> None:
    handlers = ('[[handlers]]\nname = "drop"\ntype = "file"\ndirectory = "out"\n'
                '[[handlers]]\nname = "small"\ntype = "file"\ndirectory = "o2"\n'
                'concurrency = 2\n'
                '[[handlers]]\nname = "cmd"\ntype = "command"\ncommand = ["true"]\n')
    settings = load_settings(write(tmp_path, MINIMAL + handlers))
    assert [h.concurrency for h in settings.handlers] == [32, 2, 4]


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


def test_filters_nest_from_tables_and_dotted_keys(tmp_path: Path) -> None:
    text = MINIMAL + """
[poll.order_filters]
"status.processStatus" = ["Confirmed"]
"buyerOrder.companyId" = ["c1"]
[poll.order_filters.status]
logisticsStatus = ["Shipped"]
[poll.shipment_filters.buyerShipment]
companyId = "c1"
"""
    settings = load_settings(write(tmp_path, text))
    assert settings.poll.order_filters == {
        "status": {"processStatus": ["Confirmed"], "logisticsStatus": ["Shipped"]},
        "buyerOrder": {"companyId": ["c1"]},
    }
    assert settings.poll.shipment_filters == {"buyerShipment": {"companyId": "c1"}}


def test_a_filter_given_twice_is_refused(tmp_path: Path) -> None:
    text = MINIMAL + """
[poll.order_filters]
"status.processStatus" = ["Confirmed"]
[poll.order_filters.status]
processStatus = ["Issued"]
"""
    with pytest.raises(ConfigError, match="given twice"):
        load_settings(write(tmp_path, text))


def test_search_cursor_filter_and_single_delivery(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.tradecloud.cursor_filter == "lastUpdatedAfter"
    assert not settings.tradecloud.single_delivery and not settings.tradecloud.cursor_inclusive
    old = MINIMAL.replace('password = "pw"', 'password = "pw"\napi = "search"\n'
                          'search_cursor_filter = "lastUpdatedSince"')
    legacy = load_settings(write(tmp_path, old)).tradecloud
    assert legacy.cursor_filter == "lastUpdatedSince" and legacy.cursor_inclusive
    on_poll = MINIMAL.replace('password = "pw"', 'password = "pw"\n'
                              'search_cursor_filter = "lastUpdatedSince"')
    # The poll endpoints always take lastUpdatedAfter, whatever the search setting.
    assert load_settings(write(tmp_path, on_poll)).tradecloud.cursor_filter == "lastUpdatedAfter"


def test_check_config_refuses_single_delivery_with_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = MINIMAL.replace('password = "pw"', 'password = "pw"\napi = "search"\n'
                           'single_delivery = true')
    assert main(["check-config", "--config", str(write(tmp_path, text))]) == 2
    assert "single_delivery" in capsys.readouterr().err
    ok = text.replace('api = "search"', 'api = "poll"')
    assert main(["check-config", "--config", str(write(tmp_path, ok))]) == 0
OAUTH2 = MINIMAL.replace('auth = "bearer"\n' + TOKEN_LINE, """auth = "oauth2"
oauth2_issuer = "https://login.microsoftonline.com/tenant-1/v2.0"
oauth2_audience = "api://tcbridge"
oauth2_required_claims = { appid = "tc-client" }""")


def test_oauth2_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(write(tmp_path, OAUTH2))
    hook = settings.webhook
    assert hook.oauth2_audiences == ("api://tcbridge",)
    assert hook.oauth2_required_claims == {"appid": "tc-client"}
    assert hook.oauth2_leeway_s == 60 and hook.oauth2_jwks_url is None
    text = OAUTH2.replace('"api://tcbridge"', '["api://tcbridge", "b1c2"]')
    assert load_settings(write(tmp_path, text)).webhook.oauth2_audiences == (
        "api://tcbridge", "b1c2")
    monkeypatch.setenv("TCBRIDGE_WEBHOOK__OAUTH2_AUDIENCE", '["from-env"]')
    assert load_settings(write(tmp_path, OAUTH2)).webhook.oauth2_audiences == ("from-env",)
    monkeypatch.setenv("TCBRIDGE_WEBHOOK__OAUTH2_AUDIENCE", "api://plain")
    assert load_settings(write(tmp_path, OAUTH2)).webhook.oauth2_audiences == ("api://plain",)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('oauth2_issuer = "https://login.microsoftonline.com/tenant-1/v2.0"', ""),
         "needs oauth2_issuer"),
        (("https://login.microsoftonline.com/tenant-1/v2.0", "login.microsoftonline.com"),
         "needs oauth2_issuer"),
        (('oauth2_audience = "api://tcbridge"', ""), "needs oauth2_audience"),
        (('oauth2_audience = "api://tcbridge"', "oauth2_audience = []"), "needs oauth2_audience"),
        (('oauth2_audience = "api://tcbridge"', 'oauth2_audience = [""]'),
         "needs oauth2_audience"),
        (('"tc-client"', '""'), "'appid' needs a value"),
        (('oauth2_audience = "api://tcbridge"',
          'oauth2_audience = "api://tcbridge"\noauth2_jwks_url = "ftp://x"'),
         "oauth2_jwks_url must be an http(s):// URL"),
        (('oauth2_audience = "api://tcbridge"',
          'oauth2_audience = "api://tcbridge"\noauth2_leeway_s = -1'),
         "greater than or equal to 0"),
    ],
)
def test_oauth2_errors(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="webhook") as info:
        load_settings(write(tmp_path, OAUTH2.replace(*change)))
    assert message in str(info.value)


def test_store_backend_postgresql_needs_a_dsn_and_keeps_it_secret(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, MINIMAL)).store.backend == "sqlite"
    with pytest.raises(ConfigError, match="needs dsn"):
        load_settings(write(tmp_path, MINIMAL + '[store]\nbackend = "postgresql"\n'))
    with pytest.raises(ConfigError, match="needs dsn"):
        load_settings(write(tmp_path, MINIMAL + '[store]\nbackend = "postgresql"\n'
                                                'dsn = "mysql://x@y/z"\n'))
    dsn = "postgresql://tcb:s3cret-pw@db.example:5432/tcbridge"
    settings = load_settings(write(tmp_path, MINIMAL + f'[store]\nbackend = "postgresql"\n'
                                                       f'dsn = "{dsn}"\n'))
    assert settings.store.dsn is not None and settings.store.dsn.get_secret_value() == dsn
    assert "s3cret" not in repr(settings.store)
    assert settings.store.location == "postgresql://tcb:<redacted>@db.example:5432/tcbridge"
    (tmp_path / "dsn").write_text(dsn + "\n")
    from_file = load_settings(write(tmp_path, MINIMAL + '[store]\nbackend = "postgresql"\n'
                                                        f'dsn_file = "{tmp_path / "dsn"}"\n'))
    assert from_file.store.dsn is not None and from_file.store.dsn.get_secret_value() == dsn
    with pytest.raises(ConfigError, match="not both"):
        load_settings(write(tmp_path, MINIMAL + f'[store]\ndsn = "{dsn}"\n'
                                                f'dsn_file = "{tmp_path / "dsn"}"\n'))
    # sqlite ignores a dsn (one may be kept while moving between backends)
    assert load_settings(write(tmp_path, MINIMAL + f'[store]\ndsn = "{dsn}"\n')).store.location \
        .endswith("tcbridge.db")


def test_node_and_delivery_sections_for_replicas() -> None:
    defaults = Settings(mode="webhook", webhook={"auth": "none", "allow_unauthenticated": True})
    assert defaults.node.id is None and defaults.node.lock_check_s == 5.0
    assert defaults.delivery.lease_s == 60.0
    named = Settings(mode="webhook", webhook={"auth": "none", "allow_unauthenticated": True},
                     node={"id": "tcbridge-a", "lock_check_s": 0.5}, delivery={"lease_s": 5})
    assert (named.node.id, named.node.lock_check_s, named.delivery.lease_s) == (
        "tcbridge-a", 0.5, 5.0)
    for bad in ({"node": {"id": ""}}, {"node": {"lock_check_s": 0}},
                {"delivery": {"lease_s": 0.5}}, {"node": {"unknown": 1}}):
        with pytest.raises(ValidationError):
            Settings(mode="webhook", webhook={"auth": "none", "allow_unauthenticated": True},
                     **bad)
