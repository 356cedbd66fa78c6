"""Control routes under /_sim for tests and demos: make changes, read the logs, set faults."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from tcbridge.simulator.api import http_error, json_object

if TYPE_CHECKING:
    from tcbridge.simulator.core import Simulator


def _field(body: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = body.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise http_error(web.HTTPBadRequest, f"{key} must be {kind.__name__}")
    if isinstance(value, int) and value < 0:
        raise http_error(web.HTTPBadRequest, f"{key} must not be negative")
    return value


class Control:
    """Handlers of the /_sim routes."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    def routes(self) -> list[web.RouteDef]:
        """The /_sim route table."""
        return [
            web.post("/_sim/orders", self.add_orders),
            web.post("/_sim/orders/{id}/update", self.update_order),
            web.post("/_sim/shipments", self.add_shipments),
            web.post("/_sim/shipments/{id}/update", self.update_shipment),
            web.get("/_sim/truth", self.truth),
            web.get("/_sim/requests", self.requests),
            web.get("/_sim/webhooks", self.webhooks),
            web.get("/_sim/faults", self.get_faults),
            web.post("/_sim/faults", self.set_faults),
        ]

    async def add_orders(self, request: web.Request) -> web.Response:
        """POST /_sim/orders {"count", "sameTimestamp", "lines", "purchaseOrderNumbers"}: the
        created orders."""
        body = await json_object(request)
        created = self._sim.add_orders(
            _field(body, "count", int, 1), same_timestamp=_field(body, "sameTimestamp", bool,
                                                                 False),
            lines=_field(body, "lines", int, 3),
            po_numbers=[str(n) for n in _field(body, "purchaseOrderNumbers", list, [])])
        return web.json_response(created)

    async def update_order(self, request: web.Request) -> web.Response:
        """POST /_sim/orders/{id}/update {"eventName", "lineCount", "sameTimestamp"}: the
        changed order."""
        body = await json_object(request)
        event = _field(body, "eventName", str, "OrderLinesConfirmedBySupplier")
        count = _field(body, "lineCount", int, 1)
        same = _field(body, "sameTimestamp", bool, False)
        try:
            order = self._sim.update_order(request.match_info["id"], event_name=event,
                                           line_count=count, same_timestamp=same)
        except KeyError as e:
            raise http_error(web.HTTPNotFound, "unknown order") from e
        return web.json_response(order)

    async def add_shipments(self, request: web.Request) -> web.Response:
        """POST /_sim/shipments {"count", "orderIds"?}: the created shipments."""
        body = await json_object(request)
        order_ids = _field(body, "orderIds", list, []) or None
        try:
            created = self._sim.add_shipments(_field(body, "count", int, 1), order_ids=order_ids)
        except KeyError as e:
            raise http_error(web.HTTPNotFound, "unknown order") from e
        return web.json_response(created)

    async def update_shipment(self, request: web.Request) -> web.Response:
        """POST /_sim/shipments/{id}/update {"eventName"}: the changed shipment."""
        body = await json_object(request)
        event = _field(body, "eventName", str, "ShipmentApprovedByBuyer")
        try:
            shipment = self._sim.update_shipment(request.match_info["id"], event_name=event)
        except KeyError as e:
            raise http_error(web.HTTPNotFound, "unknown shipment") from e
        return web.json_response(shipment)

    async def truth(self, request: web.Request) -> web.Response:
        """GET /_sim/truth: the ground-truth log of changes."""
        return web.json_response(self._sim.truth())

    async def requests(self, request: web.Request) -> web.Response:
        """GET /_sim/requests: the log of API requests."""
        return web.json_response(self._sim.requests)

    async def webhooks(self, request: web.Request) -> web.Response:
        """GET /_sim/webhooks: one record per webhook attempt."""
        return web.json_response(self._sim.webhook_results)

    async def get_faults(self, request: web.Request) -> web.Response:
        """GET /_sim/faults: the current faults."""
        return web.json_response(self._sim.faults.as_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        """POST /_sim/faults: change faults (keys as in Faults, or camelCase); the new state."""
        body = await json_object(request)
        try:
            self._sim.faults.update(body)
        except ValueError as e:
            raise http_error(web.HTTPBadRequest, str(e)) from e
        return web.json_response(self._sim.faults.as_dict())
