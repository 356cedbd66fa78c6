"""Configuration: one TOML file, overridden by ``TCBRIDGE_`` environment variables.

This is the only module that reads the environment. Everything else receives a
:class:`Settings` (or one of its sections) from its caller.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
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
from tcbridge.templates import check_routing_key, check_subject
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

    # sqlite: one file on this host (path). postgresql: a database several replicas share
    # (dsn, a secret: it may hold a password).
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    path: Path = Path("var/tcbridge.db")
    dsn: SecretStr | None = None
    dsn_file: Path | None = None
    busy_timeout_s: float = Field(default=5.0, gt=0)
    commit_batch_max: int = Field(default=512, ge=1, le=10_000)
    retry_after_s: int = Field(default=5, ge=1, le=3600)
    retention_days: float = Field(default=30.0, gt=0, le=100_000)
    dedup_retention_days: float = Field(default=90.0, gt=0, le=100_000)
    purge_interval_s: float = Field(default=3600.0, gt=0)
    purge_batch: int = Field(default=500, ge=1, le=100_000)
    rejected_body_max_bytes: int = Field(default=64 * 1024, ge=0)
    rejected_max_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _rejected_caps(self) -> StoreSettings:
        if self.rejected_body_max_bytes > self.rejected_max_bytes:
            raise ValueError("rejected_body_max_bytes must not exceed rejected_max_bytes")
        return self

    @model_validator(mode="after")
    def _backend(self) -> StoreSettings:
        _resolve_secrets(self, "dsn")
        if self.backend == "postgresql":
            dsn = "" if self.dsn is None else self.dsn.get_secret_value()
            if not dsn.startswith(("postgresql://", "postgres://")):
                raise ValueError("backend = 'postgresql' needs dsn (or dsn_file): "
                                 "postgresql://user@host:5432/database")
        return self

    @property
    def location(self) -> str:
        """Where the store is, for logs and messages: the file, or the DSN without its
        password."""
        if self.backend == "sqlite":
            return str(self.path)
        return redact_dsn("" if self.dsn is None else self.dsn.get_secret_value())


def redact_dsn(dsn: str) -> str:
    """A DSN with its password replaced, fit for a log line."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1<redacted>@", dsn)


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
    # The search endpoints' cursor filter: lastUpdatedAfter since January 2024 (docs commit
    # "Rename lastUpdatedSince filter to lastUpdatedAfter"); the old, inclusive name for
    # old installations. The poll endpoints always take lastUpdatedAfter.
    search_cursor_filter: Literal["lastUpdatedAfter", "lastUpdatedSince"] = "lastUpdatedAfter"
    # The company's order webhook sends singleDeliveryOrderEvent: poll the single-delivery
    # route so that polled orders have the same line layout (docs api/delivery-schedule.md).
    single_delivery: bool = False

    @property
    def cursor_filter(self) -> str:
        """The filter name the cursor is sent in."""
        return self.search_cursor_filter if self.api == "search" else "lastUpdatedAfter"

    @property
    def cursor_inclusive(self) -> bool:
        """True when the cursor filter returns items stamped at the cursor again."""
        return self.cursor_filter == "lastUpdatedSince"

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/").removesuffix("/v2")

    @model_validator(mode="after")
    def _secrets(self) -> TradecloudSettings:
        _resolve_secrets(self, "password")
        if _placeholder(self.password):
            raise ValueError("password is the example's placeholder: set the integration "
                             "user's password (or password_file)")
        if self.single_delivery and self.api == "search":
            raise ValueError("single_delivery = true needs api = 'poll': the search API "
                             "has no single-delivery route")
        return self


class WebhookSettings(_Section):
    """The listener Tradecloud calls."""

    host: str = "0.0.0.0"  # noqa: S104 - a webhook listener is public by design
    port: int = Field(default=8080, ge=0, le=65535)
    # No default: a listener open to anyone must be asked for (_WEBHOOK_AUTH_CHECKS, and
    # Settings._check_whole when the listener runs).
    auth: Literal["bearer", "basic", "oauth2", "none"] | None = None
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
    # auth = "oauth2": Tradecloud sends an access token of the customer's identity provider.
    oauth2_issuer: str | None = None
    oauth2_audience: str | list[str] = Field(default_factory=list)
    oauth2_jwks_url: str | None = None
    oauth2_required_claims: dict[str, str | list[str]] = Field(default_factory=dict)
    oauth2_leeway_s: float = Field(default=60.0, ge=0, le=600)
    allow_unauthenticated: bool = False
    # A connection is closed when it has not sent a whole request head this long after it
    # opened or after its last answer: idle keep-alive and slow headers alike.
    idle_timeout_s: float = Field(default=15.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    max_connections: int = Field(default=1000, ge=1)
    # Bodies being read and parsed at once (parsing costs up to ~27 times the body size).
    max_parse_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)

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
        if self.auth is not None:
            _WEBHOOK_AUTH_CHECKS[self.auth](self)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        if "max_parse_bytes" not in self.model_fields_set:  # follow a raised max_body_bytes
            object.__setattr__(self, "max_parse_bytes",
                               max(self.max_parse_bytes, 2 * self.max_body_bytes))
        if self.max_parse_bytes < self.max_body_bytes:
            raise ValueError("max_parse_bytes must be at least max_body_bytes")
        return self

    @property
    def oauth2_audiences(self) -> tuple[str, ...]:
        """The accepted audiences (``oauth2_audience`` is one or a list)."""
        audience = self.oauth2_audience
        return (audience,) if isinstance(audience, str) else tuple(audience)


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://")) and len(value) > len("https://")


def _filled(secret: SecretStr | None) -> bool:
    return secret is not None and secret.get_secret_value() != ""


MIN_BEARER_TOKEN_CHARS = 32
FILE_CONCURRENCY = 32  # a file handler's default; every other handler's is 4
# Advice, not a secret (ruff's S105 reads the name).
MAKE_SECRET_HINT = (
    "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"  # noqa: S105
)


def _placeholder(secret: SecretStr | None) -> bool:
    """A value copied from config.example.toml or the README, not a real secret."""
    text = "" if secret is None else secret.get_secret_value().strip().lower()
    return text.startswith(("change-me", "changeme")) or text in ("...", "<secret>")


def _check_bearer(hook: WebhookSettings) -> None:
    if not _filled(hook.bearer_token):
        raise ValueError("auth = 'bearer' needs bearer_token or bearer_token_file")
    if _placeholder(hook.bearer_token):
        raise ValueError(f"bearer_token is the example's placeholder; {MAKE_SECRET_HINT}")
    assert hook.bearer_token is not None
    if len(hook.bearer_token.get_secret_value()) < MIN_BEARER_TOKEN_CHARS:
        raise ValueError(
            f"bearer_token is shorter than {MIN_BEARER_TOKEN_CHARS} characters; {MAKE_SECRET_HINT}"
        )


def _check_basic(hook: WebhookSettings) -> None:
    if not (_filled(hook.basic_username) and _filled(hook.basic_password)):
        raise ValueError("auth = 'basic' needs basic_username and basic_password")
    if _placeholder(hook.basic_password):
        raise ValueError(f"basic_password is the example's placeholder; {MAKE_SECRET_HINT}")


def _check_none(hook: WebhookSettings) -> None:
    if not hook.allow_unauthenticated:
        raise ValueError(
            "auth = 'none' lets anyone who reaches the port post events; "
            "set allow_unauthenticated = true as well if that is really meant"
        )


def _check_oauth2(hook: WebhookSettings) -> None:
    if not hook.oauth2_issuer or not _is_url(hook.oauth2_issuer):
        raise ValueError("auth = 'oauth2' needs oauth2_issuer, an http(s):// URL")
    if not hook.oauth2_audiences or not all(hook.oauth2_audiences):
        raise ValueError("auth = 'oauth2' needs oauth2_audience (a string or a list)")
    if hook.oauth2_jwks_url is not None and not _is_url(hook.oauth2_jwks_url):
        raise ValueError("oauth2_jwks_url must be an http(s):// URL")
    for name, value in hook.oauth2_required_claims.items():
        if not name or value in ("", []):
            raise ValueError(f"oauth2_required_claims: {name!r} needs a value")


# One check per scheme, so a new scheme is one entry here and one in the Literal.
_WEBHOOK_AUTH_CHECKS = {"bearer": _check_bearer, "basic": _check_basic,
                        "oauth2": _check_oauth2, "none": _check_none}


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
    # Each cycle queries from the cursor minus this (0: off), for changes a search index
    # shows late; deduplication absorbs what is seen again.
    lookback_s: float = Field(default=120.0, ge=0, le=86_400)

    @field_validator("order_filters", "shipment_filters")
    @classmethod
    def _nest(cls, value: dict[str, Any]) -> dict[str, Any]:
        return nest_filters(value)

    @field_validator("start_from")
    @classmethod
    def _instant(cls, value: str) -> str:
        try:
            parse_instant(value)
        except InvalidEvent as e:
            raise ValueError(str(e)) from e
        return value


def nest_filters(filters: dict[str, Any]) -> dict[str, Any]:
    """Filters as the API takes them: nested objects (``{"buyerOrder": {"companyId": [..]}}``,
    SDK samples PollOrders.cs, PollShipments.cs). A dotted key such as
    ``"buyerOrder.companyId"`` is expanded into that nesting and merged with the rest."""
    out: dict[str, Any] = {}
    for key, value in filters.items():
        parts = key.split(".")
        if any(not part for part in parts):
            raise ValueError(f"filter name {key!r} has an empty part")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"filter {key!r} clashes with {part!r}")
            node = child
        leaf = nest_filters(value) if isinstance(value, dict) else value
        last = parts[-1]
        if isinstance(node.get(last), dict) and isinstance(leaf, dict):
            node[last] = _merge(node[last], leaf, key)
        elif last in node:
            raise ValueError(f"filter {key!r} is given twice")
        else:
            node[last] = leaf
    return out


def _merge(a: dict[str, Any], b: dict[str, Any], where: str) -> dict[str, Any]:
    merged = dict(a)
    for key, value in b.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _merge(merged[key], value, f"{where}.{key}")
        elif key in merged:
            raise ValueError(f"filter {where}.{key} is given twice")
        else:
            merged[key] = value
    return merged


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


class NodeSettings(_Section):
    """This replica, among several on one PostgreSQL store (ignored on SQLite)."""

    # How the replica is named in `status`, the heartbeat row and its claims; default
    # "<hostname>:<port>" (app.replica_id). Names must differ between replicas.
    id: str | None = Field(default=None, min_length=1, max_length=200)
    heartbeat_s: float = Field(default=5.0, gt=0, le=3600)
    # How often a standby tries to take the poller lock and the holder checks its
    # connection; failover takes at most about this plus the poll interval.
    lock_check_s: float = Field(default=5.0, gt=0, le=3600)
    # A replica whose heartbeat is older than this is not listed by `status`.
    seen_within_s: float = Field(default=60.0, gt=0)


class DeliverySettings(_Section):
    """Deliveries across replicas (PostgreSQL store; ignored on SQLite)."""

    # A claim holds a delivery for this long and is renewed every third of it while the
    # handler runs; a dead replica's claims become claimable elsewhere after it.
    lease_s: float = Field(default=60.0, ge=1, le=86_400)


class LogSettings(_Section):
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    repeat_burst: int = Field(default=10, ge=1)
    repeat_interval_s: float = Field(default=60.0, gt=0)


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
    # Filters on status (glob patterns, case-sensitive) and echo suppression (meta.source).
    process_status: list[str] | None = Field(default=None, min_length=1)
    logistics_status: list[str] | None = Field(default=None, min_length=1)
    exclude_source_user_ids: list[str] = Field(default_factory=list)
    exclude_source_company_ids: list[str] = Field(default_factory=list)


class _DocumentsOptions(_HandlerBase):
    """Download the event's documents before the handler runs (file and command handlers)."""

    documents: Literal["none", "download"] = "none"
    documents_dir: Path | None = None  # default: a "documents" folder next to the store
    documents_max_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    documents_allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("documents_allowed_hosts")
    @classmethod
    def _hosts(cls, values: list[str]) -> list[str]:
        for value in values:
            bracketed = value.startswith("[") and value.endswith("]")  # an IPv6 literal
            if not value or any(c in value for c in "/@ ") or (":" in value and not bracketed):
                raise ValueError(f"{value!r} is not a host name (no scheme, port or path)")
        return [value.lower() for value in values]


class FileHandlerSettings(_DocumentsOptions):
    """Write each envelope atomically into a drop folder."""

    type: Literal["file"]
    directory: Path
    filename: str = "{id}.json"
    # Files in one batch of the handler's writer process (one claim, one fsync of the
    # folder): cheap slots, unlike an HTTP or command handler's parallel calls.
    concurrency: int = Field(default=FILE_CONCURRENCY, ge=1, le=256)


class CommandHandlerSettings(_DocumentsOptions):
    """Run a program with the envelope on stdin."""

    type: Literal["command"]
    command: list[str] = Field(min_length=1)
    permanent_exit_codes: list[int] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    # Names of the daemon's environment variables the command also gets (besides PATH, LANG,
    # HOME): the rest, secrets given as TCBRIDGE_* above all, stays with the daemon.
    inherit_env: list[str] = Field(default_factory=list)


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


class AmqpHandlerSettings(_HandlerBase):
    """Publish each envelope to a RabbitMQ exchange the operator declared (AMQP 0-9-1)."""

    type: Literal["amqp"]
    url: SecretStr | None = None  # a secret: amqp://user:password@host:5672/vhost
    url_file: Path | None = None
    exchange: str = Field(max_length=255)  # "" is the default exchange (queue name as key)
    routing_key: str = "{kind}.{eventName}"
    ca_file: Path | None = None  # for amqps:// with a private CA

    _routing_key = field_validator("routing_key")(check_routing_key)

    @model_validator(mode="after")
    def _secrets(self) -> AmqpHandlerSettings:
        _resolve_secrets(self, "url")
        if not _filled(self.url):
            raise ValueError("type = 'amqp' needs url or url_file")
        url = self.url.get_secret_value() if self.url is not None else ""
        if not url.startswith(("amqp://", "amqps://")):
            raise ValueError("url must start with amqp:// or amqps://")
        if self.ca_file is not None and not url.startswith("amqps://"):
            raise ValueError("ca_file needs an amqps:// url")
        return self


class NatsHandlerSettings(_HandlerBase):
    """Publish each envelope to a NATS JetStream stream the operator created."""

    type: Literal["nats"]
    url: str = "nats://127.0.0.1:4222"  # several servers of a cluster: comma-separated
    subject: str = "tradecloud.{kind}.{eventName}"
    stream: str = Field(min_length=1, pattern=r"^[^\s.*>]+$")
    user: str = ""
    password: SecretStr | None = None
    password_file: Path | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    creds_file: Path | None = None  # a NATS .creds file (JWT + NKey seed)
    ca_file: Path | None = None  # for tls:// with a private CA

    _subject = field_validator("subject")(check_subject)

    @model_validator(mode="after")
    def _secrets(self) -> NatsHandlerSettings:
        _resolve_secrets(self, "password", "token")
        if bool(self.user) != _filled(self.password):
            raise ValueError("set user and password (or password_file) together")
        ways = [bool(self.user), _filled(self.token), self.creds_file is not None]
        if sum(ways) > 1:
            raise ValueError("use one of user/password, token or creds_file")
        for server in self.url.split(","):
            if not server.strip().startswith(("nats://", "tls://")):
                raise ValueError("url: each server must start with nats:// or tls://")
        return self


HandlerSettings = Annotated[
    FileHandlerSettings | CommandHandlerSettings | HttpHandlerSettings | PythonHandlerSettings
    | AmqpHandlerSettings | NatsHandlerSettings,
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
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    poll: PollSettings = Field(default_factory=PollSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
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
        downloading = [h.name for h in self.handlers
                       if getattr(h, "documents", "none") == "download"]
        if downloading and not self.tradecloud.username:
            raise ValueError(f"handlers {', '.join(downloading)} download documents from "
                             "Tradecloud's object storage: set tradecloud.username")
        # Each downloading handler keeps its own ledger there: sharing one would let one
        # handler's deliveries mark documents as delivered for the other.
        dirs = [str(d) for h in self.handlers
                if (d := getattr(h, "documents_dir", None)) is not None and h.name in downloading]
        shared = sorted({d for d in dirs if dirs.count(d) > 1})
        if shared:
            raise ValueError(f"handlers must not share a documents_dir: {', '.join(shared)}")
        if self.webhook_enabled and self.webhook.auth is None:
            raise ValueError(
                f"mode = {self.mode!r} runs the webhook listener: set [webhook] auth "
                "('bearer', 'basic' or 'oauth2'; 'none' only with allow_unauthenticated = true)"
            )
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


CHILD_BASE_VARIABLES = ("PATH", "LANG", "HOME")
# What the file handler's writer process (``python -m tcbridge.files``) gets besides those:
# where Python finds tcbridge when it is not installed in the interpreter's own site-packages.
WRITER_VARIABLES = ("PYTHONPATH", "PYTHONHOME")


def child_environ(inherit: Sequence[str]) -> dict[str, str]:
    """The part of the daemon's environment a command handler's program inherits: PATH,
    LANG, HOME and the names its configuration lists (``inherit_env``); never the rest."""
    names = (*CHILD_BASE_VARIABLES, *inherit)
    return {k: os.environ[k] for k in names if k in os.environ}


def secret_values(model: BaseModel) -> tuple[str, ...]:
    """Every secret of the settings (each SecretStr, wherever it is), longest first, so
    output that is kept can be redacted."""
    found: set[str] = set()

    def walk(value: object) -> None:
        if isinstance(value, SecretStr):
            found.add(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(model)
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def load_settings(path: Path | str) -> Settings:
    """Read, merge with the environment and validate; :class:`ConfigError` names key and file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: config file not found") from e
    except PermissionError as e:
        raise ConfigError(
            f"{path}: cannot read config file: {e.strerror} (as uid {os.getuid()}; it holds"
            " no secrets, so mode 0644 lets a service's DynamicUser= account read it)") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    try:
        settings = Settings(**data)
    except ValidationError as e:
        raise ConfigError(_describe(path, e, os.environ)) from e
    return _anchored(settings, path)


def _anchored(settings: Settings, path: Path) -> Settings:
    """A relative ``store.path`` is relative to the configuration file's directory, so
    ``tcbridge status`` from another directory reads the daemon's store, not a new one."""
    if settings.store.path.is_absolute():
        return settings
    base = Path(os.path.abspath(path)).parent
    store = settings.store.model_copy(update={"path": base / settings.store.path})
    return settings.model_copy(update={"store": store})


def _describe(path: Path, error: ValidationError, environ: Mapping[str, str]) -> str:
    lines = [f"{path}: invalid configuration"]
    for item in error.errors(include_url=False, include_input=False):
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        variable = _variable_for(item["loc"], environ)
        where = f" (from the environment variable {variable}, not the file)" if variable else ""
        lines.append(f"  {key}: {message}{where}")
    return "\n".join(lines)


def _variable_for(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> str | None:
    """The ``TCBRIDGE_`` variable that set the value at ``loc`` (or a section around it)."""
    names = {name.upper(): name for name in environ}
    for end in range(len(loc), 0, -1):
        if not all(isinstance(part, str) for part in loc[:end]):
            continue
        wanted = "TCBRIDGE_" + "__".join(str(part) for part in loc[:end]).upper()
        if wanted in names:
            return names[wanted]
    return None
