"""Prometheus metrics: one registry per daemon, passed down like the settings.

Counters count what happened in this process (they restart at zero, as Prometheus
expects); gauges about the backlog (pending and dead deliveries) are read from the store
when scraped, so they are right across restarts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tcbridge.timefmt import instant_us

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class _CursorLag(Collector):
    """now - cursor per kind, computed when scraped (the lag grows between polls)."""

    def __init__(self) -> None:
        self.cursors_us: dict[str, int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tcbridge_cursor_lag_seconds", "Seconds between now and the poll cursor",
            labels=["kind"],
        )
        now_us = time.time() * 1_000_000
        for kind, cursor_us in sorted(self.cursors_us.items()):
            family.add_metric([kind], max(0.0, (now_us - cursor_us) / 1_000_000))
        yield family


STORE_COUNTERS = {
    "errors": ("tcbridge_store_errors", "Store operations that could not commit"),
    "rejected_truncated": ("tcbridge_rejected_truncated",
                           "Rejected bodies cut to store.rejected_body_max_bytes"),
    "rejected_dropped": ("tcbridge_rejected_dropped",
                         "Rejected requests dropped, oldest first, for store.rejected_max_bytes"),
}


class _StoreCounters(Collector):
    """Counters the store keeps itself (see STORE_COUNTERS), read when scraped."""

    def __init__(self) -> None:
        self.read: Callable[[], Mapping[str, int]] = dict

    def collect(self) -> Iterator[CounterMetricFamily]:
        values = self.read()
        for key, (name, documentation) in STORE_COUNTERS.items():
            yield CounterMetricFamily(name, documentation, value=values.get(key, 0))


class Metrics:
    """Every metric tcbridge exposes on the admin listener's ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("tcbridge_events", "Events stored", ["source", "kind"], registry=r)
        self.duplicates = Counter("tcbridge_duplicates", "Arrivals recorded as duplicates",
                                  ["source"], registry=r)
        self.stale = Counter("tcbridge_stale_snapshots", "Snapshots older than the newest stored",
                             ["kind"], registry=r)
        self.recovered = Counter(
            "tcbridge_recovered_events",
            "Events first seen by the poller in hybrid mode: the webhook missed them",
            ["kind"], registry=r)
        self.rejected = Counter("tcbridge_rejected", "Requests or items rejected and kept",
                                ["source"], registry=r)
        self.auth_failures = Counter("tcbridge_webhook_auth_failures",
                                     "Webhook requests with missing or wrong credentials",
                                     registry=r)
        self.oauth2_rejections = Counter(
            "tcbridge_webhook_oauth2_rejections",
            "OAuth 2.0 webhook tokens refused with 401, by reason", ["reason"], registry=r)
        self.oauth2_unavailable = Counter(
            "tcbridge_webhook_oauth2_unavailable",
            "Webhook calls answered 503 because the identity provider's keys were unavailable",
            registry=r)
        self.oauth2_key_fetches = Counter(
            "tcbridge_oauth2_key_fetches", "Fetches of the identity provider's key set, by outcome",
            ["outcome"], registry=r)
        self.poll_requests = Counter("tcbridge_poll_requests", "Poll pages requested", ["kind"],
                                     registry=r)
        self.poll_errors = Counter("tcbridge_poll_errors", "Poll cycles that failed", ["kind"],
                                   registry=r)
        self.poll_latency = Histogram("tcbridge_poll_request_seconds", "Poll request latency",
                                      ["kind"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.deliveries = Counter("tcbridge_deliveries", "Delivery attempts by outcome",
                                  ["handler", "outcome"], registry=r)
        self.delivery_latency = Histogram(
            "tcbridge_delivery_latency_seconds", "From receipt of the event to delivery done",
            ["handler"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.backlog = Gauge("tcbridge_deliveries_backlog",
                             "Deliveries not done, by handler and status (pending, running, dead)",
                             ["handler", "status"], registry=r)
        self.skipped = Counter(
            "tcbridge_deliveries_skipped",
            "Events a handler's filters did not take, by handler and reason",
            ["handler", "reason"], registry=r)
        self.documents = Counter(
            "tcbridge_documents_downloaded", "Documents downloaded for handlers",
            ["handler"], registry=r)
        self.shed = Counter(
            "tcbridge_webhook_shed",
            "Webhook connections or requests cut short to protect the listener, by reason",
            ["reason"], registry=r)
        self.fetch_failures = Counter("tcbridge_fetch_failures",
                                      "Fetch requests (legacy GET webhooks) given up",
                                      ["kind"], registry=r)
        self.fetch_requests = Gauge("tcbridge_fetch_requests",
                                    "Fetch requests by status (pending, failed), from the store",
                                    ["status"], registry=r)
        self._lag = _CursorLag()
        r.register(self._lag)
        self.webhook_responses = Counter("tcbridge_webhook_responses",
                                         "Webhook answers by HTTP status", ["status"],
                                         registry=r)
        self._store = _StoreCounters()
        r.register(self._store)
        # Labelled children by their labels: ``labels()`` takes a lock and checks its
        # arguments on every call, about 0.6 us of the loop's time per webhook.
        self._children: dict[tuple[object, ...], Counter] = {}

    def watch_store(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Expose the store's own counters: ``read()`` returns the keys of STORE_COUNTERS."""
        self._store.read = read

    def count_ingest(self, status: str, source: str, kind: str) -> None:
        """Count what became of one arrival (an ``IngestResult.status``)."""
        if status == "stored":
            self._child(self.events, source, kind).inc()
        elif status == "duplicate":
            self._child(self.duplicates, source).inc()
        else:
            self._child(self.stale, kind).inc()

    def count_response(self, status: int) -> None:
        """Count one webhook answer by its HTTP status."""
        self._child(self.webhook_responses, str(status)).inc()

    def _child(self, counter: Counter, *labels: str) -> Counter:
        key = (counter, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        return child

    def count_skip(self, handler: str, reason: str) -> None:
        """Count one event a handler's filters skipped (when the event is routed)."""
        self.skipped.labels(handler, reason).inc()

    def count_documents(self, handler: str, count: int) -> None:
        """Count documents downloaded for a handler."""
        self.documents.labels(handler).inc(count)

    def set_cursor(self, kind: str, cursor: str) -> None:
        """Remember a kind's cursor for the lag gauge."""
        self._lag.cursors_us[kind] = instant_us(cursor)

    def set_backlog(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """Set the backlog gauges from ``handler -> status -> count`` (missing means 0)."""
        for handler, by_status in counts.items():
            for status in ("pending", "running", "dead"):
                self.backlog.labels(handler, status).set(by_status.get(status, 0))

    def set_fetches(self, counts: Mapping[str, int]) -> None:
        """Set the fetch request gauges from ``status -> count``."""
        for status in ("pending", "failed"):
            self.fetch_requests.labels(status).set(counts.get(status, 0))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
