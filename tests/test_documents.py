"""Documents downloaded before a handler runs: against the simulator's object storage (the
metadata call and the presigned URL of `order/buyer/receive/download-document.md`) and its
supplier content server, over real loopback HTTP."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tcbridge.config import (
    CommandHandlerSettings,
    FileHandlerSettings,
    Settings,
    TradecloudSettings,
)
from tcbridge.documents import (
    LEDGER_DIR,
    DocumentFetcher,
    DocumentRef,
    DocumentsHandler,
    document_refs,
    safe_name,
    with_documents,
)
from tcbridge.envelope import envelope_dict, parse_order_webhook, parse_shipment_webhook
from tcbridge.errors import (
    ApiAuthError,
    ApiPermanentError,
    ApiTransientError,
    DocumentNotFetched,
    HandlerError,
    PermanentError,
)
from tcbridge.handlers import FileHandler, Outcome
from tcbridge.simulator import Simulator
from tcbridge.tradecloud import TradecloudClient
from tests.conftest import SIM_PASSWORD, SIM_USER

# --- which documents (pure) -------------------------------------------------------------------

DOC = {"code": "123456789", "revision": "B", "name": "Tradecloud API Manual",
       "objectId": "67aa8ece-5d41-496f-a94c-483e360b833b", "type": "General",
       "description": "General document"}
URL_DOC = {"code": "123456789", "revision": "B", "name": "Tradecloud API Manual",
           "url": "http://supplier.com/content/manual.pdf", "type": "General"}


def test_order_documents_on_every_part_once() -> None:
    envelope = {"kind": "order", "payload": {
        "supplierOrder": {"documents": [DOC, URL_DOC]},
        "buyerOrder": {"documents": [DOC | {"objectId": "b-1"}]},
        "lines": [{"id": "l1", "supplierLine": {"documents": [DOC | {"objectId": "s-1"}]},
                   "buyerLine": {"documents": [DOC]}}],   # the same objectId again: once
    }}
    refs = document_refs(envelope)
    assert [(r.key, r.where) for r in refs] == [
        ("objectId:b-1", "buyerOrder"),
        ("objectId:67aa8ece-5d41-496f-a94c-483e360b833b", "supplierOrder"),
        ("url:http://supplier.com/content/manual.pdf", "supplierOrder"),
        ("objectId:s-1", "lines[l1].supplierLine"),
    ]


def test_shipment_and_documents_event_parts() -> None:
    shipment = {"kind": "shipment", "payload": {
        "supplierShipment": {"documents": [DOC]}, "buyerShipment": {"documents": [URL_DOC]},
        "lines": [{"documents": [DOC | {"objectId": "not-a-shipment-part"}]}]}}
    assert [r.where for r in document_refs(shipment)] == ["buyerShipment", "supplierShipment"]
    event = {"kind": "order_documents", "payload": {"documents": [DOC]}}
    assert [r.object_id for r in document_refs(event)] == [DOC["objectId"]]


@pytest.mark.parametrize("payload", [None, [], {"documents": "x"}, {"documents": [None, 1]},
                                     {"supplierOrder": {"documents": [{"name": "no file"}]}},
                                     {"lines": [None, {"documents": [{"objectId": ""}]}]},
                                     {"supplierOrder": {"documents": [{"objectId": 5}]}}])
def test_odd_payloads_have_no_documents(payload: Any) -> None:
    assert document_refs({"kind": "order", "payload": payload}) == []


def test_safe_names() -> None:
    assert safe_name("../../etc/passwd", "x") == "_.._etc_passwd"
    assert safe_name("...", "fallback") == "fallback"
    assert safe_name("Manual v2.pdf", "x") == "Manual v2.pdf"


# --- against the simulator ----------------------------------------------------------------------


@pytest.fixture
async def sim(simulator_factory: Callable[..., Any]) -> tuple[Simulator, str]:
    simulator, url = await simulator_factory()
    result: tuple[Simulator, str] = (simulator, url)
    return result


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def client_for(session: aiohttp.ClientSession, url: str) -> TradecloudClient:
    return TradecloudClient(session, TradecloudSettings(
        base_url=url, username=SIM_USER, password=SIM_PASSWORD, retry_initial_s=0.01,
        retry_max_s=0.05, max_retries=1))


def fetcher(session: aiohttp.ClientSession, url: str, **options: Any) -> DocumentFetcher:
    settings = {"max_bytes": 1 << 20, "allowed_hosts": ["127.0.0.1"], "timeout_s": 5.0}
    return DocumentFetcher(session, client_for(session, url), **(settings | options))


def order_with_documents(
    sim: Simulator, url: str, specs: list[dict[str, Any]], **kwargs: Any
) -> dict[str, Any]:
    """The envelope of the orderDocumentsEvent the simulator sends for new documents."""
    (order,) = sim.add_orders(1, lines=2)
    sim.attach_documents("order", order["id"], specs, base_url=url, **kwargs)
    candidate = parse_order_webhook(sim.changes()[-1].webhook_body)
    return envelope_dict(event_id=f"ev-{len(sim.changes())}", candidate=candidate,
                         received_at="2024-05-01T10:00:00.000Z",
                         changed_line_ids=list(candidate.line_ids), late=False)


def ref_of(envelope: Mapping[str, Any], index: int = 0) -> DocumentRef:
    return document_refs(envelope)[index]


async def test_object_storage_download(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "spec.pdf", "size": 3000}])
    got = await fetcher(session, url).fetch(ref_of(envelope), tmp_path, set())
    content = (tmp_path / "spec.pdf").read_bytes()
    assert got.size == 3000 == len(content)
    assert got.sha256 == hashlib.sha256(content).hexdigest()
    assert got.content_type == "application/pdf"
    assert content == simulator.documents.stored[ref_of(envelope).object_id or ""].content


async def test_an_expired_presigned_url_is_asked_for_again(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "a.pdf"}])
    simulator.documents.expire_next = 1
    got = await fetcher(session, url).fetch(ref_of(envelope), tmp_path, set())
    assert got.size == 1024
    steps = [(e["what"], e.get("refused")) for e in simulator.documents.log]
    assert steps == [("metadata", None), ("download", "Request has expired"),
                     ("metadata", None), ("download", None)]


async def test_urls_that_keep_expiring_are_a_retry(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "a.pdf"}])
    simulator.documents.expire_next = 10
    with pytest.raises(HandlerError, match="refused 3 fresh download URLs") as caught:
        await fetcher(session, url).fetch(ref_of(envelope), tmp_path, set())
    assert not isinstance(caught.value, PermanentError)


async def test_a_missing_document_is_permanent(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "gone.pdf", "missing": True}])
    with pytest.raises(PermanentError, match="not found in Tradecloud's object storage"):
        await fetcher(session, url).fetch(ref_of(envelope), tmp_path, set())


async def test_metadata_unavailable_is_a_retry(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "a.pdf"}])
    simulator.faults.api_error_count = 100  # every /v2 call answers 503
    with pytest.raises(HandlerError, match="HTTP 503") as caught:
        await fetcher(session, url).fetch(ref_of(envelope), tmp_path, set())
    assert not isinstance(caught.value, PermanentError)


@pytest.mark.parametrize("chunked", [False, True])
async def test_the_size_limit_holds_with_and_without_a_length(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path, chunked: bool
) -> None:
    simulator, url = sim
    envelope = order_with_documents(
        simulator, url, [{"filename": "big.bin", "size": 300_000, "chunked": chunked}])
    with pytest.raises(PermanentError, match="over documents_max_bytes"):
        await fetcher(session, url, max_bytes=100_000).fetch(ref_of(envelope), tmp_path, set())


async def test_url_documents_from_an_allowed_host(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "manual.pdf", "url": True,
                                                      "content": "supplier manual"}])
    got = await fetcher(session, url).fetch(ref_of(envelope), tmp_path, set())
    assert (tmp_path / "manual.pdf").read_text() == "supplier manual"
    assert got.ref.url == f"{url}/_sim/content/manual.pdf"


async def test_url_documents_refused_outside_the_allowed_hosts(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    other = url.replace("127.0.0.1", "localhost")  # the same server, another host name
    envelope = order_with_documents(simulator, other, [{"filename": "m.pdf", "url": True}])
    with pytest.raises(DocumentNotFetched, match="'localhost' is not in documents_allowed_hosts"):
        await fetcher(session, url).fetch(ref_of(envelope), tmp_path, set())
    assert not [e for e in simulator.documents.log if e["what"] == "content"]


async def test_no_redirect_to_another_host(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    target = url.replace("127.0.0.1", "localhost") + "/_sim/content/m.pdf"
    envelope = order_with_documents(simulator, url, [
        {"filename": "m.pdf", "url": f"{url}/_sim/redirect?to={target}"}])
    with pytest.raises(DocumentNotFetched, match="'localhost' is not in documents_allowed_hosts"):
        await fetcher(session, url).fetch(ref_of(envelope), tmp_path, set())


async def test_a_redirect_within_the_allowed_hosts_is_followed(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    simulator.attach_documents("order", simulator.add_orders(1)[0]["id"],
                               [{"filename": "m.pdf", "url": True, "content": "moved"}],
                               base_url=url)
    envelope = order_with_documents(simulator, url, [
        {"filename": "x.pdf", "url": f"{url}/_sim/redirect?to=/_sim/content/m.pdf"}])
    got = await fetcher(session, url).fetch(ref_of(envelope), tmp_path, set())
    assert got.path.read_text() == "moved"


async def test_a_url_document_that_is_not_there_is_permanent(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "m.pdf", "url": True,
                                                      "missing": True}])
    with pytest.raises(PermanentError, match=r"not found \(HTTP 404\)"):
        await fetcher(session, url).fetch(ref_of(envelope), tmp_path, set())


async def test_an_unreachable_content_server_is_a_retry(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    from tests.support import free_port

    ref = DocumentRef("url:x", None, f"http://127.0.0.1:{free_port()}/m.pdf", "m", "order")
    with pytest.raises(HandlerError, match="ClientConnectorError") as caught:
        await DocumentFetcher(session, None, max_bytes=10, allowed_hosts=["127.0.0.1"],
                              timeout_s=5).fetch(ref, tmp_path, set())
    assert not isinstance(caught.value, PermanentError)


# --- the wrapper: per-event folder, ledger, outcomes ------------------------------------------


class Recorder:
    """A handler that records what it got and answers scripted outcomes."""

    name = "rec"

    def __init__(self) -> None:
        self.envelopes: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.outcomes: list[Outcome] = []

    async def deliver(self, envelope: Mapping[str, Any], body: bytes, attempt: int) -> Outcome:
        self.envelopes.append(dict(envelope))
        self.bodies.append(body)
        return self.outcomes.pop(0) if self.outcomes else Outcome("done")

    async def close(self) -> None:
        pass


def command_settings(tmp_path: Path, **options: Any) -> CommandHandlerSettings:
    return CommandHandlerSettings(name="rec", type="command", command=["true"],
                                  documents="download", documents_dir=tmp_path / "docs",
                                  documents_allowed_hosts=["127.0.0.1"], **options)


def wrap(settings: Any, inner: Any, session: aiohttp.ClientSession, url: str) -> DocumentsHandler:
    handler = with_documents(settings, inner, session, client_for(session, url),
                             Path("unused.db"))
    assert isinstance(handler, DocumentsHandler)
    return handler


async def deliver(handler: DocumentsHandler, envelope: dict[str, Any], attempt: int = 1
                  ) -> Outcome:
    return await handler.deliver(envelope, json.dumps(envelope).encode(), attempt)


async def test_the_handler_gets_the_documents_listed(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "a.pdf", "size": 10},
                                                     {"filename": "a.pdf", "size": 20}])
    inner = Recorder()
    handler = wrap(command_settings(tmp_path), inner, session, url)
    assert await deliver(handler, envelope) == Outcome("done")
    (got,) = inner.envelopes
    assert json.loads(inner.bodies[0]) == got
    folder = tmp_path / "docs" / "order" / envelope["entityId"] / envelope["id"]
    assert [(d["path"], d["size"]) for d in got["documents"]] == [
        (str((folder / "a.pdf").resolve()), 10), (str((folder / "a-2.pdf").resolve()), 20)]
    for doc in got["documents"]:
        content = Path(doc["path"]).read_bytes()
        assert doc["sha256"] == hashlib.sha256(content).hexdigest()
        assert doc["objectId"] and doc["url"] is None and doc["where"] == "supplierOrder"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


async def test_documents_are_downloaded_once_per_entity(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    first = order_with_documents(simulator, url, [{"filename": "a.pdf"}])
    simulator.attach_documents("order", first["entityId"], [{"filename": "b.pdf"}], base_url=url)
    candidate = parse_order_webhook(simulator.changes()[-1].webhook_body)
    second = envelope_dict(event_id="ev-second", candidate=candidate, received_at="x",
                           changed_line_ids=[], late=False)
    inner = Recorder()
    handler = wrap(command_settings(tmp_path), inner, session, url)
    assert await deliver(handler, first) == Outcome("done")
    assert await deliver(handler, second) == Outcome("done")
    assert [[Path(d["path"]).name for d in e["documents"]] for e in inner.envelopes] == [
        ["a.pdf"], ["b.pdf"]]  # the second event lists a.pdf too, but it came with the first
    assert len(list((tmp_path / "docs" / LEDGER_DIR).iterdir())) == 1


async def test_a_retry_reuses_what_the_failed_attempt_downloaded(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "a.pdf"}])
    inner = Recorder()
    inner.outcomes = [Outcome("retry", error="exit code 75")]
    handler = wrap(command_settings(tmp_path), inner, session, url)
    assert (await deliver(handler, envelope)).status == "retry"
    assert await deliver(handler, envelope, attempt=2) == Outcome("done")
    assert inner.envelopes[0]["documents"] == inner.envelopes[1]["documents"] != []
    assert [e["what"] for e in simulator.documents.log].count("download") == 1
    # delivered now: a replay of the same event still lists its own documents
    assert await deliver(handler, envelope, attempt=1) == Outcome("done")
    assert inner.envelopes[2]["documents"] == inner.envelopes[0]["documents"]


async def test_a_failed_handler_does_not_mark_documents_downloaded(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "a.pdf"}])
    inner = Recorder()
    inner.outcomes = [Outcome("dead", error="exit code 65 (permanent)")]
    handler = wrap(command_settings(tmp_path), inner, session, url)
    assert (await deliver(handler, envelope)).status == "dead"
    later = envelope | {"id": "ev-later"}
    assert await deliver(handler, later) == Outcome("done")
    assert len(inner.envelopes[1]["documents"]) == 1  # still not delivered: listed again


async def test_download_failures_are_the_attempts_outcome(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "ok.pdf"},
                                                     {"filename": "gone.pdf", "missing": True}])
    inner = Recorder()
    handler = wrap(command_settings(tmp_path), inner, session, url)
    outcome = await deliver(handler, envelope)
    assert outcome.status == "dead"
    assert outcome.error is not None and "not found in Tradecloud's object storage" in outcome.error
    simulator.faults.api_error_count = 100
    retry = await deliver(handler, envelope | {"id": "ev-2"})
    assert retry.status == "retry" and "HTTP 503" in (retry.error or "")
    assert inner.envelopes == []  # the handler never ran
    leftovers = [p for p in (tmp_path / "docs").rglob("*") if p.name.startswith(".")
                 and p.name != LEDGER_DIR]
    assert leftovers == []  # no temp folders left behind


async def test_events_without_documents_get_an_empty_list(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    inner = Recorder()
    handler = wrap(command_settings(tmp_path), inner, session, "http://127.0.0.1:1")
    assert await deliver(handler, {"id": "e", "kind": "order", "entityId": "o",
                                   "payload": {"lines": []}}) == Outcome("done")
    assert inner.envelopes[0]["documents"] == []


async def test_the_file_handler_puts_documents_next_to_the_envelope(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    (shipment,) = simulator.add_shipments(1)
    simulator.attach_documents("shipment", shipment["id"], [{"filename": "packing-list.pdf"}],
                               base_url=url)
    candidate = parse_shipment_webhook(simulator.changes()[-1].webhook_body)
    envelope = envelope_dict(event_id="ev-s", candidate=candidate, received_at="x",
                             changed_line_ids=[], late=False)
    outbox = tmp_path / "outbox"
    settings = FileHandlerSettings(name="drop", type="file", directory=outbox,
                                   documents="download", documents_dir=tmp_path / "state")
    handler = wrap(settings, FileHandler(settings), session, url)
    assert await deliver(handler, envelope) == Outcome("done")
    written = json.loads((outbox / "ev-s.json").read_text())
    (doc,) = written["documents"]
    assert doc["where"] == "supplierShipment"
    assert Path(doc["path"]) == (outbox / "ev-s.documents" / "packing-list.pdf").resolve()
    assert Path(doc["path"]).stat().st_size == doc["size"] == 1024
    assert sorted(p.name for p in outbox.iterdir()) == ["ev-s.documents", "ev-s.json"]


def test_documents_need_the_integration_user(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="download documents"):
        Settings(mode="webhook", handlers=[{"name": "d", "type": "file",
                                            "directory": str(tmp_path),
                                            "documents": "download"}])


def test_other_handlers_are_not_wrapped(tmp_path: Path) -> None:
    settings = FileHandlerSettings(name="f", type="file", directory=tmp_path)
    inner = FileHandler(settings)
    assert with_documents(settings, inner, None, None, tmp_path) is inner  # type: ignore[arg-type]


# --- more failure paths, against a scripted content server --------------------------------------


@pytest.fixture
async def content_server() -> AsyncIterator[str]:
    from aiohttp import web

    async def status(request: web.Request) -> web.StreamResponse:
        code = int(request.match_info["code"])
        return web.Response(status=code, text="answer")

    async def loop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/loop")

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        request.transport.close()  # type: ignore[union-attr]
        return response

    app = web.Application()
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/loop", loop)
    app.router.add_get("/cut", cut)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def url_ref(url: str) -> DocumentRef:
    return DocumentRef(f"url:{url}", None, url, "doc", "supplierOrder")


def plain_fetcher(session: aiohttp.ClientSession, client: Any = None) -> DocumentFetcher:
    return DocumentFetcher(session, client, max_bytes=1 << 20, allowed_hosts=["127.0.0.1"],
                           timeout_s=5)


@pytest.mark.parametrize(("path", "error", "match"), [
    ("/status/403", PermanentError, r"refused \(HTTP 403\)"),
    ("/status/410", PermanentError, r"not found \(HTTP 410\)"),
    ("/status/503", HandlerError, "HTTP 503"),
    ("/status/429", HandlerError, "HTTP 429"),
    ("/loop", PermanentError, "more than 5 redirects"),
    ("/cut", HandlerError, "download cut off"),
])
async def test_content_server_answers(
    content_server: str, session: aiohttp.ClientSession, tmp_path: Path, path: str,
    error: type[Exception], match: str,
) -> None:
    with pytest.raises(error, match=match) as caught:
        await plain_fetcher(session).fetch(url_ref(content_server + path), tmp_path, set())
    assert isinstance(caught.value, PermanentError) is (error is PermanentError)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "not a url"])
async def test_only_http_urls(session: aiohttp.ClientSession, tmp_path: Path, url: str) -> None:
    with pytest.raises(DocumentNotFetched):
        await plain_fetcher(session).fetch(url_ref(url), tmp_path, set())


class RefusingClient:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def document_metadata(self, object_id: str) -> dict[str, Any]:
        raise self.error


@pytest.mark.parametrize(("error", "permanent", "match"), [
    (ApiAuthError("tradecloud x: credentials refused (HTTP 403)", status=403), True,
     "Tradecloud refused access"),
    (ApiAuthError("tradecloud x: credentials refused (HTTP 401)", status=401), False,
     "HTTP 401"),
    (ApiPermanentError("tradecloud x: HTTP 422", status=422), True, "HTTP 422"),
    (ApiTransientError("tradecloud x: timeout after 2 attempts"), False, "timeout"),
])
async def test_metadata_errors(
    session: aiohttp.ClientSession, tmp_path: Path, error: Exception, permanent: bool,
    match: str,
) -> None:
    ref = DocumentRef("objectId:o", "o", None, "doc", "supplierOrder")
    with pytest.raises(HandlerError, match=match) as caught:
        await plain_fetcher(session, RefusingClient(error)).fetch(ref, tmp_path, set())
    assert isinstance(caught.value, PermanentError) is permanent


async def test_no_client_means_no_object_storage(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    ref = DocumentRef("objectId:o", "o", None, "doc", "supplierOrder")
    with pytest.raises(PermanentError, match="no Tradecloud client"):
        await plain_fetcher(session).fetch(ref, tmp_path, set())


async def test_an_unwritable_documents_dir_is_a_retry(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "a.pdf"}])
    blocker = tmp_path / "docs"
    blocker.write_text("a file where the folder should be")
    inner = Recorder()
    handler = wrap(command_settings(tmp_path), inner, session, url)
    outcome = await deliver(handler, envelope)
    assert outcome.status == "retry" and "documents:" in (outcome.error or "")
    assert inner.envelopes == []


async def test_a_ledger_that_cannot_be_written_keeps_the_delivery_done(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "a.pdf"}])
    handler = wrap(command_settings(tmp_path), Recorder(), session, url)

    def broken(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tcbridge.documents.Ledger.record", broken)
    assert await deliver(handler, envelope) == Outcome("done")


WEBHOOK = {"auth": "bearer", "bearer_token": "t" * 32}


def test_handlers_do_not_share_a_documents_dir(tmp_path: Path) -> None:
    handler = {"type": "command", "command": ["true"], "documents": "download",
               "documents_dir": str(tmp_path / "docs")}
    with pytest.raises(ValueError, match="must not share a documents_dir"):
        Settings(mode="webhook", tradecloud={"username": "u"}, webhook=WEBHOOK,
                 handlers=[handler | {"name": "a"}, handler | {"name": "b"}])
    Settings(mode="webhook", tradecloud={"username": "u"}, webhook=WEBHOOK,
             handlers=[handler | {"name": "a"}, handler | {"name": "b", "documents": "none"}])


async def test_a_url_outside_the_allowed_hosts_is_listed_not_fetched(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    elsewhere = url.replace("127.0.0.1", "localhost") + "/_sim/content/x.pdf"
    envelope = order_with_documents(simulator, url, [{"filename": "a.pdf"},
                                                     {"filename": "x.pdf", "url": elsewhere}])
    inner = Recorder()
    inner.outcomes = [Outcome("retry", error="exit code 75")]
    handler = wrap(command_settings(tmp_path), inner, session, url)
    assert (await deliver(handler, envelope)).status == "retry"
    assert await deliver(handler, envelope, attempt=2) == Outcome("done")
    first, second = inner.envelopes
    assert first["documents"] == second["documents"]  # the retry reused both entries
    stored, skipped = first["documents"]
    assert stored["path"] and stored["skipped"] is None
    assert skipped["url"] == elsewhere and skipped["path"] is None and skipped["size"] is None
    assert "'localhost' is not in documents_allowed_hosts" in skipped["skipped"]
    assert not [e for e in simulator.documents.log if e["what"] == "content"]
    # only the downloaded one is remembered: a later event lists the skipped one again
    later = envelope | {"id": "ev-later"}
    assert await deliver(handler, later) == Outcome("done")
    assert [d["url"] for d in inner.envelopes[2]["documents"]] == [elsewhere]


# --- names that must fit the file system (255 bytes a name) -------------------------------------


def test_safe_names_fit_in_bytes_and_keep_the_extension() -> None:
    # A supplier's file name in Japanese: 120 characters are 360 bytes in UTF-8.
    name = safe_name("出荷報告書" * 40 + ".pdf", "x")
    assert len(name.encode()) <= 120
    assert name.endswith(".pdf") and name.startswith("出荷報告書")
    assert safe_name("a" * 300 + ".pdf", "x") == "a" * 116 + ".pdf"


async def test_a_long_non_ascii_file_name_is_downloaded(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "納品書" * 60 + ".pdf"}])
    inner = Recorder()
    handler = wrap(command_settings(tmp_path), inner, session, url)
    assert await deliver(handler, envelope) == Outcome("done")
    (doc,) = inner.envelopes[0]["documents"]
    assert Path(doc["path"]).name.endswith(".pdf") and Path(doc["path"]).stat().st_size == 1024


async def test_the_documents_folder_of_a_long_envelope_name_fits(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    simulator, url = sim
    envelope = order_with_documents(simulator, url, [{"filename": "a.pdf"}])
    # Ids reach 200 characters: the longest envelope name the handler allows (237 bytes).
    envelope["entityId"] = "o" * (237 - len(f"-{envelope['eventName']}.json"))
    outbox = tmp_path / "outbox"
    settings = FileHandlerSettings(name="drop", type="file", directory=outbox,
                                   filename="{entityId}-{eventName}.json",
                                   documents="download", documents_dir=tmp_path / "state")
    handler = wrap(settings, FileHandler(settings), session, url)
    assert await deliver(handler, envelope) == Outcome("done")
    (written,) = [p for p in outbox.iterdir() if p.suffix == ".json"]
    (doc,) = json.loads(written.read_text())["documents"]
    assert Path(doc["path"]).parent.parent == outbox.resolve()
    assert Path(doc["path"]).parent.name.endswith(".documents")
    assert Path(doc["path"]).stat().st_size == 1024


@pytest.mark.parametrize("object_id", ["..", ".", "a\x1bb"])
async def test_an_object_id_that_is_no_id_is_listed_not_asked_for(
    sim: tuple[Simulator, str], session: aiohttp.ClientSession, tmp_path: Path, object_id: str
) -> None:
    # GET /v2/object-storage/document/../metadata would be GET /v2/object-storage/metadata,
    # with the integration user's token.
    simulator, url = sim
    ref = DocumentRef(f"objectId:{object_id}", object_id, None, "x", "order")
    with pytest.raises(DocumentNotFetched, match="not a usable objectId"):
        await fetcher(session, url).fetch(ref, tmp_path, set())
    assert not [r for r in simulator.requests if "object-storage" in str(r)]
