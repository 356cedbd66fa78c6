"""The dispatcher: delivers stored events to handlers at least once, in order per entity.

Each handler has its own lane with its own concurrency, so a failing or slow handler
never delays another. A lane claims due deliveries from the store (which keeps them in
order per entity), runs them, and writes the outcomes back, shielded from cancellation:
outcomes that end while the previous write is in flight go to the store together, in one
operation (an outcome buffer per lane). A delivery's row stays ``running`` until its
outcome is committed, so the next delivery of its entity cannot be claimed before; a crash
in between leaves it ``running``, and start-up makes it pending again (redelivered, never
lost). Retries are rows, not sleeps: the next attempt time lives in the store, so a
restart resumes the schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
import structlog

from tcbridge.aio import settle, wait_any
from tcbridge.backoff import backoff_s
from tcbridge.config import HandlerSettings
from tcbridge.errors import InvalidEvent, StoreError, describe
from tcbridge.filters import SkipReason, skip_reason
from tcbridge.handlers import Handler, Outcome
from tcbridge.metrics import Metrics
from tcbridge.store import Claim, DeliveryStatus, Finished, StoreBackend
from tcbridge.timefmt import instant_us

log = structlog.get_logger(__name__)

IDLE_CHECK_S = 2.0  # also notice work queued by another process (`tcbridge replay`)
STORE_RETRY_S = 1.0
DEFAULT_LEASE_S = 60.0  # [delivery] lease_s
RENEWALS_PER_LEASE = 3  # a lease survives two failed renewals in a row
OUTCOME_BATCH_MAX = 500  # outcomes per store operation (one transaction's worth)


@dataclass(frozen=True, slots=True)
class Decision:
    """What an attempt's outcome means for the delivery."""

    status: DeliveryStatus
    next_attempt_at: float | None = None


def retry_delay_s(settings: HandlerSettings, attempt: int, retry_after_s: float | None) -> float:
    """Exponential backoff with jitter between the handler's bounds; Retry-After is a floor."""
    return backoff_s(settings.retry_initial_s, settings.retry_max_s, attempt - 1, retry_after_s)


def decide(settings: HandlerSettings, outcome: Outcome, attempt: int, now: float) -> Decision:
    """done, dead (permanent, or out of attempts), or pending again after a backoff."""
    if outcome.status == "done":
        return Decision("done")
    if outcome.status == "dead" or attempt >= settings.max_attempts:
        return Decision("dead")
    return Decision("pending", now + retry_delay_s(settings, attempt, outcome.retry_after_s))


def make_route(
    handlers: Sequence[HandlerSettings],
    on_skip: Callable[[str, SkipReason], None] | None = None,
) -> Callable[[Mapping[str, Any]], list[str]]:
    """The function the store calls to fan a new event out to matching handlers;
    ``on_skip(handler, reason)`` hears of every handler a filter skipped."""

    def route(envelope: Mapping[str, Any]) -> list[str]:
        routed = []
        for h in handlers:
            reason = skip_reason(h, envelope)
            if reason is None:
                routed.append(h.name)
            elif on_skip is not None:
                on_skip(h.name, reason)
        return routed

    return route


def explain_route(
    handlers: Sequence[HandlerSettings], envelope: Mapping[str, Any]
) -> dict[str, str]:
    """handler -> why the current filters skip this envelope (handlers that take it are left
    out); for ``tcbridge events``."""
    reasons = {h.name: skip_reason(h, envelope) for h in handlers}
    return {name: reason for name, reason in reasons.items() if reason is not None}


class Lane:
    """One handler's queue runner."""

    def __init__(
        self,
        settings: HandlerSettings,
        handler: Handler,
        store: StoreBackend,
        *,
        metrics: Metrics | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self._store = store
        self._renew_every_s = lease_s / RENEWALS_PER_LEASE
        self._renewal: asyncio.Task[None] | None = None
        self._metrics = metrics or Metrics()
        self.wake = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}  # every delivery not yet recorded
        self._busy: set[int] = set()  # deliveries whose handler call runs: the slots taken
        self._outcomes = OutcomeBuffer(store)
        self._draining = False
        self._idle = asyncio.Event()  # clear while a claim is in flight
        self._idle.set()
        self._crashed: BaseException | None = None  # a delivery task died of a bug

    @property
    def name(self) -> str:
        """The handler's name."""
        return self.settings.name

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` has begun (nothing new starts)."""
        return self._draining

    async def run_once(self) -> int:
        """Claim what is due and free, run it to the end; returns how many ran."""
        claims = await self._store.claim(self.name, self.settings.concurrency)
        await asyncio.gather(*(self._deliver(claim) for claim in claims))
        return len(claims)

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run deliveries until ``stop`` is set."""
        while not stop.is_set() and not self._draining:
            self.wake.clear()
            if self._crashed is not None:  # the supervisor above decides what happens next
                raise LaneFailed(f"lane {self.name}: a delivery task died: "
                                 f"{describe(self._crashed)}") from self._crashed
            try:
                due = await self._fill()
            except StoreError as e:
                log.warning("dispatch.store_failed", handler=self.name, error=str(e))
                due = time.time() + STORE_RETRY_S
            await wait_any(stop, self.wake, self._delay(due))

    def _delay(self, due: float | None) -> float:
        if due is None:
            return IDLE_CHECK_S
        return min(IDLE_CHECK_S, max(0.0, due - time.time()))

    async def _fill(self) -> float | None:
        """Claim what fits; returns when the next pending delivery is due (None: nothing
        to do until woken, or every slot is busy and a finishing one will wake us)."""
        free = self.settings.concurrency - len(self._busy)
        if free <= 0 or self._draining:
            return None
        self._idle.clear()
        try:
            claims, due = await self._store.claim_and_next_due(self.name, free)
            if self._draining:  # drain began while the claim was in flight: start nothing
                await asyncio.shield(self._release_all(claims))
                return None
            for claim in claims:
                task = asyncio.create_task(self._deliver(claim), name=f"deliver-{claim.id}")
                self._running[claim.id] = task
                self._busy.add(claim.id)
                task.add_done_callback(functools.partial(self._done, claim.id))
            if claims:
                self._keep_leases()
        finally:
            self._idle.set()
        return due

    def _keep_leases(self) -> None:
        """Renew the claims' leases while any delivery runs (one task per lane)."""
        if self._renewal is None or self._renewal.done():
            self._renewal = asyncio.create_task(self._renew_while_running(),
                                                name=f"renew-{self.name}")

    async def _renew_while_running(self) -> None:
        """Every third of the lease, extend the running claims' leases (on PostgreSQL; a
        SQLite store is one process's and keeps them). A claim found lost (its lease ran
        out, say the store was unreachable) may be delivered again by another replica:
        at least once, never lost; say so."""
        while self._running:
            await asyncio.sleep(self._renew_every_s)
            ids = sorted(self._running)
            if not ids:
                return
            try:
                held = set(await self._store.renew(self.name, ids))
            except Exception as e:  # a failed renewal is retried; the lease has slack
                log.warning("dispatch.renew_failed", handler=self.name, error=describe(e))
                continue
            for claim_id in ids:
                if claim_id not in held and claim_id in self._running:
                    log.warning("dispatch.lease_lost", handler=self.name, delivery=claim_id,
                                message="the lease ran out: another replica may deliver "
                                        "it again")

    def _free(self, claim_id: int) -> None:
        # The handler call ended: its slot is free while the outcome is being written (the
        # row stays running until then, so its entity's next delivery still waits).
        self._busy.discard(claim_id)
        self.wake.set()

    def _done(self, claim_id: int, task: asyncio.Task[None]) -> None:
        # A recorded delivery may unblock the next one of its entity.
        self._running.pop(claim_id, None)
        self._busy.discard(claim_id)
        if not self._running and self._renewal is not None:
            self._renewal.cancel()  # nothing left to renew (claimed again: a new one)
            self._renewal = None
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatch.delivery_task_died", handler=self.name, delivery=claim_id,
                      error=repr(task.exception()))
            self._crashed = task.exception()
        self.wake.set()

    async def drain(self, timeout_s: float) -> int:
        """Start nothing new, wait for a claim in flight, then for running deliveries up to
        ``timeout_s``, then cancel the rest (they stay pending), then for the outcome
        buffer to be written; returns how many were cancelled. A claim that returns after
        drain began is released unstarted."""
        self._draining = True
        self.wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with contextlib.suppress(TimeoutError):  # a hung store: start-up releases the rows
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        tasks = list(self._running.values())
        late: set[asyncio.Task[None]] = set()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        # A cancelled delivery whose outcome was handed in is still written: wait for it.
        await self._outcomes.flushed(max(STORE_RETRY_S, deadline - loop.time()))
        return len(late)

    async def _deliver(self, claim: Claim) -> None:
        """One attempt, whatever happens a recorded outcome: an exception anywhere in it is
        a failed attempt, never a row left ``running`` that blocks its entity's lane."""
        envelope, unreadable = read_envelope(claim.body)
        with structlog.contextvars.bound_contextvars(
            event_id=claim.event_id, entity_id=claim.entity_id, kind=envelope.get("kind"),
            source=envelope.get("source"), handler=self.name, attempt=claim.attempt,
        ):
            try:
                outcome = unreadable or await self._attempt(claim, envelope)
            except asyncio.CancelledError:
                await asyncio.shield(self._release(claim))
                raise
            except Exception as e:  # a bug of ours between claim and outcome: still an attempt
                log.exception("dispatch.attempt_failed")
                outcome = Outcome("retry", error=describe(e))
            finally:
                self._free(claim.id)
            decision = decide(self.settings, outcome, claim.attempt, time.time())
            finished = Finished(claim, decision.status, _storable(outcome.error),
                                _storable(outcome.output), decision.next_attempt_at)
            # The buffer's own task writes it: a cancelled delivery never cancels the write.
            await asyncio.shield(self._outcomes.record(finished))
            _log_decision(decision, outcome)
            self._observe(decision, envelope)

    def _observe(self, decision: Decision, envelope: Mapping[str, Any]) -> None:
        outcome = "retry" if decision.status == "pending" else decision.status
        self._metrics.deliveries.labels(self.name, outcome).inc()
        if decision.status == "done" and isinstance(envelope.get("receivedAt"), str):
            with contextlib.suppress(InvalidEvent):
                latency_s = time.time() - instant_us(envelope["receivedAt"]) / 1_000_000
                self._metrics.delivery_latency.labels(self.name).observe(max(0.0, latency_s))

    async def _attempt(self, claim: Claim, envelope: Mapping[str, Any]) -> Outcome:
        if not claim.body:  # the payload was purged: nothing left to deliver
            return Outcome("dead", error="the event's payload was purged by retention")
        try:
            return await self.handler.deliver(envelope, claim.body.encode(), claim.attempt)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a handler bug must not stop the lane: retry it
            log.exception("dispatch.handler_raised")
            return Outcome("retry", error=describe(e))

    async def _release(self, claim: Claim) -> None:
        try:
            await self._store.release([claim.id])
        except StoreError as e:  # start-up releases it anyway
            log.warning("dispatch.release_failed", error=str(e))

    async def _release_all(self, claims: Sequence[Claim]) -> None:
        if not claims:
            return
        try:
            await self._store.release([claim.id for claim in claims])
        except StoreError as e:  # start-up releases them anyway
            log.warning("dispatch.release_failed", error=str(e))


class OutcomeBuffer:
    """A lane's outcomes on their way to the store: those handed in while a write is in
    flight go together in the next one (group commit, one level above the store's). Each
    caller's future is answered once its outcome is committed, so "recorded" keeps its
    meaning; the writes run in the buffer's own task, never cancelled with a delivery."""

    def __init__(self, store: StoreBackend, batch_max: int = OUTCOME_BATCH_MAX) -> None:
        self._store = store
        self._batch_max = batch_max
        self._waiting: list[tuple[Finished, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    def record(self, finished: Finished) -> asyncio.Future[None]:
        """Hand in one outcome; the future is done once it is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((finished, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all(), name="outcome-writer")
        return future

    async def flushed(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` until every outcome handed in is written."""
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), timeout_s)

    async def _write_all(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._batch_max]
                del self._waiting[: self._batch_max]
                await self._write(batch)
        finally:
            self._writer = None

    async def _write(self, batch: list[tuple[Finished, asyncio.Future[None]]]) -> None:
        """One operation for the batch; if the store refuses it (not a StoreError: a row it
        cannot take), each outcome on its own, so one bad row spoils no other."""
        if len(batch) > 1:
            try:
                await self._store_many([finished for finished, _ in batch])
            except Exception:
                log.exception("dispatch.record_batch_refused", outcomes=len(batch))
            else:
                for _, future in batch:
                    settle(future, None, None)
                return
        for finished, future in batch:
            try:
                await self._write_one(finished)
            except Exception as e:  # a bug: the delivery task dies and fails its lane
                settle(future, None, e)
            else:
                settle(future, None, None)

    async def _store_many(self, outcomes: list[Finished]) -> None:
        """Write; keep trying while the store is unavailable."""
        while True:
            try:
                await self._store.finish_many(outcomes)
                return
            except StoreError as e:
                log.warning("dispatch.record_failed", error=str(e), outcomes=len(outcomes))
                await asyncio.sleep(STORE_RETRY_S)

    async def _write_one(self, finished: Finished) -> None:
        """Write one outcome; text the store still refuses (after the escaping) is dropped
        and the attempt recorded without its texts."""
        while True:
            try:
                await self._store_many([finished])
                return
            except Exception as e:
                if finished.error is None and finished.output is None:
                    raise
                log.exception("dispatch.record_refused")
                error = f"the outcome could not be recorded: {type(e).__name__}"
                finished = replace(finished, error=error, output=None)



class LaneFailed(Exception):
    """A lane cannot go on (a delivery task died of a bug); its supervisor is told."""


def read_envelope(body: str) -> tuple[Mapping[str, Any], Outcome | None]:
    """The stored envelope, or the dead outcome that says why it cannot be read (no retry
    makes a stored text readable; a purged payload, ``""``, is the handler path's case)."""
    if not body:
        return {}, None
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        return {}, Outcome("dead", error=f"the stored envelope cannot be read: {e}")
    if not isinstance(envelope, dict):
        return {}, Outcome("dead", error="the stored envelope is not a JSON object")
    return envelope, None


def _check_lanes(tasks: Mapping[asyncio.Task[None], Lane], stop: asyncio.Event) -> None:
    """A lane that ended before ``stop`` (of a bug, or returning) fails the dispatcher, so
    the daemon's supervisor sees it: a handler that silently never delivers again is worse
    than a restart."""
    for task, lane in tasks.items():
        if not task.done() or (stop.is_set() and not task.cancelled()
                               and task.exception() is None):
            continue
        if task.cancelled():
            raise LaneFailed(f"lane {lane.name} was cancelled")
        error = task.exception()
        if error is not None:
            raise LaneFailed(f"lane {lane.name} died: {describe(error)}") from error
        if not lane.draining:
            raise LaneFailed(f"lane {lane.name} stopped before the daemon did")


def _storable(text: str | None) -> str | None:
    """Text SQLite can bind: lone surrogates (from a payload quoted in an error) escaped."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _log_decision(decision: Decision, outcome: Outcome) -> None:
    if decision.status == "done":
        log.info("delivery.done")
    elif decision.status == "dead":
        log.error("delivery.dead", error=outcome.error, output=outcome.output)
    else:
        assert decision.next_attempt_at is not None
        log.warning("delivery.retry", error=outcome.error,
                    delay_s=round(decision.next_attempt_at - time.time(), 2))


class Dispatcher:
    """All lanes, woken together by the store's "new events" event."""

    def __init__(
        self, lanes: Sequence[Lane], store: StoreBackend, wake: asyncio.Event
    ) -> None:
        self.lanes = list(lanes)
        self._store = store
        self._wake = wake

    async def start(self) -> int:
        """Release deliveries a crash left running; returns how many."""
        released = await self._store.release()
        if released:
            log.warning("dispatch.resumed_interrupted", deliveries=released)
        return released

    async def run_once(self) -> int:
        """Every lane once (for tests and tools)."""
        counts = await asyncio.gather(*(lane.run_once() for lane in self.lanes))
        return sum(counts)

    async def run(self, stop: asyncio.Event) -> None:
        """Run every lane and fan the wake-up out to them until ``stop`` is set."""
        tasks = {asyncio.create_task(lane.run(stop), name=f"lane-{lane.name}"): lane
                 for lane in self.lanes}
        try:
            while not stop.is_set():
                # A lane that drained (drain without stop) is done: watching it would spin.
                await wait_any(stop, self._wake, None,
                               also=[task for task in tasks if not task.done()])
                self._wake.clear()
                for lane in self.lanes:
                    lane.wake.set()
                _check_lanes(tasks, stop)
            if tasks:  # the lanes end on stop; one that died meanwhile still counts
                await asyncio.wait(tasks)
                _check_lanes(tasks, stop)
        finally:
            for task in tasks:
                task.cancel()

    async def drain(self, timeout_s: float) -> int:
        """Start nothing new, wait for running deliveries of every lane; returns how many
        were cut off."""
        counts = await asyncio.gather(*(lane.drain(timeout_s) for lane in self.lanes))
        return sum(counts)

    async def close(self) -> None:
        """Close every handler."""
        for lane in self.lanes:
            await lane.handler.close()
