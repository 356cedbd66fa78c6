"""Normalising payloads and the pure parts of deduplication."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from tcbridge.envelope import (
    _deeper_than,
    changed_lines,
    content_digest,
    envelope_dict,
    event_id,
    parse_order_webhook,
    parse_shipment_webhook,
    parse_snapshot,
    plain_text,
    shipment_lines,
    sibling_version_key,
)
from tcbridge.errors import InvalidEvent
from tcbridge.timefmt import instant_us
from tests.conftest import order_event_body, order_obj, shipment_obj


@pytest.mark.parametrize("key", ["orderEvent", "singleDeliveryOrderEvent", "simpleOrderEvent"])
def test_order_event_keys_all_map_to_order(key: str) -> None:
    candidate = parse_order_webhook(order_event_body("o1", key=key, line_ids=("a", "b")))
    assert candidate.kind == "order"
    assert candidate.entity_id == "o1"
    assert candidate.event_name == "OrderLinesConfirmedBySupplier"
    assert candidate.source == "webhook"
    assert candidate.line_ids == ("a", "b")
    assert not candidate.is_snapshot


def test_document_event_without_timestamp_is_versioned_by_message_id() -> None:
    body = order_event_body("o1", stamp=None, key="orderDocumentsEvent", message_id="m-7")
    candidate = parse_order_webhook(body)
    assert candidate.kind == "order_documents"
    assert candidate.version_key == "m:m-7"
    assert candidate.last_updated_at is None


def test_same_instant_in_other_offsets_gives_same_key() -> None:
    a = parse_order_webhook(order_event_body("o1", stamp="2024-05-01T10:00:00.000Z"))
    b = parse_order_webhook(order_event_body("o1", stamp="2024-05-01T12:00:00.000+02:00"))
    assert a.version_key == b.version_key
    assert a.event_id == b.event_id
    assert a.last_updated_at != b.last_updated_at  # kept as received


def test_event_and_snapshot_of_same_version_share_an_id() -> None:
    event = parse_order_webhook(order_event_body("o1", stamp="2024-05-01T10:00:00.000Z"))
    snapshot = parse_snapshot("order", order_obj("o1", "2024-05-01T10:00:00Z"), "poll")
    assert snapshot.event_id == event.event_id
    assert snapshot.is_snapshot


def test_unknown_event_names_and_extra_fields_are_accepted() -> None:
    body = order_event_body("o1", event_name="SomethingNewByBuyer")
    body["futureField"] = {"x": 1}
    body["orderEvent"]["newThing"] = [1, 2]
    assert parse_order_webhook(body).event_name == "SomethingNewByBuyer"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "body must be a JSON object"),
        ({"eventName": "X"}, "exactly one of"),
        ({"eventName": "X", "orderEvent": {}, "simpleOrderEvent": {}}, "found orderEvent"),
        ({"eventName": "X", "orderEvent": "nope"}, "must be a JSON object"),
        ({"eventName": "X", "orderEvent": {"lastUpdatedAt": "2024-01-01T00:00:00Z"}}, "no orderId"),
        ({"eventName": "X", "orderEvent": {"orderId": "", "lastUpdatedAt": "x"}}, "non-empty"),
        ({"eventName": "X", "orderEvent": {"orderId": "o"}}, "no lastUpdatedAt"),
        ({"eventName": "X", "orderEvent": {"orderId": "o", "lastUpdatedAt": "yesterday"}},
         "not an ISO 8601"),
        ({"eventName": "X", "orderEvent": {"orderId": "o", "lastUpdatedAt": "2024-01-01T00:00"}},
         "no time zone"),
        ({"eventName": 5, "orderEvent": {"orderId": "o", "lastUpdatedAt": "2024-01-01T00:00Z"}},
         "eventName"),
    ],
)
def test_invalid_order_bodies_say_what_is_wrong(body: object, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        parse_order_webhook(body)


def test_shipment_event_changed_lines_share_the_shipment_stamp() -> None:
    stamp = "2024-05-01T10:00:00.000Z"
    shipment = shipment_obj("s1", stamp, lines=[("a", stamp), ("b", "2024-04-01T00:00:00.000Z")])
    for key in ("shipment", "shipmentEvent"):
        candidate = parse_shipment_webhook({"eventName": "ShipmentIssuedBySupplier", key: shipment})
        assert candidate.kind == "shipment"
        assert candidate.entity_id == "s1"
        assert candidate.instant_us == instant_us(stamp)
        assert candidate.line_ids == ("DA-1/a",)


def test_shipment_body_on_order_route_is_invalid() -> None:
    with pytest.raises(InvalidEvent):
        parse_order_webhook({"eventName": "ShipmentIssuedBySupplier", "shipment": shipment_obj()})


def test_snapshot_changed_lines_are_those_after_the_newest_stored() -> None:
    order = order_obj("o1", "2024-05-03T00:00:00.000Z", lines=[
        ("old", "2024-05-01T00:00:00.000Z"),
        ("new", "2024-05-03T00:00:00.000Z"),
        ("unstamped", "garbage"),
    ])
    candidate = parse_snapshot("order", order, "poll")
    assert changed_lines(candidate, None) == ["old", "new", "unstamped"]
    assert changed_lines(candidate, instant_us("2024-05-02T00:00:00.000Z")) == [
        "new", "unstamped"]


def test_event_changed_lines_ignore_stored_state() -> None:
    candidate = parse_order_webhook(order_event_body("o1", line_ids=("x", "y")))
    assert changed_lines(candidate, instant_us("2030-01-01T00:00:00Z")) == ["x", "y"]


def test_event_id_is_stable_and_distinct() -> None:
    assert event_id("order", "o1", "t:1") == event_id("order", "o1", "t:1")
    assert event_id("order", "o1", "t:1") != event_id("shipment", "o1", "t:1")
    assert len(event_id("order", "o1", "t:1")) == 32


# -- the real shapes (bodies from Tradecloud's docs: tests/fixtures/README.md) ---------------

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


def test_shipment_lines_get_their_documented_identity_in_both_places() -> None:
    body = fixture("shipment_event.json")
    candidate = parse_shipment_webhook(body)
    # lines first, then loadCarriers[].lines; "/" in a part is percent-encoded.
    snapshot = parse_snapshot("shipment", body["shipment"], "webhook_get")
    assert snapshot.line_ids == ("DA%2F77/3", "DA%2F77/1", "DA%2F77/2")
    # Changed: the lines whose meta.lastUpdatedAt equals the shipment's.
    assert candidate.line_ids == ("DA%2F77/3", "DA%2F77/1")
    assert changed_lines(candidate, None) == ["DA%2F77/3", "DA%2F77/1"]


def test_shipment_line_identity_is_stable_and_unique() -> None:
    stamp = "2024-05-04T12:00:00.000Z"
    po_line = {"purchaseOrderNumber": "PO-1", "purchaseOrderLinePosition": 10,
               "meta": {"lastUpdatedAt": stamp}}
    bare = {"meta": {"lastUpdatedAt": stamp}}
    shipment = {"id": "s1", "meta": {"lastUpdatedAt": stamp},
                "lines": [po_line, dict(po_line), bare],
                "loadCarriers": [{"packageSSCC": "1"}, {"lines": [bare]}]}
    ids = [line_id for line_id, _ in shipment_lines(shipment)]
    assert ids == ["po/PO-1/10/", "po/PO-1/10/#2", "@lines/2", "@loadCarriers/1/lines/0"]
    again = parse_shipment_webhook({"eventName": "ShipmentReissuedBySupplier",
                                    "shipment": copy.deepcopy(shipment)})
    assert list(again.line_ids) == ids


def test_message_meta_and_layout_of_webhooks() -> None:
    body = fixture("order_event.json")
    candidate = parse_order_webhook(body)
    assert candidate.meta == body["meta"] and candidate.message_id == body["meta"]["messageId"]
    assert candidate.layout == "delivery-schedule"
    single = parse_order_webhook(fixture("single_delivery_order_event.json"))
    # No meta at the top: the event's own (tradecloud-bc-connector's model).
    assert single.meta is not None and single.meta["messageId"].startswith("9d8c7b6a")
    assert single.layout == "single-delivery"
    shipment = parse_shipment_webhook(fixture("shipment_event.json"))
    assert shipment.meta is not None and shipment.meta["source"]["traceId"].startswith("3d4e")
    assert shipment.layout is None


def test_envelope_has_meta_layout_and_sibling() -> None:
    candidate = parse_order_webhook(fixture("order_event.json"))
    envelope = envelope_dict(event_id="e1", candidate=candidate, received_at="now",
                             changed_line_ids=[], late=False)
    assert envelope["meta"] == fixture("order_event.json")["meta"]
    assert envelope["layout"] == "delivery-schedule" and envelope["sibling"] is False
    snapshot = parse_snapshot("order", fixture("polled_order.json"), "poll",
                              layout="single-delivery")
    envelope = envelope_dict(event_id="e2", candidate=snapshot, received_at="now",
                             changed_line_ids=[], late=False, sibling=True)
    assert envelope["meta"] is None and envelope["layout"] == "single-delivery"
    assert envelope["sibling"] is True
    shipment = parse_snapshot("shipment", fixture("shipment_event.json")["shipment"], "poll")
    assert shipment.layout is None


def test_order_documents_event_without_a_timestamp_is_keyed_by_the_top_level_message_id(
) -> None:
    body = fixture("order_documents_event.json")
    candidate = parse_order_webhook(body)
    assert candidate.kind == "order_documents"
    assert candidate.version_key == f"m:{body['meta']['messageId']}"
    assert candidate.last_updated_at is None and candidate.layout is None


def test_order_documents_event_without_any_message_id_is_keyed_by_its_content() -> None:
    body = fixture("order_documents_event.json")
    del body["meta"]
    candidate = parse_order_webhook(body)
    assert candidate.version_key.startswith("d:")
    assert parse_order_webhook(copy.deepcopy(body)).event_id == candidate.event_id
    body["orderDocumentsEvent"]["supplierOrder"]["documents"][0]["objectId"] = "other"
    assert parse_order_webhook(body).event_id != candidate.event_id


def test_first_sighting_of_a_polled_order_changes_only_lines_after_the_query_cursor() -> None:
    order = fixture("polled_order.json")
    polled = parse_snapshot("order", order, "poll", since="2024-05-01T00:00:00.000Z")
    assert changed_lines(polled, None) == ["line-new"]
    # Against a stored version the stored one counts, not the query's cursor.
    assert changed_lines(polled, instant_us("2024-03-01T00:00:00.000Z")) == [
        "line-old", "line-new"]
    fetched = parse_snapshot("order", order, "webhook_get")
    assert changed_lines(fetched, None) == ["line-old", "line-new"]
    shipment = fixture("shipment_event.json")["shipment"]
    since = parse_snapshot("shipment", shipment, "poll", since="2024-05-02T00:00:00.000Z")
    assert changed_lines(since, None) == ["DA%2F77/3", "DA%2F77/1"]


def test_without_a_top_level_meta_the_events_own_meta_is_kept() -> None:
    body = fixture("shipment_event.json")
    del body["meta"]
    candidate = parse_shipment_webhook(body)
    assert candidate.meta == body["shipment"]["meta"] and candidate.message_id is None
    order = fixture("order_event.json")
    del order["meta"]
    assert parse_order_webhook(order).meta is None
@pytest.mark.parametrize("source", ["webhook", "poll"])
def test_one_order_id_rule_for_events_and_snapshots(source: str) -> None:
    # Events took orderId first, snapshots id first: the same object could get two ids.
    def parse(obj: dict[str, Any]) -> str:
        if source == "webhook":
            return parse_order_webhook({"eventName": "X", "orderEvent": obj}).entity_id
        return parse_snapshot("order", obj, "poll").entity_id

    stamp = {"lastUpdatedAt": "2024-05-01T10:00:00.000Z"}
    assert parse({"id": "o1"} | stamp) == "o1"
    assert parse({"orderId": "o1"} | stamp) == "o1"
    assert parse({"id": "o1", "orderId": "o1"} | stamp) == "o1"
    with pytest.raises(InvalidEvent, match="orderId and id differ"):
        parse({"id": "o1", "orderId": "o2"} | stamp)
    with pytest.raises(InvalidEvent, match="non-empty string"):
        parse({"orderId": "o1", "id": 7} | stamp)


# -- found by mutation testing (issue 9): exact messages, kept payloads, less-used keys --


@pytest.mark.parametrize(
    ("parse", "body", "message"),
    [
        (parse_order_webhook, {"eventName": "X"},
         "body must hold exactly one of orderEvent, singleDeliveryOrderEvent, "
         "simpleOrderEvent, orderDocumentsEvent$"),
        (parse_order_webhook, {"orderEvent": {}, "simpleOrderEvent": {}},
         "; found orderEvent, simpleOrderEvent$"),
        (parse_order_webhook, {"orderEvent": 3}, "^orderEvent must be a JSON object$"),
        (parse_order_webhook, {"orderEvent": {"lastUpdatedAt": "2024-01-01T00:00:00Z"}},
         "^orderEvent has no orderId or id$"),
        (parse_order_webhook, {"orderEvent": {"orderId": "o", "lastUpdatedAt": "x"}},
         "^orderEvent.lastUpdatedAt: not an ISO 8601"),
        (parse_order_webhook, {"eventName": "", "orderEvent": {
            "orderId": "o", "lastUpdatedAt": "2024-01-01T00:00:00Z"}},
         "^eventName must be a non-empty string$"),
        (parse_shipment_webhook, [], "^body must be a JSON object$"),
        (parse_shipment_webhook, {"eventName": "X"},
         "^body must hold exactly one of shipment, shipmentEvent$"),
        (parse_shipment_webhook, {"shipmentEvent": []}, "^shipmentEvent must be a JSON object$"),
        (parse_shipment_webhook, {"shipment": {"meta": {"lastUpdatedAt": "2024-01-01T00:00Z"}}},
         "^shipment has no id or shipmentId$"),
        (parse_shipment_webhook, {"shipment": {"id": "s", "meta": {"lastUpdatedAt": "x"}}},
         "^shipment.lastUpdatedAt: not an ISO 8601"),
        (lambda body: parse_snapshot("order", body, "poll"), {"lastUpdatedAt": "x", "id": "o"},
         "^order.lastUpdatedAt: not an ISO 8601"),
        (lambda body: parse_snapshot("order", body, "poll"), {"lastUpdatedAt": "x"},
         "^order has no orderId or id$"),
        (lambda body: parse_snapshot("shipment", body, "poll"), {"id": "s"},
         "^shipment has no lastUpdatedAt"),
        (lambda body: parse_snapshot("order", body, "poll"), {"id": "o", "x": 2**70},
         "^order cannot be stored as JSON"),
        (parse_order_webhook, {"orderEvent": {"orderId": "o", "meta": {
            "createdDateTime": "yesterday"}}}, "^orderEvent.meta.createdDateTime: not an ISO"),
    ],
)
def test_messages_name_the_field(parse: Any, body: object, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        parse(body)


def test_parsed_candidates_keep_their_payload_and_their_parts() -> None:
    body = order_event_body("o1")
    event = parse_order_webhook(body)
    assert event.payload == body["orderEvent"] and event.line_instants == ()
    body = {"eventName": "ShipmentIssuedBySupplier", "shipmentEvent": shipment_obj("s1")}
    shipment = parse_shipment_webhook(body)
    assert shipment.payload == body["shipmentEvent"] and shipment.source == "webhook"
    assert shipment.event_name == "ShipmentIssuedBySupplier" and shipment.line_instants == ()
    snapshot = parse_snapshot("shipment", shipment_obj("s2"), "webhook_get")
    assert snapshot.payload == shipment_obj("s2") | {"id": "s2"} and snapshot.entity_id == "s2"


def test_less_used_keys_shipment_id_created_date_time_and_message_id() -> None:
    stamp = "2024-05-01T10:00:00.000Z"
    assert parse_snapshot("shipment", {"shipmentId": "s9", "meta": {"lastUpdatedAt": stamp}},
                          "poll").entity_id == "s9"
    created = parse_order_webhook({"orderEvent": {"orderId": "o", "meta": {
        "createdDateTime": stamp}}})
    assert created.version_key == f"c:{instant_us(stamp)}" and created.last_updated_at is None
    by_message = parse_shipment_webhook({"shipment": {"id": "s", "meta": {"messageId": "m1"}}})
    assert by_message.version_key == "m:m1"


def test_plain_text_limits_and_lines_that_are_no_objects() -> None:
    assert plain_text("x" * 200) and not plain_text("x" * 201)
    assert not plain_text("o-\ud800") and not plain_text("  ") and not plain_text(7)
    order = order_obj("o1")
    order["lines"] = ["junk", {"id": "l1"}, {"id": ""}, {"noid": 1}]
    assert parse_snapshot("order", order, "poll").line_ids == ("l1",)


# -- found by an outside check (issues 9/10): plausible bodies that got a 400 --


def test_event_keys_that_are_null_count_as_absent() -> None:
    # A serialiser that writes every optional field writes the kinds a body does not carry
    # as null; that body was refused ("found orderEvent, orderDocumentsEvent"), for good.
    body = order_event_body("o1") | {"singleDeliveryOrderEvent": None,
                                     "orderDocumentsEvent": None}
    assert parse_order_webhook(body).layout == "delivery-schedule"
    shipment = {"eventName": "ShipmentIssuedBySupplier", "shipment": shipment_obj("s1"),
                "shipmentEvent": None}
    assert parse_shipment_webhook(shipment).entity_id == "s1"
    with pytest.raises(InvalidEvent, match="exactly one of"):
        parse_order_webhook({"orderEvent": None})


def test_a_shipment_event_without_a_usable_stamp_is_keyed_by_the_message_id() -> None:
    # Orders fall back to the body's message meta; shipments did not, so a shipment whose
    # meta.lastUpdatedAt was null got a 400 although its message had an id.
    top = {"messageId": "msg-7", "createdDateTime": "2024-05-04T12:00:01.000Z"}
    body = {"eventName": "ShipmentIssuedBySupplier", "meta": top,
            "shipment": {"id": "s1", "meta": {"lastUpdatedAt": None}}}
    candidate = parse_shipment_webhook(body)
    assert (candidate.version_key, candidate.last_updated_at) == ("m:msg-7", None)
    stamp = "2024-05-04T12:00:00.000Z"
    body["shipment"] = {"id": "s1", "meta": {"lastUpdatedAt": None}, "lastUpdatedAt": stamp}
    assert parse_shipment_webhook(body).version_key == f"t:{instant_us(stamp)}"
# Mutation-testing follow-ups: exact keys, digests and messages of the newer code.


def test_content_digest_is_pinned_ignores_meta_and_key_order() -> None:
    # Stored events are compared with a digest computed again later (store.py): its value
    # must never change between releases, whatever the order of the keys.
    pinned = "e18a37289c8930b1123d4e282740aef0"
    assert content_digest("OrderUpdated", {"b": 1, "a": 2, "meta": {"messageId": "x"}}) == pinned
    assert content_digest("OrderUpdated", {"a": 2, "b": 1}) == pinned
    assert content_digest(None, {"a": 2, "b": 1}) != pinned
    assert content_digest("OrderUpdated", {"a": 2, "b": 3}) != pinned


def test_content_digest_of_a_lone_surrogate_uses_the_sorted_escaping_encoder() -> None:
    pinned = "bb6a9fb52afca8e513aee0d3bbf7d21c"
    assert content_digest("OrderUpdated", {"b": "\ud800", "a": 2}) == pinned
    assert content_digest("OrderUpdated", {"a": 2, "b": "\ud800"}) == pinned
    assert content_digest("OrderUpdated", {"a": 2, "b": "\udfff"}) != pinned
    assert content_digest(None, {"a": 2, "b": "\ud800"}) != pinned


def test_sibling_key_uses_the_message_id_only_for_resent_events() -> None:
    updated = parse_order_webhook(order_event_body("o1", event_name="OrderUpdated",
                                                   message_id="m-1"))
    assert updated.message_id == "m-1"
    assert sibling_version_key(updated) == f"{updated.version_key}|d:{updated.content_digest}"
    resent = parse_order_webhook(order_event_body("o1", event_name="OrderResentByBuyer",
                                                  message_id="m-1"))
    assert sibling_version_key(resent) == f"{resent.version_key}|m:m-1"


@pytest.mark.parametrize("message_id", [42, "", "  ", "a\x00b"])
def test_a_message_id_that_is_no_plain_text_is_dropped(message_id: object) -> None:
    body = order_event_body("o1")
    body["orderEvent"]["meta"]["messageId"] = message_id
    candidate = parse_order_webhook(body)
    assert candidate.message_id is None
    assert candidate.version_key == f"t:{instant_us('2024-05-01T10:00:00.000Z')}"


def test_shipment_webhook_keeps_its_message_id_and_named_digest() -> None:
    shipment = shipment_obj("s1")
    body = {"eventName": "ShipmentResentByBuyer", "meta": {"messageId": "m-9"},
            "shipment": shipment}
    candidate = parse_shipment_webhook(body)
    assert candidate.message_id == "m-9"
    assert candidate.content_digest == content_digest("ShipmentResentByBuyer", shipment)
    assert candidate.content_digest != content_digest(None, shipment)
    assert sibling_version_key(candidate) == f"{candidate.version_key}|m:m-9"


def test_order_documents_event_with_a_timestamp_is_keyed_by_it() -> None:
    body = fixture("order_documents_event.json")
    body["orderDocumentsEvent"]["lastUpdatedAt"] = "2024-05-01T10:00:00.000Z"
    candidate = parse_order_webhook(body)
    assert candidate.version_key == f"t:{instant_us('2024-05-01T10:00:00.000Z')}"
    assert candidate.last_updated_at == "2024-05-01T10:00:00.000Z"
    assert candidate.instant_us == instant_us("2024-05-01T10:00:00.000Z")
    body["orderDocumentsEvent"]["lastUpdatedAt"] = "nope"
    with pytest.raises(InvalidEvent) as e:
        parse_order_webhook(body)
    assert str(e.value) == "orderDocumentsEvent.lastUpdatedAt: not an ISO 8601 timestamp: 'nope'"


def test_order_documents_content_key_includes_the_event_name() -> None:
    body = fixture("order_documents_event.json")
    del body["meta"]
    candidate = parse_order_webhook(body)
    event = body["orderDocumentsEvent"]
    assert candidate.event_name is not None
    assert candidate.version_key == f"d:{content_digest(candidate.event_name, event)}"
    assert candidate.version_key != f"d:{content_digest(None, event)}"


def test_unstorable_payloads_name_their_field() -> None:
    order = order_event_body("o1")
    order["orderEvent"]["quantity"] = 2**70
    shipment = shipment_obj("s1")
    shipment["note"] = "\ud800"
    cases: list[tuple[Any, str]] = [
        (lambda: parse_order_webhook(order), "orderEvent"),
        (lambda: parse_shipment_webhook({"shipmentEvent": shipment}), "shipmentEvent"),
        (lambda: parse_snapshot("shipment", shipment, "poll"), "shipment"),
    ]
    for parse, where in cases:
        with pytest.raises(InvalidEvent) as e:
            parse()
        assert str(e.value).startswith(f"{where} cannot be stored as JSON: ")


def _nested(levels: int) -> Any:
    value: Any = {"note": "\ud800"}
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_limit_is_exact_and_its_message_names_the_levels() -> None:
    # The envelope is {"payload": ...}: 252 lists + the note object + it = 254 levels,
    # orjson's limit, so this one fails for its surrogate only; one more list is too deep.
    at_limit = order_event_body("o1")
    at_limit["orderEvent"]["deep"] = _nested(251)
    with pytest.raises(InvalidEvent) as e:
        parse_order_webhook(at_limit)
    assert str(e.value) == ("orderEvent cannot be stored as JSON: str is not valid UTF-8: "
                            "surrogates not allowed")
    too_deep = order_event_body("o1")
    too_deep["orderEvent"]["deep"] = _nested(252)
    with pytest.raises(InvalidEvent) as e:
        parse_order_webhook(too_deep)
    assert str(e.value) == "orderEvent is nested deeper than 253 levels and cannot be stored"


def test_deeper_than_counts_arrays_and_objects() -> None:
    assert not _deeper_than({"a": [1]}, 2)
    assert _deeper_than({"a": [[1]]}, 2)
    assert not _deeper_than([{"a": 1}, [2]], 2)
    assert _deeper_than([1, {"a": [{}]}], 3)
    assert not _deeper_than("text", 1)


def test_shipment_po_line_identity_includes_the_delivery_schedule_position() -> None:
    stamp = "2024-05-04T12:00:00.000Z"
    lines = [{"purchaseOrderNumber": "PO 1/x", "purchaseOrderLinePosition": 2,
              "deliverySchedulePosition": "3"},
             {"purchaseOrderNumber": "PO-1", "purchaseOrderLinePosition": "2",
              "deliverySchedulePosition": 4},
             {"purchaseOrderNumber": "PO-1", "purchaseOrderLinePosition": "2"}]
    shipment = {"id": "s1", "meta": {"lastUpdatedAt": stamp}, "lines": lines}
    ids = [line_id for line_id, _ in shipment_lines(shipment)]
    assert ids == ["po/PO%201%2Fx/2/3", "po/PO-1/2/4", "po/PO-1/2/"]


@pytest.mark.parametrize("candidate", [
    parse_order_webhook(order_event_body("o1", line_ids=("l1", "l2"))),
    parse_shipment_webhook({"eventName": "ShipmentIssuedBySupplier",
                            "shipmentEvent": shipment_obj("s1")}),
    parse_snapshot("order", order_obj("o2"), "poll"),
    parse_snapshot("shipment", shipment_obj("s2"), "poll"),
])
def test_the_storability_probe_keeps_the_payload_as_orjson_writes_it(candidate: Any) -> None:
    assert candidate.payload_text == orjson.dumps(candidate.payload)


def test_a_candidate_copied_with_another_payload_keeps_no_probe_text() -> None:
    candidate = parse_snapshot("order", order_obj("o1"), "poll")
    changed = replace(candidate, payload={**candidate.payload, "note": "changed"})
    assert candidate.payload_text is not None and changed.payload_text is None


def test_an_order_events_lines_are_its_changed_lines_whatever_their_stamps() -> None:
    body = order_event_body("o1", line_ids=("l1", "l2", "l3"))
    body["orderEvent"]["lines"][0]["lastUpdatedAt"] = "2024-05-01T10:00:00.000Z"
    body["orderEvent"]["lines"][1]["lastUpdatedAt"] = "not a time"  # [2] has none
    assert parse_order_webhook(body).line_ids == ("l1", "l2", "l3")


def test_a_copy_of_a_candidate_has_the_event_id_of_what_it_says() -> None:
    """The event id is kept once computed; a copy made with replace() computes its own."""
    candidate = parse_snapshot("order", order_obj("o1", "2024-05-01T10:00:00Z"), "poll")
    first = candidate.event_id
    assert candidate.event_id == first == event_id("order", "o1", candidate.version_key)
    for changes in ({"entity_id": "o2"}, {"version_key": "t:1"}, {"kind": "shipment"}):
        copy_ = replace(candidate, **changes)  # type: ignore[arg-type]
        assert copy_.event_id == event_id(copy_.kind, copy_.entity_id, copy_.version_key)
        assert copy_.event_id != first
    assert replace(candidate) == candidate  # the kept id is no part of equality
