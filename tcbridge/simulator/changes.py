"""A realistic random mix of changes, for demos: new orders, line updates, shipments, bursts."""

from __future__ import annotations

from random import Random

from tcbridge.simulator import model
from tcbridge.simulator.world import World

# Plausible next events for a line in (processStatus, inProgressStatus), with weights by repetition.
NEXT_EVENTS: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("Issued", None): ("OrderLinesConfirmedBySupplier",) * 4 + (model.PROPOSED,) * 2 + (
        "OrderLinesAcceptedBySupplier", "OrderLinesRejectedBySupplier",
        model.LINES_UPDATED_BY_BUYER),
    ("InProgress", "OpenSupplierProposal"): ("OrderChangesProposalApprovedByBuyer",) * 3 + (
        "OrderChangesProposalRejectedByBuyer",),
    ("InProgress", None): ("OrderLinesConfirmedBySupplier", model.PROPOSED),
    ("Confirmed", None): (
        "OrderLinesMarkedAsDeliveredByBuyer", "OrderLinesCompletedByBuyer",
        "OrderLinesReconfirmationRequestedByBuyer",
        "OrderLinesShipmentRescheduleRequestedBySupplier", "OrderLinesCancelledByBuyer"),
    ("Confirmed", "OpenBuyerReconfirmationRequest"): ("OrderLinesReconfirmedBySupplier",),
    ("Confirmed", "OpenSupplierShipmentRescheduleRequest"): (
        "OrderChangesProposalApprovedByBuyer",),
}

_KINDS = ("order",) * 30 + ("update",) * 45 + ("shipment",) * 12 + (
    "shipment_update",) * 4 + ("new_lines",) * 4 + ("burst",) * 5


def random_change(world: World, rng: Random) -> None:
    """Make one random change (or one burst) in ``world``."""
    kind = rng.choice(_KINDS)
    if kind == "update" and _update_random_order(world, rng):
        return
    if kind == "shipment" and world.order_ids():
        world.add_shipments(1, [rng.choice(world.order_ids())])
    elif kind == "shipment_update" and world.shipment_ids():
        event = rng.choice(("ShipmentApprovedByBuyer", "ShipmentReissuedBySupplier",
                            "ShipmentHeaderUpdatedBySupplier"))
        world.update_shipment(rng.choice(world.shipment_ids()), event)
    elif kind == "new_lines" and world.order_ids():
        world.update_order(rng.choice(world.order_ids()), model.LINES_ISSUED, rng.randint(1, 2))
    elif kind == "burst":
        world.add_orders(rng.randint(5, 20), same_timestamp=True, lines=rng.randint(1, 4))
    else:
        world.add_orders(1, same_timestamp=False, lines=rng.randint(1, 6))


def _update_random_order(world: World, rng: Random) -> bool:
    """Advance some lines of a random recent order; False if it has nothing left to do."""
    ids = world.order_ids()[-200:]
    order = world.order(rng.choice(ids)) if ids else None
    if order is None:
        return False
    line = rng.choice(order["lines"])
    state = (line["status"]["processStatus"], line["status"]["inProgressStatus"])
    events = NEXT_EVENTS.get(state)
    if not events:
        return False
    same = [ln["id"] for ln in order["lines"]
            if (ln["status"]["processStatus"], ln["status"]["inProgressStatus"]) == state]
    line_ids = sorted(rng.sample(same, rng.randint(1, min(2, len(same)))), key=same.index)
    world.update_order(order["id"], rng.choice(events), len(line_ids), line_ids)
    return True
