"""Documents downloaded before a handler runs (``documents = "download"``).

Tradecloud's order, line and shipment parts list ``documents[]``, each with an ``objectId``
(Tradecloud's object storage: ``GET /v2/object-storage/document/{objectId}/metadata`` gives a
presigned ``downloadUrl`` that expires within a minute) or a ``url`` (the supplier's own
content server); docs ``order/buyer/receive/download-document.md`` and
``shipment/buyer/receive/download-document.md``.

:class:`DocumentsHandler` wraps a file or command handler: it downloads every document of the
event that no earlier delivered event of the same entity brought (a small per-entity ledger
file under ``documents_dir``), into one folder per event (written as a hidden temp folder,
fsynced, renamed), adds ``documents[]`` to the envelope and then runs the handler. A failed
download is a failed attempt (retried like any other); a 404, a refusal or a document over
``documents_max_bytes`` makes the delivery dead. A ``url`` outside ``documents_allowed_hosts``
is listed with the reason (``skipped``) but not fetched, and the delivery goes on.

It sits between the handlers and the app (it wraps a :class:`~tcbridge.handlers.Handler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog
from yarl import URL

from tcbridge.config import CommandHandlerSettings, FileHandlerSettings, HandlerSettings
from tcbridge.envelope import plain_text
from tcbridge.errors import (
    ApiAuthError,
    ApiError,
    ApiPermanentError,
    DocumentNotFetched,
    HandlerError,
    PermanentError,
)
from tcbridge.files import fsync_directory
from tcbridge.handlers import (
    MAX_FILENAME_BYTES,
    Handler,
    Outcome,
    render_filename,
)
from tcbridge.tradecloud import TradecloudClient

log = structlog.get_logger(__name__)

CHUNK_BYTES = 64 * 1024
MAX_REDIRECTS = 5
METADATA_REFRESHES = 2  # an expired presigned URL is asked for again this often per attempt
MANIFEST = ".tcbridge-documents.json"
LEDGER_DIR = ".ledger"
SAFE_NAME_MAX_BYTES = 120
_EXPIRED_STATUSES = frozenset({400, 403})  # what S3 answers for an expired presigned URL
_RETRY_STATUSES = frozenset({408, 425, 429})
_GONE_STATUSES = frozenset({404, 410})
DocumentSettings = FileHandlerSettings | CommandHandlerSettings


@dataclass(frozen=True, slots=True)
class DocumentRef:
    """One downloadable document named in a payload."""

    key: str  # "objectId:<id>" or "url:<url>": what "already downloaded" is judged on
    object_id: str | None
    url: str | None
    name: str | None
    where: str  # the part of the payload that lists it, e.g. "supplierOrder" or "lines[l1]"


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A document on disk, or (``skipped`` set, no path) one tcbridge would not fetch."""

    ref: DocumentRef
    path: Path | None
    size: int | None
    sha256: str | None
    content_type: str | None
    skipped: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The entry in the envelope's ``documents[]``."""
        return {"objectId": self.ref.object_id, "url": self.ref.url, "name": self.ref.name,
                "where": self.ref.where, "path": None if self.path is None else str(self.path),
                "size": self.size, "sha256": self.sha256, "contentType": self.content_type,
                "skipped": self.skipped}


# --- which documents an event has (pure) -------------------------------------------------------

_ORDER_PARTS = ("buyerOrder", "supplierOrder")
_LINE_PARTS = ("buyerLine", "supplierLine")
_SHIPMENT_PARTS = ("buyerShipment", "supplierShipment")


def document_refs(envelope: Mapping[str, Any]) -> list[DocumentRef]:
    """Every document with an ``objectId`` or a ``url`` in the event, once each, in payload
    order: the object's own ``documents`` (an ``orderDocumentsEvent``), its buyer and supplier
    parts, and for orders each line and its buyer and supplier parts."""
    payload = envelope.get("payload")
    if not isinstance(payload, Mapping):
        return []
    seen: dict[str, DocumentRef] = {}
    for where, holder in _holders(payload, envelope.get("kind") == "shipment"):
        for ref in _refs_in(holder, where):
            seen.setdefault(ref.key, ref)
    return list(seen.values())


def _holders(payload: Mapping[str, Any], shipment: bool) -> Iterator[tuple[str, Any]]:
    yield "", payload
    for part in _SHIPMENT_PARTS if shipment else _ORDER_PARTS:
        yield part, payload.get(part)
    if shipment:
        return
    lines = payload.get("lines")
    for line in lines if isinstance(lines, list) else ():
        if not isinstance(line, Mapping):
            continue
        label = f"lines[{line.get('id')}]"
        yield label, line
        for part in _LINE_PARTS:
            yield f"{label}.{part}", line.get(part)


def _refs_in(holder: object, where: str) -> Iterator[DocumentRef]:
    documents = holder.get("documents") if isinstance(holder, Mapping) else None
    for doc in documents if isinstance(documents, list) else ():
        if not isinstance(doc, Mapping):
            continue
        object_id, url = _text(doc.get("objectId")), _text(doc.get("url"))
        name = _text(doc.get("name"))
        if object_id is not None:
            yield DocumentRef(f"objectId:{object_id}", object_id, None, name, where or "order")
        elif url is not None:
            yield DocumentRef(f"url:{url}", None, url, name, where or "order")


def _text(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def safe_name(text: str, fallback: str) -> str:
    """A plain, non-hidden file name from ``text`` (or ``fallback``), at most
    ``SAFE_NAME_MAX_BYTES`` bytes with its extension kept."""
    cleaned = "".join(c if c.isalnum() or c in "._- " else "_" for c in text).strip(" ")
    return _fit(cleaned.lstrip("."), SAFE_NAME_MAX_BYTES) or fallback


def _fit(name: str, limit: int) -> str:
    # The file system counts bytes: 120 characters of a Japanese file name are 360 bytes,
    # over the 255 of a name, and the download would fail on every attempt.
    if len(name.encode()) <= limit:
        return name
    stem, dot, suffix = name.rpartition(".")
    extension = f".{suffix}" if dot and stem and len(suffix.encode()) <= 15 else ""
    return _cut(stem if extension else name, limit - len(extension.encode())) + extension


def _cut(text: str, limit_bytes: int) -> str:
    """The longest prefix of ``text`` that is at most ``limit_bytes`` in UTF-8."""
    return text.encode()[:limit_bytes].decode("utf-8", "ignore")


# --- fetching one document ------------------------------------------------------------------


class DocumentFetcher:
    """Streams documents to files: object storage through the metadata call, or a ``url`` on an
    allowed host; every download limited to ``max_bytes`` and hashed on the way."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        client: TradecloudClient | None,
        *,
        max_bytes: int,
        allowed_hosts: list[str],
        timeout_s: float,
    ) -> None:
        self._session = session
        self._client = client
        self._max_bytes = max_bytes
        self._allowed = {h.strip("[]") for h in allowed_hosts}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def fetch(self, ref: DocumentRef, directory: Path, taken: set[str]) -> Downloaded:
        """Download ``ref`` into ``directory`` under a name not in ``taken`` (which it joins).

        Raises :class:`PermanentError` (dead) or :class:`HandlerError` (retried).
        """
        if ref.object_id is not None:
            return await self._from_storage(ref, directory, taken)
        assert ref.url is not None
        return await self._from_url(ref, directory, taken)

    async def _from_storage(self, ref: DocumentRef, directory: Path, taken: set[str]) -> Downloaded:
        assert ref.object_id is not None
        if not plain_text(ref.object_id):
            # "..": GET /v2/object-storage/document/../metadata is another path, with our token.
            raise DocumentNotFetched(f"document {ref.object_id!r}: not a usable objectId")
        what = f"document {ref.object_id}"
        for _ in range(METADATA_REFRESHES + 1):
            metadata = await self._metadata(ref.object_id)
            filename = _unique(safe_name(str(metadata.get("filename") or ref.name or ""),
                                         ref.object_id), taken)
            url = URL(str(metadata["downloadUrl"]))
            async with self._get(url, what, allow_redirects=True) as response:
                if response.status in _EXPIRED_STATUSES:
                    # The presigned URL lives under a minute: ask for a fresh one.
                    log.info("documents.url_expired", object_id=ref.object_id,
                             status=response.status)
                    taken.discard(filename)
                    continue
                _judge(response, what)
                content_type = metadata.get("contentType")
                return await self._save(response, ref, directory / filename, what,
                                        content_type if isinstance(content_type, str) else None)
        raise HandlerError(f"{what}: the storage refused {METADATA_REFRESHES + 1} fresh "
                           "download URLs (expired or not yet valid; is the clock right?)")

    async def _metadata(self, object_id: str) -> dict[str, Any]:
        if self._client is None:
            raise PermanentError(f"document {object_id}: no Tradecloud client to ask")
        try:
            return await self._client.document_metadata(object_id)
        except ApiAuthError as e:
            if e.status == 403:
                raise PermanentError(f"document {object_id}: Tradecloud refused access ({e})"
                                     ) from e
            raise HandlerError(f"document {object_id}: {e}") from e
        except ApiPermanentError as e:
            detail = "not found in Tradecloud's object storage" if e.status == 404 else str(e)
            raise PermanentError(f"document {object_id}: {detail}") from e
        except ApiError as e:
            raise HandlerError(f"document {object_id}: {e}") from e

    async def _from_url(self, ref: DocumentRef, directory: Path, taken: set[str]) -> Downloaded:
        assert ref.url is not None
        url = self._allowed_url(ref.url, ref.url)
        what = f"document {ref.url}"
        for _ in range(MAX_REDIRECTS + 1):
            async with self._get(url, what, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location", "")
                    url = self._allowed_url(str(url.join(URL(location))), ref.url)
                    continue
                _judge(response, what)
                name = ref.name or url.name or "document"
                filename = _unique(safe_name(url.name or name, "document"), taken)
                return await self._save(response, ref, directory / filename, what,
                                        response.content_type or None)
        raise PermanentError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _allowed_url(self, text: str, origin: str) -> URL:
        try:
            url = URL(text)
        except (TypeError, ValueError) as e:
            raise DocumentNotFetched(f"document {origin}: not a URL") from e
        if url.scheme not in ("http", "https") or not url.host:
            raise DocumentNotFetched(f"document {origin}: {text!r} is not an http(s) URL")
        if url.host.lower() not in self._allowed:
            raise DocumentNotFetched(f"document {origin}: host {url.host!r} is not in "
                                     "documents_allowed_hosts")
        return url

    @contextlib.asynccontextmanager
    async def _get(
        self, url: URL, what: str, *, allow_redirects: bool
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        try:
            async with self._session.get(url, timeout=self._timeout,
                                         allow_redirects=allow_redirects) as response:
                yield response
        except TimeoutError as e:
            raise HandlerError(f"{what}: timeout") from e
        except aiohttp.TooManyRedirects as e:
            raise PermanentError(f"{what}: too many redirects") from e
        except aiohttp.ClientError as e:
            raise HandlerError(f"{what}: {type(e).__name__}") from e

    async def _save(
        self, response: aiohttp.ClientResponse, ref: DocumentRef, path: Path, what: str,
        content_type: str | None,
    ) -> Downloaded:
        length = response.content_length
        if length is not None and length > self._max_bytes:
            raise PermanentError(f"{what}: {length} bytes, over documents_max_bytes "
                                 f"({self._max_bytes})")
        digest = hashlib.sha256()
        size = 0
        f = await asyncio.to_thread(path.open, "wb")
        try:
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                size += len(chunk)
                if size > self._max_bytes:
                    raise PermanentError(f"{what}: over documents_max_bytes ({self._max_bytes})")
                digest.update(chunk)
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(_flush, f)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise HandlerError(f"{what}: download cut off: {type(e).__name__}") from e
        finally:
            await asyncio.to_thread(f.close)
        return Downloaded(ref, path, size, digest.hexdigest(), content_type)


def _flush(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _judge(response: aiohttp.ClientResponse, what: str) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    if status in _RETRY_STATUSES or status >= 500:
        raise HandlerError(f"{what}: HTTP {status}")
    if status in _GONE_STATUSES:
        raise PermanentError(f"{what}: not found (HTTP {status})")
    raise PermanentError(f"{what}: refused (HTTP {status})")


def _unique(name: str, taken: set[str]) -> str:
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        stem, suffix = name, ""
    candidate, n = name, 1
    while candidate in taken or candidate == MANIFEST:
        n += 1
        candidate = f"{stem}-{n}.{suffix}" if suffix else f"{stem}-{n}"
    taken.add(candidate)
    return candidate


# --- one event's folder, and what was downloaded before ---------------------------------------


def write_json_atomically(path: Path, value: object) -> None:
    """Temp file beside ``path``, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with temp.open("wb") as f:
            f.write(orjson.dumps(value))
            _flush(f)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when it is missing or unreadable."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class Ledger:
    """Which documents of one entity were delivered, by which event: one small JSON file per
    entity under ``<documents_dir>/.ledger``. A lane delivers one entity's events one at a
    time, so the file has a single writer."""

    def __init__(self, root: Path, envelope: Mapping[str, Any]) -> None:
        # An order's documents events and its order events share one ledger.
        family = "shipment" if envelope.get("kind") == "shipment" else "order"
        entity = str(envelope.get("entityId", ""))
        digest = hashlib.sha256(f"{family}\x00{entity}".encode()).hexdigest()[:16]
        self.path = root / LEDGER_DIR / f"{family}-{safe_name(entity, 'entity')[:60]}-{digest}.json"

    def owners(self) -> dict[str, str]:
        """document key -> the id of the event that delivered it."""
        return {k: v for k, v in read_json(self.path).items() if isinstance(v, str)}

    def record(self, keys: list[str], event_id: str) -> None:
        """Remember that ``event_id`` delivered these documents."""
        if keys:
            write_json_atomically(self.path, self.owners() | dict.fromkeys(keys, event_id))


def reuse(folder: Path, refs: list[DocumentRef]) -> list[Downloaded] | None:
    """The documents an earlier attempt of this event left complete in ``folder``, or None."""
    manifest = read_json(folder / MANIFEST)
    entries = manifest.get("documents")
    if not isinstance(entries, list):
        return None
    by_key = {e.get("key"): e for e in entries if isinstance(e, dict)}
    out = []
    for ref in refs:
        entry = by_key.get(ref.key)
        kept = None if entry is None else _reused_entry(ref, entry, folder)
        if kept is None:
            return None
        out.append(kept)
    return out


def _reused_entry(ref: DocumentRef, entry: dict[str, Any], folder: Path) -> Downloaded | None:
    skipped = entry.get("skipped")
    if isinstance(skipped, str):
        return Downloaded(ref, None, None, None, None, skipped)
    path = folder / str(entry.get("file"))
    try:
        if path.stat().st_size != entry.get("size"):
            return None
    except OSError:
        return None
    content_type = entry.get("contentType")
    return Downloaded(ref, path.resolve(), int(entry["size"]), str(entry.get("sha256")),
                      content_type if isinstance(content_type, str) else None)


def publish(temp: Path, folder: Path, downloaded: list[Downloaded]) -> list[Downloaded]:
    """Write the manifest, fsync, and rename ``temp`` to ``folder`` (replacing an older one);
    returns the entries with their final paths."""
    final = [d if d.path is None else Downloaded(d.ref, folder.resolve() / d.path.name, d.size,
                                                 d.sha256, d.content_type)
             for d in downloaded]
    manifest = {"documents": [{"key": d.ref.key, "file": d.path and d.path.name,
                               "size": d.size, "sha256": d.sha256,
                               "contentType": d.content_type, "skipped": d.skipped}
                              for d in final]}
    with (temp / MANIFEST).open("wb") as f:
        f.write(orjson.dumps(manifest))
        _flush(f)
    fsync_directory(temp)
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.{secrets.token_hex(6)}.old"
        os.replace(folder, old)
    os.replace(temp, folder)
    fsync_directory(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- the wrapper ------------------------------------------------------------------------------


class DocumentsHandler:
    """Downloads an event's new documents, then runs the wrapped handler with ``documents[]``."""

    def __init__(
        self,
        settings: DocumentSettings,
        inner: Handler,
        fetcher: DocumentFetcher,
        documents_dir: Path,
        *,
        on_downloaded: Callable[[int], None] | None = None,
    ) -> None:
        self.name = settings.name
        self._settings = settings
        self._inner = inner
        self._fetcher = fetcher
        self._root = documents_dir
        self._on_downloaded = on_downloaded

    async def deliver(self, envelope: Mapping[str, Any], body: bytes, attempt: int) -> Outcome:
        """Download, then deliver; a download failure is this attempt's outcome."""
        event_id = str(envelope.get("id", ""))
        ledger = Ledger(self._root, envelope)
        try:
            owners = await asyncio.to_thread(ledger.owners)
            refs = [r for r in document_refs(envelope) if owners.get(r.key) in (None, event_id)]
            downloaded = await self._materialize(envelope, refs) if refs else []
        except PermanentError as e:
            return Outcome("dead", error=_short(str(e)))
        except HandlerError as e:
            return Outcome("retry", error=_short(str(e)))
        except OSError as e:
            return Outcome("retry", error=_short(f"documents: {type(e).__name__}: {e}"))
        enriched = {**envelope, "documents": [d.as_json() for d in downloaded]}
        outcome = await self._inner.deliver(enriched, _encode(enriched), attempt)
        if outcome.status == "done" and downloaded:
            try:
                keys = [d.ref.key for d in downloaded if d.skipped is None]
                await asyncio.to_thread(ledger.record, keys, event_id)
            except OSError as e:  # delivered; at worst a later event downloads them again
                log.warning("documents.ledger_failed", error=str(e))
        return outcome

    async def close(self) -> None:
        """Close the wrapped handler."""
        await self._inner.close()

    def folder(self, envelope: Mapping[str, Any]) -> Path:
        """Where this event's documents go: next to the envelope file for a file handler,
        else ``<documents_dir>/<kind>/<entity>/<event id>``."""
        settings = self._settings
        if isinstance(settings, FileHandlerSettings):
            name = render_filename(settings.filename, envelope)
            stem = name.rsplit(".", 1)[0] if "." in name else name
            return settings.directory / documents_folder_name(stem)
        family = "shipment" if envelope.get("kind") == "shipment" else "order"
        entity = safe_name(str(envelope.get("entityId", "")), "entity")
        return self._root / family / entity / safe_name(str(envelope.get("id", "")), "event")

    async def _materialize(
        self, envelope: Mapping[str, Any], refs: list[DocumentRef]
    ) -> list[Downloaded]:
        folder = self.folder(envelope)
        kept = await asyncio.to_thread(reuse, folder, refs)
        if kept is not None:
            return kept  # an earlier attempt of this event downloaded them all
        await asyncio.to_thread(folder.parent.mkdir, parents=True, exist_ok=True)
        temp = folder.parent / f".{folder.name}.{secrets.token_hex(6)}.tmp"
        await asyncio.to_thread(temp.mkdir)
        try:
            taken: set[str] = set()
            downloaded = [await self._fetch_or_skip(ref, temp, taken) for ref in refs]
            final = await asyncio.to_thread(publish, temp, folder, downloaded)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, temp, True)
            raise
        fetched = [d for d in final if d.skipped is None]
        if self._on_downloaded is not None:
            self._on_downloaded(len(fetched))
        log.info("documents.downloaded", handler=self.name, count=len(fetched),
                 bytes=sum(d.size or 0 for d in fetched), folder=str(folder))
        return final

    async def _fetch_or_skip(self, ref: DocumentRef, temp: Path, taken: set[str]) -> Downloaded:
        try:
            return await self._fetcher.fetch(ref, temp, taken)
        except DocumentNotFetched as e:
            # Listed, not fetched: an untrusted host must not stall the entity's deliveries.
            log.warning("documents.not_fetched", handler=self.name, reason=str(e))
            return Downloaded(ref, None, None, None, None, skipped=str(e))


def documents_folder_name(stem: str) -> str:
    """``<stem>.documents``, shortened with a digest of the stem when it would not leave room
    for the temp name (``.<name>.<hex>.tmp``) within the file system's limit, as the
    envelope's own name does."""
    name = f"{stem}.documents"
    if len(name.encode()) <= MAX_FILENAME_BYTES:
        return name
    digest = hashlib.sha256(stem.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{_cut(stem, MAX_FILENAME_BYTES - 27)}_{digest}.documents"


def _encode(envelope: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps(envelope)
    except TypeError:  # a lone surrogate from a poll page, as the store keeps it
        return json.dumps(envelope, separators=(",", ":")).encode()


def _short(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def documents_dir(settings: DocumentSettings, store_path: Path) -> Path:
    """The handler's ``documents_dir``, by default ``documents/<handler>`` next to the store."""
    if settings.documents_dir is not None:
        return settings.documents_dir
    return store_path.parent / "documents" / settings.name


def with_documents(
    settings: HandlerSettings,
    handler: Handler,
    session: aiohttp.ClientSession,
    client: TradecloudClient | None,
    store_path: Path,
    on_downloaded: Callable[[str, int], None] | None = None,
) -> Handler:
    """``handler`` itself, or wrapped in a :class:`DocumentsHandler` when the handler's
    settings say ``documents = "download"``."""
    if not isinstance(settings, FileHandlerSettings | CommandHandlerSettings):
        return handler
    if settings.documents != "download":
        return handler
    fetcher = DocumentFetcher(session, client, max_bytes=settings.documents_max_bytes,
                              allowed_hosts=settings.documents_allowed_hosts,
                              timeout_s=settings.timeout_s)
    name = settings.name

    def counted(count: int) -> None:
        if on_downloaded is not None:
            on_downloaded(name, count)

    return DocumentsHandler(settings, handler, fetcher, documents_dir(settings, store_path),
                            on_downloaded=counted)
