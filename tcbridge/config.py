"""Configuration: one TOML file, overridden by ``TCBRIDGE_`` environment variables.

This is the only module that reads the environment. Everything else receives a
:class:`Settings` (or one of its sections) from its caller.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tcbridge.errors import ConfigError, InvalidEvent
from tcbridge.timefmt import parse_instant

Mode = Literal["webhook", "poll", "hybrid"]
PollKind = Literal["order", "shipment"]
EventKind = Literal["order", "order_documents", "shipment"]
Source = Literal["webhook", "webhook_get", "poll"]
POLL_KINDS: tuple[PollKind, ...] = ("order", "shipment")
ALL_KINDS: tuple[EventKind, ...] = ("order", "order_documents", "shipment")
ALL_SOURCES: tuple[Source, ...] = ("webhook", "webhook_get", "poll")


def _read_secret_file(path: Path) -> SecretStr:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read secret file {str(path)!r}: {e.strerror}") from e
    return SecretStr(text.rstrip("\r\n"))


def _resolve_secrets(model: BaseModel, *names: str) -> None:
    """Fill ``<name>`` from ``<name>_file`` (systemd credentials); both at once is an error."""
    for name in names:
        direct = getattr(model, name)
        path = getattr(model, f"{name}_file")
        if direct is not None and path is not None:
            raise ValueError(f"set {name} or {name}_file, not both")
        if path is not None:
            object.__setattr__(model, name, _read_secret_file(path))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreSettings(_Section):
    """Where and how events are kept."""

    path: Path = Path("var/tcbridge.db")
    busy_timeout_s: float = Field(default=5.0, gt=0)
    commit_batch_max: int = Field(default=512, ge=1, le=10_000)
    retry_after_s: int = Field(default=5, ge=1, le=3600)
    retention_days: float = Field(default=30.0, gt=0, le=100_000)
    dedup_retention_days: float = Field(default=90.0, gt=0, le=100_000)
    purge_interval_s: float = Field(default=3600.0, gt=0)
    purge_batch: int = Field(default=500, ge=1, le=100_000)


class TradecloudSettings(_Section):
    """The Tradecloud API and the integration user."""

    base_url: str = "https://api.accp.tradecloud1.com"
    api: Literal["poll", "search"] = "poll"
    username: str = ""
    password: SecretStr | None = None
    password_file: Path | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_requests_per_s: float = Field(default=10.0, gt=0, le=10.0)
    max_retries: int = Field(default=5, ge=0, le=100)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=60.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/").removesuffix("/v2")

    @model_validator(mode="after")
    def _secrets(self) -> TradecloudSettings:
        _resolve_secrets(self, "password")
        return self


class WebhookSettings(_Section):
    """The listener Tradecloud calls."""

    host: str = "0.0.0.0"  # noqa: S104 - a webhook listener is public by design
    port: int = Field(default=8080, ge=0, le=65535)
    auth: Literal["bearer", "basic", "none"] = "bearer"
    bearer_token: SecretStr | None = None
    bearer_token_file: Path | None = None
    basic_username: SecretStr | None = None
    basic_username_file: Path | None = None
    basic_password: SecretStr | None = None
    basic_password_file: Path | None = None
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allowed_ips: list[str] = Field(default_factory=list)
    trusted_proxies: list[str] = Field(default_factory=list)

    @field_validator("allowed_ips", "trusted_proxies")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as e:
                raise ValueError(f"{value!r} is not an IP address or network") from e
        return values

    @model_validator(mode="after")
    def _check_auth(self) -> WebhookSettings:
        _resolve_secrets(self, "bearer_token", "basic_username", "basic_password")
        if self.auth == "bearer" and not _filled(self.bearer_token):
            raise ValueError("auth = 'bearer' needs bearer_token or bearer_token_file")
        if self.auth == "basic" and not (
            _filled(self.basic_username) and _filled(self.basic_password)
        ):
            raise ValueError("auth = 'basic' needs basic_username and basic_password")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        return self


def _filled(secret: SecretStr | None) -> bool:
    return secret is not None and secret.get_secret_value() != ""


class PollSettings(_Section):
    """The poller: the safety net in hybrid mode, the only source in poll mode."""

    kinds: list[PollKind] = Field(default_factory=lambda: list(POLL_KINDS))
    interval_s: float = Field(default=300.0, gt=0)
    hybrid_interval_s: float | None = Field(default=None, gt=0)
    min_interval_s: float = Field(default=30.0, gt=0)
    start_from: str = "2024-01-01T00:00:00.000Z"
    page_size: int = Field(default=100, ge=1, le=100)
    error_backoff_max_s: float = Field(default=300.0, gt=0)
    order_filters: dict[str, Any] = Field(default_factory=dict)
    shipment_filters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("start_from")
    @classmethod
    def _instant(cls, value: str) -> str:
        try:
            parse_instant(value)
        except InvalidEvent as e:
            raise ValueError(str(e)) from e
        return value


class FetchSettings(_Section):
    """The worker that fetches whole objects for legacy GET webhooks."""

    retry_initial_s: float = Field(default=2.0, gt=0)
    retry_max_s: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=0, ge=0)  # 0: retry until it succeeds
    # A 404 may be an object not visible yet; after this many attempts it is gone (0: never)
    not_found_max_attempts: int = Field(default=20, ge=0)


class AdminSettings(_Section):
    """The admin listener: health, readiness and metrics. Keep it off the public network."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)


class LogSettings(_Section):
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class _HandlerBase(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kinds: list[EventKind] = Field(default_factory=lambda: list(ALL_KINDS))
    event_names: list[str] | None = None
    sources: list[Source] = Field(default_factory=lambda: list(ALL_SOURCES))
    snapshots: bool = True
    concurrency: int = Field(default=4, ge=1, le=256)
    max_attempts: int = Field(default=10, ge=1)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)


class FileHandlerSettings(_HandlerBase):
    """Write each envelope atomically into a drop folder."""

    type: Literal["file"]
    directory: Path
    filename: str = "{id}.json"


class CommandHandlerSettings(_HandlerBase):
    """Run a program with the envelope on stdin."""

    type: Literal["command"]
    command: list[str] = Field(min_length=1)
    permanent_exit_codes: list[int] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None


class HttpHandlerSettings(_HandlerBase):
    """POST each envelope to an internal endpoint."""

    type: Literal["http"]
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    auth: Literal["none", "basic", "bearer"] = "none"
    bearer_token: SecretStr | None = None
    bearer_token_file: Path | None = None
    basic_username: str = ""
    basic_password: SecretStr | None = None
    basic_password_file: Path | None = None

    @model_validator(mode="after")
    def _secrets(self) -> HttpHandlerSettings:
        _resolve_secrets(self, "bearer_token", "basic_password")
        if self.auth == "bearer" and not _filled(self.bearer_token):
            raise ValueError("auth = 'bearer' needs bearer_token or bearer_token_file")
        if self.auth == "basic" and not (self.basic_username and _filled(self.basic_password)):
            raise ValueError("auth = 'basic' needs basic_username and basic_password")
        return self


class PythonHandlerSettings(_HandlerBase):
    """Call a Python function (sync in a thread, or async) with the envelope."""

    type: Literal["python"]
    callable: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


HandlerSettings = Annotated[
    FileHandlerSettings | CommandHandlerSettings | HttpHandlerSettings | PythonHandlerSettings,
    Field(discriminator="type"),
]


class Settings(BaseSettings):
    """The whole configuration, validated once and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="TCBRIDGE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    mode: Mode = "hybrid"
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    store: StoreSettings = Field(default_factory=StoreSettings)
    tradecloud: TradecloudSettings = Field(default_factory=TradecloudSettings)
    webhook: WebhookSettings = Field(default_factory=lambda: WebhookSettings(auth="none"))
    poll: PollSettings = Field(default_factory=PollSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    handlers: list[HandlerSettings] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _check_whole(self) -> Settings:
        names = [h.name for h in self.handlers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"handler names must be unique: {', '.join(duplicates)}")
        if self.mode != "webhook" and not self.tradecloud.username:
            raise ValueError(f"mode = {self.mode!r} polls Tradecloud: set tradecloud.username")
        return self

    @property
    def webhook_enabled(self) -> bool:
        """True when the webhook listener runs."""
        return self.mode in ("webhook", "hybrid")

    @property
    def poll_enabled(self) -> bool:
        """True when the poller runs."""
        return self.mode in ("poll", "hybrid")


SERVICE_MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def service_manager_environ() -> dict[str, str]:
    """What systemd tells its service through the environment (sd_notify, watchdog)."""
    return {k: os.environ[k] for k in SERVICE_MANAGER_VARIABLES if k in os.environ}


def load_settings(path: Path | str) -> Settings:
    """Read, merge with the environment and validate; :class:`ConfigError` names key and file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    try:
        return Settings(**data)
    except ValidationError as e:
        raise ConfigError(_describe(path, e)) from e


def _describe(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for item in error.errors(include_url=False, include_input=False):
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)
