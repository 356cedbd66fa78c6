"""The simulated Tradecloud's data: orders, shipments, the ground-truth log of changes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from random import Random
from typing import Any, Literal

from tcbridge.simulator import model
from tcbridge.simulator.model import JsonObj
from tcbridge.simulator.query import Indexed

Kind = Literal["order", "shipment"]


@dataclass(frozen=True, slots=True)
class Change:
    """One change to one object, as the ground truth records it and a webhook announces it."""

    kind: Kind
    entity_id: str
    event_name: str
    last_updated_at: str
    seq: int
    webhook_body: JsonObj

    def truth_entry(self) -> dict[str, Any]:
        """The public ground-truth record."""
        return {"kind": self.kind, "entityId": self.entity_id,
                "lastUpdatedAt": self.last_updated_at, "eventName": self.event_name,
                "seq": self.seq}


class World:
    """Stores objects, stamps every change with the clock and tells listeners about it."""

    def __init__(
        self, rng: Random, now_s: Callable[[], float], *, single_delivery: bool = False
    ) -> None:
        self.factory = model.Factory(rng)
        self.single_delivery = single_delivery  # the company's order webhook layout
        self._clock = model.SimClock(now_s)
        self._now_s = now_s
        # A search index is eventually consistent: a change shows in query results only
        # index_delay_s after it is made (until then the previous version shows).
        self.index_delay_s = 0.0
        self._visible: dict[Kind, dict[str, Indexed]] = {"order": {}, "shipment": {}}
        self._indexing: list[tuple[float, Kind, Indexed]] = []
        self._orders: dict[str, Indexed] = {}
        self._shipments: dict[str, Indexed] = {}
        self.changes: list[Change] = []
        self.listeners: list[Callable[[Change], None]] = []

    def add_orders(
        self, count: int, *, same_timestamp: bool, lines: int,
        po_numbers: list[str] | None = None,
    ) -> list[JsonObj]:
        """Issue ``count`` new orders; with ``same_timestamp`` they share one stamp;
        ``po_numbers`` gives the first ones their purchase order numbers."""
        shared = self._clock.next_ms() if same_timestamp else None
        created = []
        numbers = list(po_numbers or [])
        for i in range(count):
            stamp_ms = shared if shared is not None else self._clock.next_ms()
            number = numbers[i] if i < len(numbers) else None
            order = self.factory.order(model.format_ms(stamp_ms), lines, number)
            self._orders[order["id"]] = self._index(order, order["lastUpdatedAt"])
            self._publish("order", self._orders[order["id"]])
            self._order_changed(order, model.ORDER_ISSUED, order["lines"])
            created.append(copy.deepcopy(order))
        return created

    def update_order(
        self, order_id: str, event_name: str, line_count: int, line_ids: list[str] | None = None,
        *, same_timestamp: bool = False,
    ) -> JsonObj:
        """Apply an order event to some lines; KeyError for an unknown order.
        ``same_timestamp``: in the millisecond of the previous change (of any object)."""
        order = self._orders[order_id].obj
        stamp_ms = self._clock.same_ms() if same_timestamp else self._clock.next_ms()
        stamp = model.format_ms(stamp_ms)
        if event_name == model.LINES_ISSUED:
            line_ids = model.add_order_lines(self.factory, order, line_count, stamp)
        elif line_ids is None:
            line_ids = self.factory.pick_lines(order, line_count)
        changed = model.apply_order_event(self.factory, order, event_name, line_ids, stamp)
        self._orders[order_id] = self._index(order, stamp)
        self._publish("order", self._orders[order_id])
        self._order_changed(order, event_name, changed)
        return copy.deepcopy(order)

    def add_shipments(self, count: int, order_ids: list[str] | None) -> list[JsonObj]:
        """Issue ``count`` shipments for the given orders, or for random existing ones."""
        missing = [i for i in order_ids or [] if i not in self._orders]
        if missing:
            raise KeyError(missing[0])
        created = []
        for i in range(count):
            order = self._shipment_order(order_ids, i)
            shipment = self.factory.shipment(model.format_ms(self._clock.next_ms()), order)
            self._shipment_changed(shipment, model.SHIPMENT_ISSUED)
            created.append(copy.deepcopy(shipment))
        return created

    def update_shipment(self, shipment_id: str, event_name: str) -> JsonObj:
        """Apply a shipment event; KeyError for an unknown shipment."""
        shipment = self._shipments[shipment_id].obj
        model.apply_shipment_event(shipment, event_name, model.format_ms(self._clock.next_ms()))
        self._shipment_changed(shipment, event_name)
        return copy.deepcopy(shipment)

    def attach_order_documents(
        self, order_id: str, documents: list[JsonObj] | None = None,
        line_id: str | None = None, event_name: str = "OrderDocumentsAttachedBySupplier",
    ) -> JsonObj:
        """Attach documents to the supplier or buyer part of an order (or of one line) and
        announce them in an order documents webhook without lastUpdatedAt (the order itself is
        not restamped); the webhook body. KeyError for an unknown order or line."""
        order = self._orders[order_id].obj
        stamp = model.format_ms(self._clock.next_ms())
        if documents is None:
            documents = [{"code": f"DOC-{len(self.changes) + 1}", "name": "drawing.pdf",
                          "type": "General", "objectId": self.factory.new_id()}]
        lines = [ln for ln in order["lines"] if ln["id"] == line_id]
        if line_id is not None and not lines:
            raise KeyError(line_id)
        by_buyer = event_name.endswith("ByBuyer")
        side = ("buyerLine" if by_buyer else "supplierLine") if lines else (
            "buyerOrder" if by_buyer else "supplierOrder")
        holder = lines[0].setdefault(side, {}) if lines else order.setdefault(side, {})
        holder.setdefault("documents", []).extend(copy.deepcopy(documents))
        self._publish("order", self._orders[order_id])  # same stamp: the index catches up
        body = model.order_documents_event_body(
            order, documents, event_name, self._meta(stamp, order, event_name), line_id=line_id)
        self._record("order", order_id, event_name, stamp, body)
        return copy.deepcopy(body)

    def attach_shipment_documents(
        self, shipment_id: str, documents: list[JsonObj],
        event_name: str = "ShipmentDocumentAttachedBySupplier",
    ) -> JsonObj:
        """Attach documents to ``supplierShipment.documents`` and announce the shipment."""
        shipment = self._shipments[shipment_id].obj
        stamp = model.format_ms(self._clock.next_ms())
        for doc in documents:
            doc.setdefault("meta", {})["lastUpdatedAt"] = stamp
        shipment["supplierShipment"].setdefault("documents", []).extend(copy.deepcopy(documents))
        shipment["meta"]["lastUpdatedAt"] = stamp
        self._shipment_changed(shipment, event_name)
        return copy.deepcopy(shipment)

    def order(self, order_id: str) -> JsonObj | None:
        """A copy of the whole order, or None."""
        entry = self._orders.get(order_id)
        return copy.deepcopy(entry.obj) if entry else None

    def shipment(self, shipment_id: str) -> JsonObj | None:
        """A copy of the whole shipment, or None."""
        entry = self._shipments.get(shipment_id)
        return copy.deepcopy(entry.obj) if entry else None

    def order_ids(self) -> list[str]:
        """Ids of all orders in creation order."""
        return list(self._orders)

    def shipment_ids(self) -> list[str]:
        """Ids of all shipments in creation order."""
        return list(self._shipments)

    def indexed(self, kind: Kind) -> list[Indexed]:
        """What queries see of ``kind``, with sort keys: copies taken at each change (the
        objects change in place), shown ``index_delay_s`` after it; copy to expose."""
        now = self._now_s()
        due = sorted((e for e in self._indexing if e[0] <= now), key=lambda e: e[0])
        if due:
            self._indexing = [e for e in self._indexing if e[0] > now]
            for _, due_kind, entry in due:
                self._show(due_kind, entry)
        return list(self._visible[kind].values())

    def _publish(self, kind: Kind, entry: Indexed) -> None:
        frozen = Indexed(entry.instant_us, entry.entity_id, entry.stamp, copy.deepcopy(entry.obj))
        if self.index_delay_s <= 0:
            self._show(kind, frozen)
        else:
            self._indexing.append((self._now_s() + self.index_delay_s, kind, frozen))

    def _show(self, kind: Kind, entry: Indexed) -> None:
        shown = self._visible[kind].get(entry.entity_id)
        if shown is None or entry.instant_us >= shown.instant_us:  # never an older version
            self._visible[kind][entry.entity_id] = entry

    def _shipment_order(self, order_ids: list[str] | None, i: int) -> JsonObj | None:
        if order_ids:
            return self._orders[order_ids[i % len(order_ids)]].obj
        if not self._orders:
            return None
        return self._orders[self.factory.rng.choice(list(self._orders))].obj

    def _index(self, obj: JsonObj, stamp: str) -> Indexed:
        return Indexed(model.parse_instant_us(stamp), obj["id"], stamp, obj)

    def _meta(self, stamp: str, order: JsonObj, event_name: str) -> JsonObj:
        side = "supplierOrder" if event_name.endswith("BySupplier") else "buyerOrder"
        company = order.get(side, {}).get("companyId", "")
        return model.message_meta(self.factory.new_id(), self.factory.new_id(), stamp, company)

    def _order_changed(self, order: JsonObj, event_name: str, lines: list[JsonObj]) -> None:
        stamp = order["lastUpdatedAt"]
        body = model.order_event_body(order, lines, event_name,
                                      self._meta(stamp, order, event_name),
                                      single_delivery=self.single_delivery)
        self._record("order", order["id"], event_name, stamp, body)

    def _shipment_changed(self, shipment: JsonObj, event_name: str) -> None:
        stamp = shipment["meta"]["lastUpdatedAt"]
        self._shipments[shipment["id"]] = self._index(shipment, stamp)
        self._publish("shipment", self._shipments[shipment["id"]])
        side = "supplierShipment" if event_name.endswith("BySupplier") else "buyerShipment"
        meta = model.message_meta(self.factory.new_id(), self.factory.new_id(), stamp,
                                  shipment[side]["companyId"])
        body = model.shipment_event_body(shipment, event_name, meta)
        self._record("shipment", shipment["id"], event_name, stamp, body)

    def _record(self, kind: Kind, entity_id: str, event: str, stamp: str, body: JsonObj) -> None:
        change = Change(kind, entity_id, event, stamp, len(self.changes) + 1, body)
        self.changes.append(change)
        for listener in self.listeners:
            listener(change)
