"""Simulated documents: Tradecloud's object storage and a supplier's content server.

As the docs describe (`order/buyer/receive/download-document.md`,
`shipment/buyer/receive/download-document.md`): `GET /v2/object-storage/document/{objectId}/
metadata` (Bearer or Basic) answers `{id, filename, contentType, downloadUrl}`, where
`downloadUrl` is an S3-style presigned URL that expires within a minute; the URL itself needs
no credentials. A `url` document points at the supplier's own server, simulated under
`/_sim/content/`. Faults: presigned URLs that are already expired (`expire_next`), documents
listed but not stored (404), large documents, chunked answers without a length, redirects.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tcbridge.simulator.api import (
    basic_credentials,
    bearer_token,
    http_error,
    json_error,
    json_object,
)

if TYPE_CHECKING:
    from tcbridge.simulator.core import Simulator

PRESIGNED_TTL_S = 59  # X-Amz-Expires=59 in the docs' example
STREAM_CHUNK = 64 * 1024


@dataclass(slots=True)
class StoredDocument:
    """One file in the simulated storage or on the content server."""

    object_id: str
    filename: str
    content_type: str
    content: bytes
    chunked: bool = False  # answer without Content-Length


@dataclass(slots=True)
class DocumentStore:
    """The object storage, the content server, their faults and their request log."""

    clock: Callable[[], float] = time.time
    ttl_s: float = PRESIGNED_TTL_S
    expire_next: int = 0  # fault: the next N presigned URLs are issued already expired
    stored: dict[str, StoredDocument] = field(default_factory=dict)
    content: dict[str, StoredDocument] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    _secret: bytes = field(default_factory=lambda: secrets.token_bytes(16))

    def add(self, object_id: str, filename: str, content: bytes, *,
            content_type: str = "application/octet-stream", chunked: bool = False,
            on_server: bool = False) -> StoredDocument:
        """Store a document in the object storage (or on the content server)."""
        doc = StoredDocument(object_id, filename, content_type, content, chunked)
        if on_server:
            self.content[filename] = doc
        else:
            self.stored[object_id] = doc
        return doc

    def presign(self, origin: str, object_id: str) -> str:
        """A presigned download URL for ``object_id``, valid for ``ttl_s``."""
        now = self.clock()
        expires_at = int(now - 1) if self.expire_next > 0 else int(now + self.ttl_s)
        if self.expire_next > 0:
            self.expire_next -= 1
        signature = self._sign(object_id, expires_at)
        return (f"{origin}/_sim/s3/{object_id}?X-Amz-Expires={int(self.ttl_s)}"
                f"&X-Tcb-Expires-At={expires_at}&X-Amz-Signature={signature}")

    def _sign(self, object_id: str, expires_at: int) -> str:
        message = f"{object_id}:{expires_at}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def valid(self, object_id: str, expires_at: str, signature: str) -> str | None:
        """None when the presigned URL is good, else what S3 would say."""
        try:
            at = int(expires_at)
        except ValueError:
            return "AuthorizationQueryParametersError"
        if not hmac.compare_digest(self._sign(object_id, at), signature):
            return "SignatureDoesNotMatch"
        if self.clock() > at:
            return "Request has expired"
        return None


def document_entry(doc: StoredDocument | None, *, object_id: str | None = None,
                   url: str | None = None, name: str, stamp: str | None) -> dict[str, Any]:
    """A `documents[]` entry as Tradecloud lists it on an order, line or shipment part."""
    entry: dict[str, Any] = {"code": f"DOC-{secrets.randbelow(10**6):06d}", "revision": "A",
                             "name": name, "type": "General", "description": name}
    if url is not None:
        entry["url"] = url
    else:
        entry["objectId"] = object_id or (doc.object_id if doc else None)
    if stamp is not None:
        entry["meta"] = {"lastUpdatedAt": stamp}
    return entry


class DocumentRoutes:
    """The metadata endpoint, the presigned download and the supplier content server."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    @property
    def _store(self) -> DocumentStore:
        return self._sim.documents

    def routes(self) -> list[web.RouteDef]:
        """The route table."""
        return [
            web.get("/v2/object-storage/document/{objectId}/metadata", self.metadata),
            web.get("/_sim/s3/{objectId}", self.download),
            web.get("/_sim/content/{name}", self.content),
            web.get("/_sim/redirect", self.redirect),
            web.post("/_sim/orders/{id}/documents", self.attach("order")),
            web.post("/_sim/shipments/{id}/documents", self.attach("shipment")),
            web.post("/_sim/documents/faults", self.faults),
        ]

    def attach(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        """POST /_sim/{orders,shipments}/{id}/documents {"documents": [spec], "lineId"?}."""

        async def handler(request: web.Request) -> web.Response:
            body = await json_object(request)
            specs = body.get("documents", [{}])
            line_id = body.get("lineId")
            if not isinstance(specs, list) or not all(isinstance(x, dict) for x in specs):
                raise http_error(web.HTTPBadRequest, "documents must be a list of objects")
            try:
                entries = self._sim.attach_documents(
                    kind, request.match_info["id"], specs,
                    line_id=line_id if isinstance(line_id, str) else None,
                    base_url=str(request.url.origin()))
            except KeyError as e:
                raise http_error(web.HTTPNotFound, f"unknown {kind} or line") from e
            return web.json_response(entries)

        return handler

    async def faults(self, request: web.Request) -> web.Response:
        """POST /_sim/documents/faults {"expireNext": n, "ttlS": s}: the new state."""
        body = await json_object(request)
        expire, ttl = body.get("expireNext"), body.get("ttlS")
        if expire is not None:
            if not isinstance(expire, int) or isinstance(expire, bool) or expire < 0:
                raise http_error(web.HTTPBadRequest, "expireNext must be a count")
            self._store.expire_next = expire
        if ttl is not None:
            if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0:
                raise http_error(web.HTTPBadRequest, "ttlS must be positive seconds")
            self._store.ttl_s = float(ttl)
        return web.json_response({"expireNext": self._store.expire_next,
                                  "ttlS": self._store.ttl_s})

    async def metadata(self, request: web.Request) -> web.Response:
        """GET /v2/object-storage/document/{objectId}/metadata (Basic or Bearer)."""
        sim = self._sim
        token = bearer_token(request)
        basic = basic_credentials(request) == (sim.username, sim.password)
        if not (basic or (token is not None and sim.tokens.access_valid(token))):
            return json_error(401, "invalid credentials")
        object_id = request.match_info["objectId"]
        self._store.log.append({"what": "metadata", "objectId": object_id})
        doc = self._store.stored.get(object_id)
        if doc is None:
            return json_error(404, "document not found")
        origin = str(request.url.origin())
        return web.json_response({"id": doc.object_id, "filename": doc.filename,
                                  "contentType": doc.content_type,
                                  "downloadUrl": self._store.presign(origin, object_id)})

    async def download(self, request: web.Request) -> web.StreamResponse:
        """GET the presigned URL: 403 with S3's XML once it expired."""
        object_id = request.match_info["objectId"]
        problem = self._store.valid(object_id, request.query.get("X-Tcb-Expires-At", ""),
                                    request.query.get("X-Amz-Signature", ""))
        self._store.log.append({"what": "download", "objectId": object_id,
                                "refused": problem})
        if problem is not None:
            return web.Response(status=403, content_type="application/xml",
                                text=f"<Error><Code>AccessDenied</Code><Message>{problem}"
                                     "</Message></Error>")
        doc = self._store.stored.get(object_id)
        if doc is None:
            return web.Response(status=404, text="NoSuchKey")
        return await _send(request, doc)

    async def content(self, request: web.Request) -> web.StreamResponse:
        """GET /_sim/content/{name}: the supplier's content server."""
        name = request.match_info["name"]
        self._store.log.append({"what": "content", "name": name})
        doc = self._store.content.get(name)
        if doc is None:
            return web.Response(status=404, text="not found")
        return await _send(request, doc)

    async def redirect(self, request: web.Request) -> web.Response:
        """GET /_sim/redirect?to=URL: a 302 (for the allowed-hosts rule)."""
        raise web.HTTPFound(request.query.get("to", "/"))


async def _send(request: web.Request, doc: StoredDocument) -> web.StreamResponse:
    if not doc.chunked:
        return web.Response(body=doc.content, content_type=doc.content_type)
    response = web.StreamResponse(headers={"Content-Type": doc.content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for start in range(0, len(doc.content), STREAM_CHUNK):
        await response.write(doc.content[start:start + STREAM_CHUNK])
    await response.write_eof()
    return response
