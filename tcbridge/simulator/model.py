"""Pure data of the simulated Tradecloud: timestamps, orders, shipments and their events."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from random import Random
from typing import Any

JsonObj = dict[str, Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

ORDER_ISSUED = "OrderIssuedByBuyer"
LINES_ISSUED = "OrderLinesIssuedByBuyer"
LINES_UPDATED_BY_BUYER = "OrderLinesUpdatedByBuyer"
PROPOSED = "OrderChangesProposedBySupplier"
SHIPMENT_ISSUED = "ShipmentIssuedBySupplier"

# What an order event does to the status of the lines it names; unknown events only stamp them.
LINE_EFFECTS: dict[str, dict[str, str | None]] = {
    "OrderLinesAcceptedBySupplier": {"processStatus": "Confirmed", "inProgressStatus": None},
    "OrderLinesConfirmedBySupplier": {"processStatus": "Confirmed", "inProgressStatus": None},
    "OrderLinesConfirmedByBuyer": {"processStatus": "Confirmed", "inProgressStatus": None},
    "OrderLinesRejectedBySupplier": {"processStatus": "Rejected", "inProgressStatus": None},
    PROPOSED: {"processStatus": "InProgress", "inProgressStatus": "OpenSupplierProposal"},
    "OrderChangesProposalApprovedByBuyer": {
        "processStatus": "Confirmed", "inProgressStatus": None},
    "OrderChangesProposalRejectedByBuyer": {
        "processStatus": "InProgress", "inProgressStatus": None},
    LINES_UPDATED_BY_BUYER: {"processStatus": "Issued", "inProgressStatus": None},
    "OrderLinesReopenRequestedByBuyer": {"inProgressStatus": "OpenBuyerReopenRequest"},
    "OrderLinesReopenRequestedBySupplier": {"inProgressStatus": "OpenSupplierReopenRequest"},
    "OrderLinesReconfirmationRequestedByBuyer": {
        "inProgressStatus": "OpenBuyerReconfirmationRequest"},
    "OrderLinesReconfirmedBySupplier": {"processStatus": "Confirmed", "inProgressStatus": None},
    "OrderLinesShipmentRescheduleRequestedBySupplier": {
        "inProgressStatus": "OpenSupplierShipmentRescheduleRequest"},
    "OrderLinesCancelledByBuyer": {
        "processStatus": "Cancelled", "inProgressStatus": None, "logisticsStatus": "Cancelled"},
    "OrderLinesCompletedByBuyer": {"processStatus": "Completed", "inProgressStatus": None},
    "OrderLinesShippedByBuyer": {"logisticsStatus": "Shipped"},
    "OrderLinesMarkedAsDeliveredByBuyer": {"logisticsStatus": "Delivered"},
    "OrderLinesMarkedAsDeliveredBySupplier": {"logisticsStatus": "Delivered"},
}

SHIPMENT_EFFECTS: dict[str, str] = {
    SHIPMENT_ISSUED: "Issued",
    "ShipmentReissuedBySupplier": "Issued",
    "ShipmentApprovedByBuyer": "Approved",
    "ShipmentRejectedByBuyer": "Rejected",
}

_LOGISTICS_ORDER = ("Open", "Produced", "ReadyToShip", "Shipped", "Delivered")
_ITEMS = (
    ("Hex bolt M8x40", 0.12), ("Bearing 6204-2RS", 3.4), ("Gear housing GH-20", 148.0),
    ("Shaft seal 35x52x7", 1.95), ("Aluminium profile 40x40", 22.5), ("PCB controller v3", 61.0),
    ("Hydraulic hose 1/2in", 17.8), ("Stainless sheet 2mm", 84.0), ("Drive belt XPZ-1180", 9.6),
)
_CURRENCIES = ("EUR", "EUR", "EUR", "USD")


def format_ms(epoch_ms: int) -> str:
    """Format epoch milliseconds as Tradecloud's ``YYYY-MM-DDThh:mm:ss.SSSZ``."""
    moment = _EPOCH + timedelta(milliseconds=epoch_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def parse_instant_us(text: str) -> int:
    """Microseconds since the epoch of an ISO 8601 timestamp with a zone; ValueError if not one."""
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    moment = datetime.fromisoformat(raw)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without a time zone: {text!r}")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class SimClock:
    """The simulator's clock: millisecond stamps that strictly increase."""

    def __init__(self, now_s: Callable[[], float]) -> None:
        self._now_s = now_s
        self._last_ms = 0

    def next_ms(self) -> int:
        """A stamp at least 1 ms after the previous one, close to the wall clock."""
        self._last_ms = max(int(self._now_s() * 1000), self._last_ms + 1)
        return self._last_ms

    def same_ms(self) -> int:
        """The previous stamp again: a second change in the same millisecond."""
        return self._last_ms or self.next_ms()


def roll_up_process(statuses: list[str]) -> str:
    """The order-level process status from its lines' statuses."""
    distinct = set(statuses)
    if len(distinct) == 1:
        return statuses[0]
    active = distinct - {"Cancelled"}
    if len(active) == 1:
        return active.pop()
    return "Confirmed" if active <= {"Confirmed", "Completed"} else "InProgress"


def roll_up_logistics(statuses: list[str]) -> str:
    """The order-level logistics status: the least advanced of the lines that are not cancelled."""
    active = [s for s in statuses if s != "Cancelled"]
    if not active:
        return "Cancelled"
    return min(active, key=lambda s: _LOGISTICS_ORDER.index(s) if s in _LOGISTICS_ORDER else 0)


class Factory:
    """Builds realistic orders and shipments from a seeded random generator."""

    def __init__(self, rng: Random) -> None:
        self.rng = rng
        self.buyers = [self.new_id() for _ in range(2)]
        self.suppliers = [self.new_id() for _ in range(3)]
        self._contacts = {c: self.new_id() for c in self.buyers}
        self._po_seq = 100_000
        self._shipment_seq = 0

    def new_id(self) -> str:
        """A uuid4 drawn from the seeded generator."""
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def order(self, stamp: str, line_count: int, po_number: str | None = None) -> JsonObj:
        """A new order in status Issued with ``line_count`` lines, all stamped ``stamp``.

        Its id is Tradecloud's ``<buyerCompanyId>-<purchaseOrderNumber>`` (a number may
        hold "/")."""
        self._po_seq += 1
        buyer = self.rng.choice(self.buyers)
        number = po_number or f"PO-{self._po_seq}"
        lines = [self.line(position, stamp) for position in range(1, line_count + 1)]
        return {
            "id": f"{buyer}-{number}",
            "version": 1,
            "lastUpdatedAt": stamp,
            "buyerOrder": {
                "companyId": buyer,
                "purchaseOrderNumber": number,
                "description": f"Purchase order {self._po_seq}",
                "contact": {"userId": self._contacts[buyer], "email": "buyer@example.com"},
            },
            "supplierOrder": {"companyId": self.rng.choice(self.suppliers)},
            "status": {"processStatus": "Issued", "logisticsStatus": "Open"},
            "lines": lines,
        }

    def line(self, position: int, stamp: str) -> JsonObj:
        """A new order line at ``position``."""
        name, price = self.rng.choice(_ITEMS)
        day = datetime.fromisoformat(stamp[:10]) + timedelta(days=self.rng.randint(10, 60))
        return {
            "id": self.new_id(),
            "buyerLine": {
                "position": f"{position * 10:04d}",
                "item": {"number": f"ITM-{self.rng.randint(1000, 9999)}", "name": name},
                "deliverySchedule": [{"position": "1", "date": day.date().isoformat(),
                                      "quantity": self.rng.randint(1, 50) * 10}],
                "prices": {"grossPrice": {"priceInTransactionCurrency": {
                    "value": round(price * self.rng.uniform(0.9, 1.1), 2),
                    "currencyIso": self.rng.choice(_CURRENCIES)}}},
            },
            "status": {"processStatus": "Issued", "inProgressStatus": None,
                       "logisticsStatus": "Open"},
            "lastUpdatedAt": stamp,
        }

    def shipment(self, stamp: str, order: JsonObj | None) -> JsonObj:
        """A new shipment of some lines of ``order`` (or of an unknown order when None).

        Shaped as docs shipment/buyer/receive/README.md: lines have no id; with more than
        one line, the first ones are loaded in a container (``loadCarriers[].lines``), the
        rest are in ``lines``."""
        self._shipment_seq += 1
        lines = self._shipment_lines(stamp, order)
        loaded = len(lines) // 2
        shipment: JsonObj = {
            "id": self.new_id(),
            "supplierShipment": {"companyId": self.rng.choice(self.suppliers),
                                 "shipmentNumber": f"SHP-{self._shipment_seq:06d}"},
            "buyerShipment": {"companyId": (order or {}).get("buyerOrder", {}).get(
                "companyId", self.rng.choice(self.buyers))},
            "loadCarriers": [],
            "lines": lines[loaded:],
            "status": {"processStatus": "Issued"},
            "meta": {"lastUpdatedAt": stamp},
        }
        if loaded:
            shipment["loadCarriers"] = [{
                "containerNumber": f"TCLU{self._shipment_seq:06d}0", "containerSizeAndType": "22G1",
                "lines": lines[:loaded]}]
        return shipment

    def _shipment_lines(self, stamp: str, order: JsonObj | None) -> list[JsonObj]:
        if order is None:
            refs = [(f"PO-{self.rng.randint(1, 99_999)}", "0010", 10)]
        else:
            count = self.rng.randint(1, len(order["lines"]))
            refs = [(order["buyerOrder"]["purchaseOrderNumber"], ln["buyerLine"]["position"],
                     ln["buyerLine"]["deliverySchedule"][0]["quantity"])
                    for ln in order["lines"][:count]]
        advice = f"DA-{self._shipment_seq:06d}"
        return [{"purchaseOrderNumber": po, "purchaseOrderLinePosition": position,
                 "deliverySchedulePosition": "1",
                 "item": {"buyerItemNumber": f"ITM-{position}"},
                 "supplierLine": {"despatchAdviceNumber": advice,
                                  "despatchAdviceLinePosition": str(i),
                                  "despatchQuantity": quantity},
                 "meta": {"lastUpdatedAt": stamp}}
                for i, (po, position, quantity) in enumerate(refs, start=1)]

    def pick_lines(self, order: JsonObj, count: int) -> list[str]:
        """Ids of ``count`` random lines of ``order`` (all when it has fewer), in line order."""
        ids = [ln["id"] for ln in order["lines"]]
        chosen = set(self.rng.sample(ids, min(count, len(ids))))
        return [i for i in ids if i in chosen]

    def reschedule(self, line: JsonObj) -> JsonObj:
        """A copy of the line's schedule and prices moved by a few days (a proposal or update)."""
        buyer_line = line["buyerLine"]
        schedule = copy.deepcopy(buyer_line["deliverySchedule"])
        for row in schedule:
            day = datetime.fromisoformat(row["date"]) + timedelta(days=self.rng.randint(3, 14))
            row["date"] = day.date().isoformat()
        return {"deliverySchedule": schedule, "prices": copy.deepcopy(buyer_line["prices"])}


def apply_order_event(
    factory: Factory, order: JsonObj, event_name: str, line_ids: list[str], stamp: str
) -> list[JsonObj]:
    """Change ``order`` in place for ``event_name`` on ``line_ids``; return the changed lines."""
    wanted = set(line_ids)
    changed = [ln for ln in order["lines"] if ln["id"] in wanted]
    for line in changed:
        _apply_line_effect(factory, order, line, event_name)
        line["lastUpdatedAt"] = stamp
    order["version"] += 1
    order["lastUpdatedAt"] = stamp
    order["status"]["processStatus"] = roll_up_process(
        [ln["status"]["processStatus"] for ln in order["lines"]])
    order["status"]["logisticsStatus"] = roll_up_logistics(
        [ln["status"]["logisticsStatus"] for ln in order["lines"]])
    return changed


def _apply_line_effect(factory: Factory, order: JsonObj, line: JsonObj, event_name: str) -> None:
    line["status"].update(LINE_EFFECTS.get(event_name, {}))
    if event_name == PROPOSED:
        line["supplierLine"] = factory.reschedule(line)
    elif event_name == LINES_UPDATED_BY_BUYER:
        line["buyerLine"].update(factory.reschedule(line))
    if line["status"]["processStatus"] == "Confirmed" and "confirmedLine" not in line:
        source = line.get("supplierLine") or line["buyerLine"]
        line["confirmedLine"] = {"deliverySchedule": copy.deepcopy(source["deliverySchedule"]),
                                 "prices": copy.deepcopy(source["prices"])}
    if event_name.endswith("BySupplier") and "salesOrderNumber" not in order["supplierOrder"]:
        number = order["buyerOrder"]["purchaseOrderNumber"].removeprefix("PO-")
        order["supplierOrder"]["salesOrderNumber"] = f"SO-{number}"


def add_order_lines(factory: Factory, order: JsonObj, count: int, stamp: str) -> list[str]:
    """Append ``count`` new lines to ``order`` (OrderLinesIssuedByBuyer); return their ids."""
    start = len(order["lines"]) + 1
    new = [factory.line(position, stamp) for position in range(start, start + count)]
    order["lines"].extend(new)
    return [ln["id"] for ln in new]


def apply_shipment_event(shipment: JsonObj, event_name: str, stamp: str) -> None:
    """Change ``shipment`` in place for ``event_name``; a reissue touches every line."""
    if event_name in SHIPMENT_EFFECTS:
        shipment["status"]["processStatus"] = SHIPMENT_EFFECTS[event_name]
    if event_name == "ShipmentReissuedBySupplier":
        for line in shipment_lines(shipment):
            line["meta"]["lastUpdatedAt"] = stamp
    shipment["meta"]["lastUpdatedAt"] = stamp


def shipment_lines(shipment: JsonObj) -> list[JsonObj]:
    """Every line of a shipment: ``lines`` and those in its load carriers."""
    loaded = [ln for carrier in shipment.get("loadCarriers", []) for ln in carrier["lines"]]
    return list(shipment["lines"]) + loaded


def message_meta(message_id: str, trace_id: str, stamp: str, company_id: str) -> JsonObj:
    """The message meta Tradecloud puts at the top of a webhook body (docs
    order/buyer/receive/README.md, shipment/buyer/receive/README.md)."""
    return {"messageId": message_id,
            "source": {"traceId": trace_id, "userId": f"user-{company_id}",
                       "companyId": company_id, "origin": "simulator"},
            "createdDateTime": stamp}


def single_delivery_order(order: JsonObj) -> JsonObj:
    """An order in the single-delivery layout: each line's delivery in
    ``statusLine.scheduledDelivery`` instead of a delivery schedule (docs
    api/delivery-schedule.md)."""
    view = copy.deepcopy(order)
    view["lines"] = [single_delivery_line(line) for line in view["lines"]]
    return view


def single_delivery_line(line: JsonObj) -> JsonObj:
    """One order line in the single-delivery layout."""
    line = copy.deepcopy(line)
    schedule = line["buyerLine"].pop("deliverySchedule", [])
    first = schedule[0] if schedule else {}
    line["statusLine"] = {"scheduledDelivery": {k: v for k, v in first.items()
                                                if k in ("date", "quantity")},
                          "prices": line["buyerLine"].get("prices", {})}
    return line


def order_event_body(
    order: JsonObj, lines: list[JsonObj], event_name: str, meta: JsonObj,
    *, single_delivery: bool = False,
) -> JsonObj:
    """A webhook POST body for an order change: header plus only the changed lines, and the
    message meta at the top; ``singleDeliveryOrderEvent`` for a single-delivery company."""
    key = "singleDeliveryOrderEvent" if single_delivery else "orderEvent"
    event = {
        "orderId": order["id"],
        "lastUpdatedAt": order["lastUpdatedAt"],
        "version": order["version"],
        "buyerOrder": order["buyerOrder"],
        "supplierOrder": order["supplierOrder"],
        "status": order["status"],
        "lines": [single_delivery_line(ln) for ln in lines] if single_delivery else lines,
    }
    return copy.deepcopy({"eventName": event_name, key: event, "meta": meta})


def order_documents_event_body(
    order: JsonObj, documents: list[JsonObj], event_name: str, meta: JsonObj,
    *, line_id: str | None = None,
) -> JsonObj:
    """An order documents webhook body: its model is undocumented ("to be documented"); like
    Tradecloud's it has no lastUpdatedAt, only the message meta at the top. The documents sit
    on the order's buyer or supplier part, or on that part of the one line that got them."""
    by_buyer = event_name.endswith("ByBuyer")
    event: JsonObj = {"orderId": order["id"]}
    if line_id is None:
        event["buyerOrder" if by_buyer else "supplierOrder"] = {"documents": documents}
    else:
        event["lines"] = [{"id": line_id,
                           "buyerLine" if by_buyer else "supplierLine": {"documents": documents}}]
    return copy.deepcopy({"eventName": event_name, "orderDocumentsEvent": event, "meta": meta})


def shipment_event_body(shipment: JsonObj, event_name: str, meta: JsonObj) -> JsonObj:
    """A webhook POST body for a shipment change: the whole shipment and the message meta."""
    return copy.deepcopy({"eventName": event_name, "shipment": shipment, "meta": meta})
