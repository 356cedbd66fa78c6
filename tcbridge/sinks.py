"""Broker sinks: handlers that publish each envelope to RabbitMQ (AMQP) or NATS JetStream.

The exchange and the stream belong to the operator: tcbridge publishes into them and never
declares or creates them, so a missing one is a failed (retried) attempt with a clear error,
never a silently created destination nobody consumes. The event id travels as the broker's
deduplication id (AMQP ``message_id``, NATS ``Nats-Msg-Id``), so a delivery repeated after a
crash can be dropped (JetStream's duplicate window does it; an AMQP consumer does it on
``message_id``). An attempt is done only when the broker has taken responsibility for the
message: a publisher confirm (AMQP) or the stream's ack (JetStream).

Each handler keeps one connection, opened on the first delivery (a broker that is down at
start-up only fails attempts, it never stops the daemon) and closed at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aio_pika
import nats.errors
import nats.js
import nats.js.errors
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelNotFoundEntity, PublishError
from nats.aio.client import Client as NatsClient
from yarl import URL

from tcbridge.config import AmqpHandlerSettings, NatsHandlerSettings
from tcbridge.errors import describe
from tcbridge.handlers import DONE, Handler, Outcome, _short, _timeout_error
from tcbridge.templates import MAX_ROUTING_KEY_BYTES, render_template, routing_key_fits

log = structlog.get_logger(__name__)

CLOSE_TIMEOUT_S = 5.0
NATS_EXPECTED_STREAM_MISMATCH = 10060  # JetStream err_code: "expected stream does not match"


def build_sink(settings: AmqpHandlerSettings | NatsHandlerSettings) -> Handler:
    """The broker handler for one ``[[handlers]]`` section (its settings are checked)."""
    if isinstance(settings, AmqpHandlerSettings):
        return AmqpHandler(settings)
    return NatsHandler(settings)


def _headers(envelope: Mapping[str, Any]) -> dict[str, str]:
    """What a consumer can route or filter on without parsing the body."""
    headers = {
        "Tcbridge-Kind": str(envelope.get("kind", "")),
        "Tcbridge-Entity-Id": str(envelope.get("entityId", "")),
        "Tcbridge-Source": str(envelope.get("source", "")),
    }
    if envelope.get("eventName") is not None:
        headers["Tcbridge-Event-Name"] = str(envelope["eventName"])
    return headers


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext | None:
    return None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))


# --- amqp -------------------------------------------------------------------------------------


class AmqpHandler:
    """Publishes each envelope, persistent and mandatory, with publisher confirms."""

    def __init__(self, settings: AmqpHandlerSettings) -> None:
        self.name = settings.name
        self._settings = settings
        assert settings.url is not None  # the settings refuse a missing url
        self._url = URL(settings.url.get_secret_value())
        self._ssl = _ssl_context(settings.ca_file)
        # Where, for error messages: never the credentials.
        self._where = str(self._url.with_user(None).with_query(None))
        self._secrets = tuple(s for s in (self._url.password, self._url.raw_password) if s)
        self._lock = asyncio.Lock()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def deliver(self, envelope: Mapping[str, Any], body: bytes, attempt: int) -> Outcome:
        """Publish once; done when the broker confirms it, retried on any failure."""
        routing_key = render_template(self._settings.routing_key, envelope)
        if not routing_key_fits(routing_key):
            return Outcome("dead", error=f"routing key longer than {MAX_ROUTING_KEY_BYTES} bytes")
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(envelope.get("id", "")),  # the consumer's deduplication key
            app_id="tcbridge",
            headers=dict(_headers(envelope)),
        )
        timeout_s = self._settings.timeout_s
        exchange: AbstractExchange | None = None
        try:
            async with asyncio.timeout(timeout_s):
                exchange = await self._ready(timeout_s)
                # mandatory: a message no queue takes comes back (basic.return) and fails
                # the publish, instead of being confirmed and dropped by the broker.
                await exchange.publish(message, routing_key, mandatory=True)
        except TimeoutError:
            if self._connection is None:
                return self._failed(f"cannot connect to {self._where} within {timeout_s:g} s")
            return _timeout_error(timeout_s)
        except PublishError as e:
            return self._failed(self._unroutable(routing_key, e))
        except ChannelNotFoundEntity as e:
            await self._drop_channel(exchange)
            return self._failed(self._not_found(e))
        except CONNECTION_EXCEPTIONS as e:
            await self._drop_channel(exchange)
            return self._failed(f"cannot publish to {self._where}: {describe(e)}")
        return DONE

    async def close(self) -> None:
        """Close the connection (and with it the channel)."""
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await connection.close()

    async def _ready(self, timeout_s: float) -> AbstractExchange:
        """The exchange on an open confirm channel; connects on first use."""
        async with self._lock:
            channel = self._channel
            if self._exchange is not None and channel is not None and not channel.is_closed:
                return self._exchange
            if self._connection is None:
                # Robust: once connected, it reconnects by itself after a broker restart.
                self._connection = await aio_pika.connect_robust(
                    str(self._url), ssl_context=self._ssl, timeout=timeout_s,
                    client_properties={"connection_name": f"tcbridge handler {self.name}"},
                )
            channel = await self._connection.channel(publisher_confirms=True,
                                                     on_return_raises=True)
            try:
                exchange = await self._exchange_on(channel)
            except BaseException:
                await _close_quietly(channel)
                raise
            self._channel, self._exchange = channel, exchange
            return exchange

    async def _exchange_on(self, channel: AbstractRobustChannel) -> AbstractExchange:
        name = self._settings.exchange
        if name == "":
            return channel.default_exchange  # always there; it cannot be declared
        # Passive: check that it exists, never create it. robust=False: a reconnect must not
        # re-declare it either.
        return await channel.declare_exchange(name, passive=True, robust=False)

    async def _drop_channel(self, failed: AbstractExchange | None) -> None:
        """After a channel error the broker closed the channel: open a new one next time
        (unless a concurrent delivery already did: that one is not ours to drop)."""
        if failed is not None and failed is not self._exchange:
            return
        channel, self._channel, self._exchange = self._channel, None, None
        if channel is not None:
            await _close_quietly(channel)

    def _unroutable(self, routing_key: str, error: PublishError) -> str:
        reason = error.args[0] if error.args else "NO_ROUTE"  # the broker's reply_text
        return (f"unroutable: no queue is bound to exchange {self._settings.exchange!r} for "
                f"routing key {routing_key!r} ({reason}); bind a queue or fix routing_key")

    def _not_found(self, error: ChannelNotFoundEntity) -> str:
        return (f"exchange {self._settings.exchange!r} not found on {self._where} "
                f"({describe(error)}); tcbridge never declares it: create it")

    def _failed(self, error: str) -> Outcome:
        for secret in self._secrets:
            error = error.replace(secret, "***")
        return Outcome("retry", error=_short(error))


async def _close_quietly(channel: AbstractChannel) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await channel.close()


# --- nats -------------------------------------------------------------------------------------


class NatsHandler:
    """Publishes each envelope to JetStream; done on the expected stream's ack."""

    def __init__(self, settings: NatsHandlerSettings) -> None:
        self.name = settings.name
        self._settings = settings
        self._servers = [server.strip() for server in settings.url.split(",")]
        self._ssl = _ssl_context(settings.ca_file)
        self._lock = asyncio.Lock()
        self._client: NatsClient | None = None
        self._js: nats.js.JetStreamContext | None = None
        self._last_error = "no answer"

    async def deliver(self, envelope: Mapping[str, Any], body: bytes, attempt: int) -> Outcome:
        """Publish once with ``Nats-Msg-Id`` = event id; a duplicate ack is done too."""
        subject = render_template(self._settings.subject, envelope)
        stream = self._settings.stream
        headers = {"Nats-Msg-Id": str(envelope.get("id", "")), **_headers(envelope)}
        timeout_s = self._settings.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                js = await self._jetstream(timeout_s)
                # stream=: the server refuses the message unless this stream takes it.
                ack = await js.publish(subject, body, timeout=timeout_s, stream=stream,
                                       headers=headers)
        except TimeoutError:
            client = self._client
            if client is None or not client.is_connected:
                # Still connecting, or reconnecting: say why, not just "timeout".
                return self._failed(f"cannot connect to {self._where} within {timeout_s:g} s: "
                                    f"{self._last_error}")
            return _timeout_error(timeout_s)
        except nats.js.errors.NoStreamResponseError:
            return self._failed(f"no stream takes subject {subject!r} (expected stream "
                                f"{stream!r}); tcbridge never creates it: create the stream "
                                "or fix subject")
        except nats.errors.OutboundBufferLimitError:
            return self._failed(f"not connected to {self._where} (reconnecting): "
                                f"{self._last_error}")
        except nats.js.errors.APIError as e:
            return self._failed(self._refused(subject, e))
        except (nats.errors.Error, OSError) as e:
            if self._client is not None and self._client.is_closed:
                await self.close()  # the client gave up (e.g. refused credentials): start anew
            return self._failed(f"cannot publish to {self._where}: {describe(e)}")
        if ack.stream != stream:  # the server checks it; this guards an old server
            return self._failed(f"stored by stream {ack.stream!r}, not {stream!r}")
        if ack.duplicate:
            log.info("handler.nats_duplicate", handler=self.name, event_id=headers["Nats-Msg-Id"],
                     stream=ack.stream, seq=ack.seq)
        return DONE

    async def close(self) -> None:
        """Close the connection."""
        client, self._client, self._js = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await client.close()

    @property
    def _where(self) -> str:
        """The servers, for error messages: never credentials written into a url."""
        return ",".join(str(URL(server).with_user(None)) for server in self._servers)

    async def _jetstream(self, timeout_s: float) -> nats.js.JetStreamContext:
        async with self._lock:
            if self._js is not None:
                return self._js
            client = NatsClient()
            try:
                await client.connect(**self._connect_options(timeout_s))
            except BaseException:
                # A failed or cancelled first connect must leave no reconnect loop behind.
                with contextlib.suppress(Exception):
                    await client.close()
                raise
            self._client, self._js = client, client.jetstream(timeout=timeout_s)
            return self._js

    def _connect_options(self, timeout_s: float) -> dict[str, Any]:
        s = self._settings
        options: dict[str, Any] = {
            "servers": self._servers,
            "name": f"tcbridge handler {self.name}",
            "connect_timeout": max(1, round(timeout_s)),
            "max_reconnect_attempts": -1,  # once connected, follow the server for ever
            # No buffering while reconnecting: such an attempt fails at once and is retried
            # from the store, instead of timing out and then perhaps still landing later.
            "pending_size": 0,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "tls": self._ssl,
        }
        if s.user and s.password is not None:
            options |= {"user": s.user, "password": s.password.get_secret_value()}
        if s.token is not None:
            options["token"] = s.token.get_secret_value()
        if s.creds_file is not None:
            options["user_credentials"] = str(s.creds_file)
        return options

    async def _on_error(self, error: Exception) -> None:
        self._last_error = describe(error)
        log.debug("handler.nats_error", handler=self.name, error=self._last_error)

    async def _on_disconnected(self) -> None:
        log.warning("handler.nats_disconnected", handler=self.name)

    async def _on_reconnected(self) -> None:
        log.info("handler.nats_reconnected", handler=self.name)

    def _refused(self, subject: str, error: nats.js.errors.APIError) -> str:
        if error.err_code == NATS_EXPECTED_STREAM_MISMATCH:
            return (f"subject {subject!r} belongs to another stream than "
                    f"{self._settings.stream!r}; fix subject or stream")
        return f"JetStream refused the message: {describe(error)}"

    def _failed(self, error: str) -> Outcome:
        for secret in (self._settings.password, self._settings.token):
            if secret is not None and secret.get_secret_value():
                error = error.replace(secret.get_secret_value(), "***")
        return Outcome("retry", error=_short(error))
