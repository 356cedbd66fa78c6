"""Broker sinks against the real RabbitMQ (127.0.0.1:5672) and NATS JetStream (127.0.0.1:4222).

Each run works in its own RabbitMQ vhost (made with rabbitmqctl, removed after) and each
test in its own exchange/queue or JetStream stream (removed after). Without a server the
tests are skipped with the reason; `.ci/services` makes CI fail instead.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import nats.js
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from nats.aio.client import Client as NatsClient
from nats.js.api import StreamConfig
from pydantic import ValidationError

from tcbridge.config import AmqpHandlerSettings, NatsHandlerSettings, Settings, load_settings
from tcbridge.errors import ConfigError
from tcbridge.handlers import DONE, Handler, Outcome, build_handler
from tcbridge.templates import render_template
from tests.conftest import Daemon, order_event_body, until
from tests.support import free_port, write_config
from tests.test_handlers import encode, make_envelope

RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
NATS_URL = "nats://127.0.0.1:4222"
TOKEN = {"Authorization": "Bearer hook-token-1-for-tests-0123456789ab"}


def reachable(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def rabbit_vhost() -> Iterator[str]:
    """A vhost of this test run, guest allowed everything in it; deleted at the end."""
    if not reachable(RABBIT_PORT):
        pytest.skip(f"no RabbitMQ on {RABBIT_HOST}:{RABBIT_PORT}")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not found: cannot make a vhost for the test run")
    vhost = f"tcbridge-test-{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def amqp_url(rabbit_vhost: str) -> str:
    return f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{rabbit_vhost}"


@dataclass
class Rabbit:
    """The operator's side: declares the exchange and a queue, reads what arrived."""

    url: str
    connection: AbstractRobustConnection
    channel: AbstractChannel
    exchange: str

    async def declare(self, *, bind: str | None = "#") -> str:
        """The topic exchange, and a queue bound with ``bind`` (none: no queue at all)."""
        exchange = await self.channel.declare_exchange(self.exchange, "topic", durable=True)
        if bind is None:
            return ""
        queue = await self.channel.declare_queue(f"{self.exchange}.q", durable=True)
        await queue.bind(exchange, bind)
        return queue.name

    async def drain(self, queue: str, timeout_s: float = 10.0) -> list[AbstractIncomingMessage]:
        """Every message in ``queue`` (acknowledged), waiting a moment for the first."""
        q = await self.channel.get_queue(queue)
        got: list[AbstractIncomingMessage] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            message = await q.get(fail=False)
            if message is not None:
                await message.ack()
                got.append(message)
            elif got or loop.time() > deadline:
                return got
            else:
                await asyncio.sleep(0.05)

    async def exchange_exists(self, name: str) -> bool:
        channel = await self.connection.channel()
        try:
            await channel.declare_exchange(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        await channel.close()
        return True


@pytest.fixture
async def rabbit(amqp_url: str) -> AsyncIterator[Rabbit]:
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    name = f"tcbridge.test.{secrets.token_hex(4)}"
    yield Rabbit(amqp_url, connection, channel, name)
    await connection.close()


@dataclass
class Jet:
    """The operator's side of JetStream: a stream of this test, and reading it back."""

    js: nats.js.JetStreamContext
    stream: str
    prefix: str

    async def messages(self) -> list[Any]:
        info = await self.js.stream_info(self.stream)
        return [await self.js.get_msg(self.stream, seq)
                for seq in range(info.state.first_seq, info.state.last_seq + 1)
                if info.state.messages]


@pytest.fixture
async def jet() -> AsyncIterator[Jet]:
    if not reachable(4222):
        pytest.skip("no NATS on 127.0.0.1:4222")
    client = NatsClient()
    await client.connect(NATS_URL)
    js = client.jetstream()
    token = secrets.token_hex(4)
    stream, prefix = f"TCBRIDGE_TEST_{token}", f"tcbtest{token}"
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"],
                                         duplicate_window=120.0))
    except nats.js.errors.ServiceUnavailableError:
        await client.close()
        pytest.skip("the NATS server on 127.0.0.1:4222 has no JetStream")
    yield Jet(js, stream, prefix)
    await js.delete_stream(stream)
    await client.close()


def amqp_handler(url: str, exchange: str, **settings: Any) -> Handler:
    return build_handler(AmqpHandlerSettings(name="rabbit", type="amqp", url=url,
                                             exchange=exchange, timeout_s=5, **settings), None)


def nats_handler(stream: str, subject: str, **settings: Any) -> Handler:
    return build_handler(NatsHandlerSettings(**({
        "name": "jet", "type": "nats", "url": NATS_URL, "stream": stream, "subject": subject,
        "timeout_s": 5} | settings)), None)


async def deliver(handler: Handler, envelope: dict[str, Any]) -> Outcome:
    return await handler.deliver(envelope, encode(envelope), 1)


def envelopes(count: int) -> list[dict[str, Any]]:
    return [make_envelope(id=secrets.token_hex(16), entityId=f"ORD-{i}") for i in range(count)]


# --- templates and settings (no server) --------------------------------------------------------


def test_templates_fill_from_the_envelope_and_keep_levels_intact() -> None:
    envelope = make_envelope(entityId="a.b*c>d e", eventName="OrderLinesConfirmedBySupplier")
    assert render_template("{kind}.{eventName}", envelope) == "order.OrderLinesConfirmedBySupplier"
    # A value can never add a level or a wildcard to the routing key or subject.
    assert render_template("t.{entityId}", envelope) == "t.a_b_c_d_e"
    snapshot = make_envelope(eventName=None, source="poll")
    assert render_template("{kind}.{eventName}.{source}", snapshot) == "order.snapshot.poll"
    assert render_template("{id}", make_envelope()) == make_envelope()["id"]


@pytest.mark.parametrize(("template", "message"), [
    ("{kind}.{orderId}", "unknown placeholder"),
    ("{kind", "malformed"),
    ("{kind!r}", "unknown placeholder"),
])
def test_a_bad_routing_key_template_is_refused_at_start(template: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        amqp_handler("amqp://127.0.0.1/", "x", routing_key=template)


@pytest.mark.parametrize(("template", "message"), [
    ("{kind}.{nope}", "unknown placeholder"),
    ("tc.*.{kind}", "does not give a NATS subject"),
    ("tc..{kind}", "does not give a NATS subject"),
    ("tc.{kind}.", "does not give a NATS subject"),
    ("tc {kind}", "does not give a NATS subject"),
])
def test_a_bad_subject_template_is_refused_at_start(template: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        nats_handler("S", template)


def test_amqp_settings_read_the_url_from_a_file_and_check_it(tmp_path: Path) -> None:
    secret = tmp_path / "url"
    secret.write_text("amqps://u:p@rabbit.internal:5671/erp\n")
    settings = AmqpHandlerSettings(name="r", type="amqp", url_file=secret, exchange="x")
    assert settings.url is not None
    assert settings.url.get_secret_value() == "amqps://u:p@rabbit.internal:5671/erp"
    assert "p@" not in repr(settings)
    with pytest.raises(ValidationError, match="needs url or url_file"):
        AmqpHandlerSettings(name="r", type="amqp", exchange="x")
    with pytest.raises(ValidationError, match="amqp:// or amqps://"):
        AmqpHandlerSettings(name="r", type="amqp", url="http://x", exchange="x")
    with pytest.raises(ValidationError, match="ca_file needs an amqps:// url"):
        amqp_handler("amqp://127.0.0.1/", "x", ca_file=secret)


def test_check_config_names_the_bad_template(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", {"mode": "webhook", "handlers": [
        {"name": "r", "type": "amqp", "url": "amqp://127.0.0.1/", "exchange": "x",
         "routing_key": "{kind}.{eventname}"}]})
    with pytest.raises(ConfigError, match=r"handlers\.0\.amqp\.routing_key: unknown placeholder"):
        load_settings(path)


def test_nats_settings_take_one_kind_of_credentials(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    settings = NatsHandlerSettings(name="n", type="nats", stream="S", token_file=token)
    assert settings.token is not None and settings.token.get_secret_value() == "s3cret"
    with pytest.raises(ValidationError, match="together"):
        NatsHandlerSettings(name="n", type="nats", stream="S", user="u")
    with pytest.raises(ValidationError, match="one of"):
        NatsHandlerSettings(name="n", type="nats", stream="S", user="u", password="p",
                            token="t")
    with pytest.raises(ValidationError, match="nats:// or tls://"):
        NatsHandlerSettings(name="n", type="nats", stream="S", url="http://x")
    with pytest.raises(ValidationError, match="stream"):
        NatsHandlerSettings(name="n", type="nats", stream="a.b")


def test_the_handler_union_takes_both_types() -> None:
    settings = Settings(mode="webhook", webhook={"auth": "bearer", "bearer_token": "t" * 32},
                        handlers=[
        {"name": "r", "type": "amqp", "url": "amqp://127.0.0.1/", "exchange": "x"},
        {"name": "n", "type": "nats", "stream": "S"},
    ])
    assert [type(h).__name__ for h in settings.handlers] == [
        "AmqpHandlerSettings", "NatsHandlerSettings"]


# --- amqp against RabbitMQ ---------------------------------------------------------------------


async def test_amqp_consumer_receives_each_event_once_persistent_with_its_id(
    rabbit: Rabbit,
) -> None:
    queue = await rabbit.declare(bind="order.*")
    handler = amqp_handler(rabbit.url, rabbit.exchange)
    sent = envelopes(3)
    try:
        assert [await deliver(handler, e) for e in sent] == [Outcome("done")] * 3
    finally:
        await handler.close()
    got = await rabbit.drain(queue)
    assert [m.message_id for m in got] == [e["id"] for e in sent]
    assert [m.body for m in got] == [encode(e) for e in sent]
    first = got[0]
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.content_type == "application/json"
    assert first.routing_key == "order.OrderConfirmedByBuyer"
    assert first.headers["Tcbridge-Entity-Id"] == "ORD-0"


async def test_amqp_repeat_carries_the_same_message_id_for_the_consumer_to_drop(
    rabbit: Rabbit,
) -> None:
    queue = await rabbit.declare()
    handler = amqp_handler(rabbit.url, rabbit.exchange, routing_key="tc.{kind}.{entityId}")
    envelope = make_envelope(id=secrets.token_hex(16))
    try:
        assert await deliver(handler, envelope) == Outcome("done")
        assert await deliver(handler, envelope) == Outcome("done")  # a replay, a crash
    finally:
        await handler.close()
    got = await rabbit.drain(queue)
    # A plain exchange has no dedup: two copies, one message_id, dropped by the consumer.
    assert [m.message_id for m in got] == [envelope["id"]] * 2
    assert {m.routing_key for m in got} == {"tc.order.ORD-1"}


async def test_amqp_unroutable_is_a_failed_attempt_then_done_once_bound(rabbit: Rabbit) -> None:
    await rabbit.declare(bind=None)
    handler = amqp_handler(rabbit.url, rabbit.exchange)
    try:
        outcome = await deliver(handler, make_envelope())
        assert outcome.status == "retry"
        assert "unroutable" in str(outcome.error)
        assert "order.OrderConfirmedByBuyer" in str(outcome.error)
        queue = await rabbit.declare()
        assert await deliver(handler, make_envelope()) == Outcome("done")
    finally:
        await handler.close()
    assert len(await rabbit.drain(queue)) == 1


async def test_amqp_missing_exchange_is_a_failed_attempt_and_never_created(
    rabbit: Rabbit,
) -> None:
    handler = amqp_handler(rabbit.url, rabbit.exchange)
    try:
        outcome = await deliver(handler, make_envelope())
        assert outcome.status == "retry"
        assert f"exchange {rabbit.exchange!r} not found" in str(outcome.error)
        assert "never declares" in str(outcome.error)
        assert "guest:guest" not in str(outcome.error)
        assert not await rabbit.exchange_exists(rabbit.exchange)
        queue = await rabbit.declare()  # the operator creates it: the next attempt is done
        assert await deliver(handler, make_envelope()) == Outcome("done")
    finally:
        await handler.close()
    assert len(await rabbit.drain(queue)) == 1


async def test_amqp_default_exchange_routes_to_the_queue_named_by_the_key(
    rabbit: Rabbit,
) -> None:
    queue = await rabbit.channel.declare_queue(f"{rabbit.exchange}.direct", durable=True)
    handler = amqp_handler(rabbit.url, "", routing_key=queue.name)
    missing = amqp_handler(rabbit.url, "", routing_key="no-such-queue")
    try:
        assert await deliver(handler, make_envelope()) == Outcome("done")
        assert "unroutable" in str((await deliver(missing, make_envelope())).error)
    finally:
        await handler.close()
        await missing.close()
    assert len(await rabbit.drain(queue.name)) == 1


async def test_amqp_broker_down_is_a_failed_attempt_not_a_crash() -> None:
    port = free_port()
    handler = amqp_handler(f"amqp://guest:s3cret@127.0.0.1:{port}/", "x")
    try:
        outcome = await deliver(handler, make_envelope())
    finally:
        await handler.close()
    assert outcome.status == "retry"
    assert f"127.0.0.1:{port}" in str(outcome.error)
    assert "s3cret" not in str(outcome.error)


async def test_amqp_recovers_after_the_broker_closes_the_connection(rabbit: Rabbit) -> None:
    queue = await rabbit.declare()
    handler = amqp_handler(rabbit.url, rabbit.exchange)
    try:
        assert await deliver(handler, make_envelope()) == Outcome("done")
        await asyncio.to_thread(rabbitmqctl, "close_all_connections", "-p",
                                rabbit.url.rsplit("/", 1)[1], "test")
        outcomes: list[Outcome] = []

        async def delivered() -> bool:
            outcomes.append(await deliver(handler, make_envelope()))
            return outcomes[-1].status == "done"

        for _ in range(100):  # failed attempts are fine; never an exception, finally done
            if await delivered():
                break
            await asyncio.sleep(0.2)
        assert outcomes[-1] == Outcome("done"), outcomes
    finally:
        await handler.close()
    # The test's own connection was closed too; robust, it comes back for the check.
    await until(lambda: not rabbit.connection.is_closed)
    assert len(await rabbit.drain(queue)) == 2


# --- nats against JetStream --------------------------------------------------------------------


async def test_nats_consumer_receives_each_event_once_with_its_msg_id(jet: Jet) -> None:
    handler = nats_handler(jet.stream, jet.prefix + ".{kind}.{eventName}")
    sent = envelopes(3)
    try:
        assert [await deliver(handler, e) for e in sent] == [Outcome("done")] * 3
    finally:
        await handler.close()
    got = await jet.messages()
    assert [m.headers["Nats-Msg-Id"] for m in got] == [e["id"] for e in sent]
    assert [m.data for m in got] == [encode(e) for e in sent]
    assert got[0].subject == f"{jet.prefix}.order.OrderConfirmedByBuyer"
    assert got[0].headers["Tcbridge-Kind"] == "order"


async def test_nats_repeated_publish_is_dropped_by_the_stream(jet: Jet) -> None:
    handler = nats_handler(jet.stream, jet.prefix + ".{kind}")
    envelope = make_envelope(id=secrets.token_hex(16))
    try:
        assert await deliver(handler, envelope) == Outcome("done")
        assert await deliver(handler, envelope) == Outcome("done")  # the duplicate ack
    finally:
        await handler.close()
    assert len(await jet.messages()) == 1


async def test_nats_missing_stream_is_a_failed_attempt(jet: Jet) -> None:
    handler = nats_handler("NO_SUCH_STREAM", "nobody.listens.{kind}")
    try:
        outcome = await deliver(handler, make_envelope())
    finally:
        await handler.close()
    assert outcome.status == "retry"
    assert "no stream takes subject 'nobody.listens.order'" in str(outcome.error)
    with pytest.raises(nats.js.errors.NotFoundError):
        await jet.js.stream_info("NO_SUCH_STREAM")  # and it was not created


async def test_nats_ack_from_another_stream_is_refused(jet: Jet) -> None:
    other = f"{jet.stream}_OTHER"
    await jet.js.add_stream(StreamConfig(name=other, subjects=[f"{jet.prefix}other.>"]))
    handler = nats_handler(other, jet.prefix + ".{kind}")  # jet.stream takes this subject
    try:
        outcome = await deliver(handler, make_envelope())
    finally:
        await handler.close()
        await jet.js.delete_stream(other)
    assert outcome.status == "retry"
    assert f"belongs to another stream than {other!r}" in str(outcome.error)
    assert await jet.messages() == []


async def test_nats_server_down_is_a_failed_attempt_not_a_crash() -> None:
    port = free_port()
    handler = nats_handler("S", "tc.{kind}", url=f"nats://u:s3cret@127.0.0.1:{port}",
                           timeout_s=1.5)
    try:
        outcome = await deliver(handler, make_envelope())
    finally:
        await handler.close()
    assert outcome.status == "retry"
    assert f"cannot connect to nats://127.0.0.1:{port}" in str(outcome.error)
    assert "s3cret" not in str(outcome.error)


# --- end to end -------------------------------------------------------------------------------


async def test_daemon_publishes_to_rabbitmq_and_jetstream_once_and_replay_is_deduplicated(
    daemon_factory: Callable[..., Daemon], rabbit: Rabbit, jet: Jet,
) -> None:
    queue = await rabbit.declare(bind="order.#")
    daemon = daemon_factory({"handlers": [
        {"name": "rabbit", "type": "amqp", "url": rabbit.url, "exchange": rabbit.exchange,
         "routing_key": "{kind}.{eventName}", "timeout_s": 5},
        {"name": "jet", "type": "nats", "url": NATS_URL, "stream": jet.stream,
         "subject": jet.prefix + ".{kind}.{entityId}", "timeout_s": 5},
    ]})
    await daemon.start()
    bodies = [order_event_body(f"o{i}") for i in range(5)]
    ids = []
    async with aiohttp.ClientSession() as session:
        for body in [*bodies, bodies[0]]:  # the last one is a duplicate webhook
            async with session.post(f"{daemon.url}/webhook/order", json=body,
                                    headers=TOKEN) as response:
                assert response.status == 200
                ids.append((await response.json())["eventId"])
    consumed: list[AbstractIncomingMessage] = []

    async def count() -> None:
        consumed.extend(await rabbit.drain(queue, timeout_s=0))

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(consumed) < 5 or len(await jet.messages()) < 5:
        assert loop.time() < deadline, daemon.tail()
        await count()
        await asyncio.sleep(0.1)
    # A replay (as after a crash that cut off the confirm) publishes again: JetStream drops
    # it; the AMQP consumer sees the same message_id again and drops it itself.
    assert "queued" in daemon.cli("replay", "--event", ids[0]).stdout
    await daemon.wait_for_log("handler.nats_duplicate", event_id=ids[0])
    while len(consumed) < 6:
        assert loop.time() < deadline, daemon.tail()
        await count()
        await asyncio.sleep(0.1)
    assert await daemon.stop() == 0
    assert len(await jet.messages()) == 5
    assert sorted(m.headers["Nats-Msg-Id"] for m in await jet.messages()) == sorted(set(ids))
    message_ids = [m.message_id for m in consumed]
    assert sorted(set(message_ids)) == sorted(set(ids))
    assert message_ids.count(ids[0]) == 2


async def test_daemon_retries_until_the_operator_creates_the_exchange_and_the_stream(
    daemon_factory: Callable[..., Daemon], rabbit: Rabbit, jet: Jet,
) -> None:
    late_stream, late_prefix = f"{jet.stream}_LATE", f"{jet.prefix}late"
    retry = {"retry_initial_s": 0.05, "retry_max_s": 0.5, "max_attempts": 1000, "timeout_s": 5}
    daemon = daemon_factory({"handlers": [
        {"name": "rabbit", "type": "amqp", "url": rabbit.url, "exchange": rabbit.exchange,
         **retry},
        {"name": "jet", "type": "nats", "url": NATS_URL, "stream": late_stream,
         "subject": late_prefix + ".{kind}", **retry},
    ]})
    await daemon.start()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/webhook/order", json=order_event_body(),
                                headers=TOKEN) as response:
            assert response.status == 200
            event_id = (await response.json())["eventId"]
    # Failed attempts, recorded as rows and retried, each with a clear error.
    (rabbit_retry, *_) = await daemon.wait_for_log("delivery.retry", handler="rabbit", count=2)
    (jet_retry, *_) = await daemon.wait_for_log("delivery.retry", handler="jet", count=2)
    assert f"exchange {rabbit.exchange!r} not found" in rabbit_retry["error"]
    assert "no stream takes subject" in jet_retry["error"]
    queue = await rabbit.declare()
    await jet.js.add_stream(StreamConfig(name=late_stream, subjects=[f"{late_prefix}.>"]))
    try:
        await daemon.wait_for_log("delivery.done", handler="rabbit")
        await daemon.wait_for_log("delivery.done", handler="jet")
        assert await daemon.stop() == 0
        got = [m.headers["Nats-Msg-Id"] for m in await Jet(jet.js, late_stream, "").messages()]
    finally:
        await jet.js.delete_stream(late_stream)
    assert got == [event_id]
    assert [m.message_id for m in await rabbit.drain(queue)] == [event_id]


async def test_amqp_refused_credentials_are_a_failed_attempt(rabbit_vhost: str) -> None:
    handler = amqp_handler(f"amqp://guest:wrong-pw@{RABBIT_HOST}:{RABBIT_PORT}/{rabbit_vhost}",
                           "x")
    try:
        outcome = await deliver(handler, make_envelope())
    finally:
        await handler.close()
    assert outcome.status == "retry"
    assert "cannot publish to amqp://127.0.0.1:5672/" in str(outcome.error)
    assert "wrong-pw" not in str(outcome.error)


class PrivateNats:
    """Our own nats-server processes (JetStream on, auth flags as given) on free ports."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._args: dict[int, tuple[str, ...]] = {}

    def __call__(self, *args: str) -> str:
        port = free_port()
        self._args[port] = args
        self.restart(port)
        return f"nats://127.0.0.1:{port}"

    def restart(self, port: int) -> None:
        """Start (again, on the same port and storage) and wait until it listens."""
        self._procs[port] = subprocess.Popen(
            ["nats-server", "-a", "127.0.0.1", "-p", str(port), "-js",
             "-sd", str(self._directory / f"js{port}"), *self._args[port]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if reachable(port):
                return
            time.sleep(0.05)
        raise AssertionError("nats-server did not start")

    def stop(self, port: int) -> None:
        proc = self._procs.pop(port)
        proc.terminate()
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for port in list(self._procs):
            self.stop(port)


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    if shutil.which("nats-server") is None:
        pytest.skip("nats-server not found")
    servers = PrivateNats(tmp_path)
    yield servers
    servers.stop_all()


@pytest.mark.parametrize("auth", ["user", "token"])
async def test_nats_credentials_are_sent_and_refused_ones_fail_the_attempt(
    private_nats: PrivateNats, tmp_path: Path, auth: str,
) -> None:
    if auth == "user":
        url = private_nats("--user", "tcb", "--pass", "pw-right")
        right, wrong = {"user": "tcb", "password": "pw-right"}, {"user": "tcb",
                                                                 "password": "pw-wrong"}
        connect = {"user": "tcb", "password": "pw-right"}
    else:
        url = private_nats("--auth", "tk-right")
        secret = tmp_path / "token"
        secret.write_text("tk-right\n")
        right, wrong = {"token_file": secret}, {"token": "tk-wrong"}
        connect = {"token": "tk-right"}
    client = NatsClient()
    await client.connect(url, **connect)
    await client.jetstream().add_stream(StreamConfig(name="PRIV", subjects=["priv.>"]))
    await client.close()
    good = nats_handler("PRIV", "priv.{kind}", url=url, **right)
    bad = nats_handler("PRIV", "priv.{kind}", url=url, timeout_s=1.5, **wrong)
    try:
        assert await deliver(good, make_envelope()) == Outcome("done")
        refused = await deliver(bad, make_envelope())
    finally:
        await good.close()
        await bad.close()
    assert refused.status == "retry"
    assert "cannot connect" in str(refused.error)
    assert "wrong" not in str(refused.error)


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "1", "-subj", "/CN=tcbridge test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True,
                       timeout=60)
    return ca, cert, key


async def test_nats_tls_with_a_private_ca_file(
    private_nats: PrivateNats, tmp_path: Path,
) -> None:
    ca, cert, key = make_certificates(tmp_path)
    url = private_nats("--tls", "--tlscert", str(cert), "--tlskey", str(key)).replace(
        "nats://", "tls://")
    client = NatsClient()
    await client.connect(url, tls=ssl.create_default_context(cafile=str(ca)))
    await client.jetstream().add_stream(StreamConfig(name="TLS", subjects=["tls.>"]))
    await client.close()
    trusted = nats_handler("TLS", "tls.{kind}", url=url, ca_file=ca)
    untrusted = nats_handler("TLS", "tls.{kind}", url=url, timeout_s=1.5)
    try:
        assert await deliver(trusted, make_envelope()) == Outcome("done")
        refused = await deliver(untrusted, make_envelope())
    finally:
        await trusted.close()
        await untrusted.close()
    assert refused.status == "retry"
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.error)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def test_amqps_with_a_private_ca_file(rabbit: Rabbit, tmp_path: Path) -> None:
    # RabbitMQ here listens without TLS: a TLS-terminating relay in front of it stands in
    # for an amqps:// listener, so the handler's TLS and CA file meet a real handshake.
    ca, cert, key = make_certificates(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    relays: set[asyncio.Task[Any]] = set()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(RABBIT_HOST, RABBIT_PORT)
        task = asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        relays.add(task)
        await task

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    url = rabbit.url.replace("amqp://", "amqps://").replace(f":{RABBIT_PORT}/", f":{port}/")
    queue = await rabbit.declare()
    trusted = amqp_handler(url, rabbit.exchange, ca_file=ca)
    untrusted = amqp_handler(url, rabbit.exchange)
    try:
        assert await deliver(trusted, make_envelope()) == Outcome("done")
        refused = await deliver(untrusted, make_envelope())
    finally:
        await trusted.close()
        await untrusted.close()
        server.close()
        for task in relays:
            task.cancel()
    assert refused.status == "retry"
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.error)
    assert len(await rabbit.drain(queue)) == 1


async def test_concurrent_deliveries_share_one_connection_and_each_arrives_once(
    rabbit: Rabbit, jet: Jet,
) -> None:
    queue = await rabbit.declare()
    publishers = [amqp_handler(rabbit.url, rabbit.exchange),
                  nats_handler(jet.stream, jet.prefix + ".{entityId}")]
    sent = envelopes(40)
    try:
        for handler in publishers:  # as a lane with concurrency = 40 would call it
            outcomes = await asyncio.gather(*(deliver(handler, e) for e in sent))
            assert outcomes == [Outcome("done")] * len(sent)
    finally:
        for handler in publishers:
            await handler.close()
    ids = sorted(e["id"] for e in sent)
    got = await rabbit.drain(queue)
    while len(got) < len(sent):
        more = await rabbit.drain(queue)
        assert more, "messages missing"
        got += more
    assert sorted(str(m.message_id) for m in got) == ids
    assert sorted(m.headers["Nats-Msg-Id"] for m in await jet.messages()) == ids


async def test_nats_reconnects_after_a_server_restart(
    private_nats: PrivateNats, tmp_path: Path,
) -> None:
    url = private_nats()
    port = int(url.rsplit(":", 1)[1])
    client = NatsClient()
    await client.connect(url)
    await client.jetstream().add_stream(StreamConfig(name="RE", subjects=["re.>"]))
    await client.close()
    handler = nats_handler("RE", "re.{kind}", url=url, timeout_s=2)
    try:
        assert await deliver(handler, make_envelope(id=secrets.token_hex(16))) == DONE
        private_nats.stop(port)
        pending = make_envelope(id=secrets.token_hex(16))
        down = await deliver(handler, pending)
        assert down.status == "retry"
        assert f"127.0.0.1:{port}" in str(down.error)
        private_nats.restart(port)
        outcomes = [await deliver(handler, pending)]
        while outcomes[-1].status != "done":  # the client reconnects by itself
            assert len(outcomes) < 30, outcomes
            await asyncio.sleep(0.2)
            outcomes.append(await deliver(handler, pending))
    finally:
        await handler.close()
    client = NatsClient()
    await client.connect(url)
    info = await client.jetstream().stream_info("RE")
    await client.close()
    assert info.state.messages == 2  # the one before, the one after: none while down
