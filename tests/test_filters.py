"""The routing filters: status (order, changed lines, shipment) and echo suppression.

The envelopes are built from the shapes in Tradecloud's docs (`order/buyer/receive/README.md`:
order and line `status{processStatus, logisticsStatus}`; `shipment/buyer/receive/README.md`:
`status.processStatus`, the message `meta{messageId, source{traceId, userId, companyId}}` at
the top of the webhook body, which the envelope carries as its top-level `meta`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tcbridge.config import CommandHandlerSettings, FileHandlerSettings
from tcbridge.dispatch import explain_route, make_route
from tcbridge.filters import message_source, skip_reason, statuses
from tcbridge.metrics import Metrics

ERP_USER = "3a0fe3d9-0bba-4b5c-a1a4-a0e0e5a3f7b1"
ERP_COMPANY = "9f5e1c2e-8a6b-4d0a-b2de-0c1f8e7e6d55"
SUPPLIER_USER = "e2a7c0b4-1111-4a5d-9c2e-2b3c4d5e6f70"


def line(line_id: str, process: Any = "Issued", logistics: Any = "Open") -> dict[str, Any]:
    return {"id": line_id, "buyerLine": {"position": "0010"},
            "status": {"processStatus": process, "inProgressStatus": None,
                       "logisticsStatus": logistics},
            "lastUpdatedAt": "2024-05-01T10:00:00.000Z"}


def order_envelope(
    *, process: Any = "Issued", logistics: Any = "Open", lines: list[dict[str, Any]] | None = None,
    changed: list[str] | None = None, meta: Any = None, source: str = "webhook",
    event_name: str | None = "OrderLinesConfirmedBySupplier",
) -> dict[str, Any]:
    lines = lines if lines is not None else [line("l1")]
    return {
        "id": "e1", "kind": "order", "entityId": "o1", "lastUpdatedAt": "2024-05-01T10:00:00.000Z",
        "eventName": event_name, "source": source, "receivedAt": "2024-05-01T10:00:01.000Z",
        "changedLineIds": changed if changed is not None else [ln["id"] for ln in lines],
        "late": False, "meta": meta,
        "payload": {"orderId": "o1", "version": 2,
                    "status": {"processStatus": process, "logisticsStatus": logistics},
                    "lines": lines},
    }


def shipment_envelope(process: Any = "Issued", meta: Any = None) -> dict[str, Any]:
    return {
        "id": "e2", "kind": "shipment", "entityId": "s1", "eventName": "ShipmentIssuedBySupplier",
        "source": "webhook", "changedLineIds": [], "late": False, "meta": meta,
        "payload": {"id": "s1", "status": {"processStatus": process},
                    "lines": [{"purchaseOrderNumber": "PO-1", "purchaseOrderLinePosition": "0010",
                               "status": {"processStatus": "Approved"},
                               "meta": {"lastUpdatedAt": "2024-05-01T10:00:00.000Z"}}],
                    "meta": {"lastUpdatedAt": "2024-05-01T10:00:00.000Z"}},
    }


def message_meta(user_id: str, company_id: str) -> dict[str, Any]:
    return {"messageId": "m-1", "createdDateTime": "2024-05-01T10:00:00.000Z",
            "source": {"traceId": "t-1", "userId": user_id, "companyId": company_id,
                       "origin": "api"}}


def handler(tmp_path: Path, **filters: Any) -> FileHandlerSettings:
    return FileHandlerSettings(name="f", type="file", directory=tmp_path, **filters)


# --- status ------------------------------------------------------------------------------------

STATUS_CASES = [
    # (filters, envelope, expected skip reason)
    ({"process_status": ["Confirmed"]}, order_envelope(process="Confirmed"), None),
    ({"process_status": ["Confirmed"]}, order_envelope(), "process_status"),
    # a changed line matches although the order's aggregate does not
    ({"process_status": ["Confirmed"]},
     order_envelope(process="InProgress", lines=[line("l1"), line("l2", "Confirmed")]), None),
    # the matching line did not change in this event: it does not count
    ({"process_status": ["Confirmed"]},
     order_envelope(process="InProgress", lines=[line("l1"), line("l2", "Confirmed")],
                    changed=["l1"]), "process_status"),
    ({"process_status": ["Confirm*"]}, order_envelope(process="Confirmed"), None),
    ({"process_status": ["confirmed"]}, order_envelope(process="Confirmed"), "process_status"),
    ({"process_status": ["Issued", "Confirmed"]}, order_envelope(), None),
    ({"logistics_status": ["Shipped"]},
     order_envelope(lines=[line("l1", logistics="Shipped")]), None),
    ({"logistics_status": ["Shipped", "Delivered"]}, order_envelope(), "logistics_status"),
    # both filters must pass
    ({"process_status": ["Issued"], "logistics_status": ["Shipped"]}, order_envelope(),
     "logistics_status"),
    ({"process_status": ["Issued"], "logistics_status": ["Open"]}, order_envelope(), None),
    # unknown and missing values never crash and never match
    ({"process_status": ["Confirmed"]}, order_envelope(process="SomethingNew", lines=[]),
     "process_status"),
    ({"process_status": ["*"]}, order_envelope(process=None, lines=[line("l1", process=None)]),
     "process_status"),
    ({"process_status": ["*"]}, order_envelope(process=7, lines=[line("l1", process=["x"])]),
     "process_status"),
    ({"process_status": ["*"]}, order_envelope(process="SomethingNew"), None),
    # shipments: their own status; their lines carry none in Tradecloud's model
    ({"process_status": ["Issued"]}, shipment_envelope(), None),
    ({"process_status": ["Approved"]}, shipment_envelope(), "process_status"),
    ({"logistics_status": ["*"]}, shipment_envelope(), "logistics_status"),
    # filters run after the kind filter, which names its own reason
    ({"kinds": ["order"], "logistics_status": ["*"]}, shipment_envelope(), "kind"),
]


@pytest.mark.parametrize(("filters", "envelope", "expected"), STATUS_CASES)
def test_status_filters(
    tmp_path: Path, filters: dict[str, Any], envelope: dict[str, Any], expected: str | None
) -> None:
    settings = handler(tmp_path, **filters)
    assert skip_reason(settings, envelope) == expected
    assert (skip_reason(settings, envelope) is None) is (expected is None)


@pytest.mark.parametrize("payload", [None, "text", [], {"status": "Confirmed"},
                                     {"status": {}, "lines": "nope"},
                                     {"status": {}, "lines": [None, 3, {"id": 5}]}])
def test_status_filters_survive_odd_payloads(tmp_path: Path, payload: Any) -> None:
    envelope = order_envelope() | {"payload": payload, "changedLineIds": "l1"}
    assert skip_reason(handler(tmp_path, process_status=["*"]), envelope) == "process_status"


def test_statuses_lists_order_then_changed_lines() -> None:
    envelope = order_envelope(process="InProgress",
                              lines=[line("l1", "Confirmed"), line("l2", "Rejected")])
    assert list(statuses(envelope, "processStatus")) == ["InProgress", "Confirmed", "Rejected"]


def test_snapshots_are_filtered_on_status_too(tmp_path: Path) -> None:
    snapshot = order_envelope(process="Cancelled", lines=[line("l1", "Cancelled")],
                              source="poll", event_name=None)
    assert skip_reason(handler(tmp_path, process_status=["Confirmed"]), snapshot) == (
        "process_status")


# --- echo suppression -------------------------------------------------------------------------


def test_own_user_is_suppressed(tmp_path: Path) -> None:
    settings = handler(tmp_path, exclude_source_user_ids=[ERP_USER])
    own = order_envelope(meta=message_meta(ERP_USER, "c-other"))
    theirs = order_envelope(meta=message_meta(SUPPLIER_USER, "c-other"))
    assert skip_reason(settings, own) == "source_user"
    assert skip_reason(settings, theirs) is None


def test_own_company_is_suppressed(tmp_path: Path) -> None:
    settings = handler(tmp_path, exclude_source_company_ids=[ERP_COMPANY])
    assert skip_reason(settings, order_envelope(meta=message_meta(SUPPLIER_USER, ERP_COMPANY))
                       ) == "source_company"
    assert skip_reason(settings, shipment_envelope(meta=message_meta(SUPPLIER_USER, ERP_COMPANY))
                       ) == "source_company"
    assert skip_reason(settings, order_envelope(meta=message_meta(SUPPLIER_USER, "c-2"))) is None


@pytest.mark.parametrize("meta", [None, {}, {"messageId": "m"}, {"source": None},
                                  {"source": "x"}, "text", {"source": {"userId": None}}])
def test_events_without_attributable_source_always_pass(tmp_path: Path, meta: Any) -> None:
    settings = handler(tmp_path, exclude_source_user_ids=[ERP_USER],
                       exclude_source_company_ids=[ERP_COMPANY])
    assert skip_reason(settings, order_envelope(meta=meta)) is None


def test_a_snapshot_has_no_message_meta_and_passes(tmp_path: Path) -> None:
    settings = handler(tmp_path, exclude_source_user_ids=[ERP_USER])
    snapshot = order_envelope(source="poll", event_name=None)
    del snapshot["meta"]
    assert skip_reason(settings, snapshot) is None


def test_meta_inside_the_payload_is_not_the_message_meta(tmp_path: Path) -> None:
    # The order object's own `meta` is not who sent the message: only the top-level one counts.
    settings = handler(tmp_path, exclude_source_user_ids=[ERP_USER])
    envelope = order_envelope()
    envelope["payload"]["meta"] = message_meta(ERP_USER, ERP_COMPANY)
    assert skip_reason(settings, envelope) is None
    assert message_source(envelope) == {}


def test_status_is_judged_before_echo(tmp_path: Path) -> None:
    settings = handler(tmp_path, process_status=["Confirmed"], exclude_source_user_ids=[ERP_USER])
    envelope = order_envelope(meta=message_meta(ERP_USER, ERP_COMPANY))
    assert skip_reason(settings, envelope) == "process_status"


# --- routing, counting, explaining ------------------------------------------------------------


def test_route_reports_every_skip(tmp_path: Path) -> None:
    handlers = [
        handler(tmp_path, process_status=["Confirmed"]).model_copy(update={"name": "confirmed"}),
        handler(tmp_path, exclude_source_user_ids=[ERP_USER]).model_copy(update={"name": "erp"}),
        handler(tmp_path).model_copy(update={"name": "all"}),
    ]
    skips: list[tuple[str, str]] = []
    route = make_route(handlers, on_skip=lambda name, reason: skips.append((name, reason)))
    envelope = order_envelope(meta=message_meta(ERP_USER, ERP_COMPANY))
    assert route(envelope) == ["all"]
    assert skips == [("confirmed", "process_status"), ("erp", "source_user")]
    assert explain_route(handlers, envelope) == {"confirmed": "process_status",
                                                 "erp": "source_user"}


def test_skips_are_counted_per_handler_and_reason(tmp_path: Path) -> None:
    metrics = Metrics()
    route = make_route([handler(tmp_path, process_status=["Confirmed"])],
                       on_skip=metrics.count_skip)
    route(order_envelope())
    route(order_envelope())
    route(order_envelope(process="Confirmed"))
    text = metrics.render().decode()
    assert 'tcbridge_deliveries_skipped_total{handler="f",reason="process_status"} 2.0' in text


# --- configuration ----------------------------------------------------------------------------


def test_an_empty_status_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="process_status"):
        handler(tmp_path, process_status=[])


@pytest.mark.parametrize("host", ["", "https://x.example", "x.example:443", "x.example/p",
                                  "user@x.example"])
def test_documents_allowed_hosts_are_plain_hosts(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValidationError, match="documents_allowed_hosts"):
        CommandHandlerSettings(name="c", type="command", command=["true"],
                               documents_allowed_hosts=[host])


def test_documents_allowed_hosts_are_lowercased(tmp_path: Path) -> None:
    settings = CommandHandlerSettings(name="c", type="command", command=["true"],
                                      documents_allowed_hosts=["Docs.Supplier.Example", "[::1]"])
    assert settings.documents_allowed_hosts == ["docs.supplier.example", "[::1]"]
