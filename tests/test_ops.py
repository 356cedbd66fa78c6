"""Operating it as a new user would: help text, where the store is, unknown names, which
setting is at fault, and errors that name what failed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tcbridge.cli import main
from tcbridge.config import TradecloudSettings, load_settings
from tcbridge.envelope import parse_order_webhook
from tcbridge.errors import ApiTransientError, ConfigError
from tcbridge.store import Store
from tcbridge.tradecloud import TradecloudClient
from tests.conftest import order_event_body
from tests.support import write_config

TOKEN = "t" * 40


@pytest.fixture(autouse=True)
def _keep_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands configure structlog for the process (cached loggers included): not
    inside the test process, where later tests capture logs."""
    monkeypatch.setattr("tcbridge.logs.configure", lambda *args, **kwargs: None)


def config(directory: Path, **store: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory / "tcbridge.toml", {
        "mode": "webhook",
        "store": {"path": "var/tcbridge.db", **store},
        "webhook": {"host": "127.0.0.1", "port": 8080, "auth": "bearer",
                    "bearer_token": TOKEN},
        "handlers": [{"name": "drop", "type": "file", "directory": str(directory / "out")}],
    })


def test_help_starts_with_what_tcbridge_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Tradecloud webhooks and polling" in out
    assert "The command line" not in out


def test_a_relative_store_path_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config(tmp_path / "etc")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_settings(path).store.path == tmp_path / "etc" / "var" / "tcbridge.db"
    absolute = config(tmp_path / "abs", path=str(tmp_path / "db.sqlite"))
    assert load_settings(absolute).store.path == tmp_path / "db.sqlite"


@pytest.mark.parametrize("command", [
    ["status"], ["events"], ["deliveries"], ["cursor"], ["replay", "--dead"], ["purge"]])
def test_read_only_commands_refuse_a_missing_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    path = config(tmp_path)
    assert main([*command, "--config", str(path)]) == 2
    assert "no store at" in capsys.readouterr().err
    assert not (tmp_path / "var").exists()  # nothing was created


async def make_store(path: Path) -> None:
    settings = load_settings(path)
    async with Store(settings.store.path, settings.store) as store:
        await store.ingest(parse_order_webhook(order_event_body("o-1")))


def test_unknown_names_are_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path)
    asyncio.run(make_store(path))
    capsys.readouterr()
    assert main(["deliveries", "--handler", "nosuch", "--config", str(path)]) == 2
    assert "no handler named 'nosuch'" in capsys.readouterr().err
    assert main(["replay", "--event", "nosuch", "--config", str(path)]) == 2
    assert "no event with id 'nosuch'" in capsys.readouterr().err
    assert main(["replay", "--event", "nosuch", "--handler", "x", "--config", str(path)]) == 2
    assert main(["deliveries", "--handler", "drop", "--config", str(path)]) == 0


def test_an_invalid_environment_value_is_blamed_on_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config(tmp_path)
    monkeypatch.setenv("TCBRIDGE_WEBHOOK__PORT", "not-a-port")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert "webhook.port" in str(raised.value)
    assert "environment variable TCBRIDGE_WEBHOOK__PORT" in str(raised.value)
    monkeypatch.delenv("TCBRIDGE_WEBHOOK__PORT")
    bad = config(tmp_path / "bad", busy_timeout_s=-1)
    with pytest.raises(ConfigError) as raised:
        load_settings(bad)
    assert "environment variable" not in str(raised.value)  # the file's own mistake


async def test_connection_errors_name_the_url_and_the_reason() -> None:
    settings = TradecloudSettings(base_url="http://127.0.0.1:9", username="u", password="p",
                                  max_retries=0)
    async with aiohttp.ClientSession() as session:
        client = TradecloudClient(session, settings)
        with pytest.raises(ApiTransientError) as raised:
            await client.poll("order", "2024-01-01T00:00:00.000Z", offset=0, limit=10)
    message = str(raised.value)
    assert "http://127.0.0.1:9/v2/order-search/poll" in message
    assert "Cannot connect to host 127.0.0.1:9" in message, message


def test_make_run_goes_through_config_validation() -> None:
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    run = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "tcbridge run --config $(CONFIG)" in run
    assert os.path.exists(Path(__file__).parent.parent / "config.example.toml")
