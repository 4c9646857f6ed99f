"""Prometheus metrics, one registry per daemon so several can live in one process (tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

# A hot-path statement this slow holds every slot waiting on it: worth a line of its own, not
# only a histogram bucket (claims and records take milliseconds).
SLOW_STATEMENT_SECONDS = 0.5


def _registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


@dataclass(slots=True)
class Metrics:
    registry: CollectorRegistry = field(default_factory=_registry)
    attempts: Counter = field(init=False)
    deliveries: Counter = field(init=False)
    attempt_seconds: Histogram = field(init=False)
    in_flight: Gauge = field(init=False)
    unrecorded: Gauge = field(init=False)
    queue_depth: Gauge = field(init=False)
    oldest_due_age: Gauge = field(init=False)
    claims: Counter = field(init=False)
    claimed: Counter = field(init=False)
    flushes: Counter = field(init=False)
    db_errors: Counter = field(init=False)
    deactivations: Counter = field(init=False)
    subscriptions: Gauge = field(init=False)
    client_certificates_expiring: Gauge = field(init=False)
    db_seconds: Histogram = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.attempts = Counter(
            "dispatcher_attempts",
            "HTTP attempts made, by verdict and status class",
            ["verdict", "status_class"],
            registry=r,
        )
        self.deliveries = Counter(
            "dispatcher_deliveries",
            "Deliveries that reached an end, by outcome",
            ["outcome"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "dispatcher_attempt_duration_seconds",
            "Duration of HTTP attempts",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.in_flight = Gauge(
            "dispatcher_in_flight",
            "Requests this instance has in flight",
            registry=r,
        )
        self.unrecorded = Gauge(
            "dispatcher_outcomes_unwritten",
            "Attempt outcomes this instance has not yet written to the database",
            registry=r,
        )
        self.queue_depth = Gauge(
            "dispatcher_queue_depth",
            "Live deliveries in the queue (all instances, not paused)",
            registry=r,
        )
        self.oldest_due_age = Gauge(
            "dispatcher_oldest_due_age_seconds",
            "How long the oldest due, unclaimed delivery has waited",
            registry=r,
        )
        self.claims = Counter("dispatcher_claims", "Claim queries run", registry=r)
        self.claimed = Counter("dispatcher_claimed", "Deliveries claimed", registry=r)
        self.flushes = Counter("dispatcher_flushes", "Outcome batches written", registry=r)
        self.deactivations = Counter(
            "dispatcher_subscriptions_deactivated",
            "Subscriptions this instance deactivated or deleted because of their receiver's "
            "answers, by reason (status, unsubscribe, error_rate)",
            ["reason"],
            registry=r,
        )
        self.subscriptions = Gauge(
            "dispatcher_subscriptions",
            "Subscriptions in the database, by state (active, inactive)",
            ["state"],
            registry=r,
        )
        self.client_certificates_expiring = Gauge(
            "dispatcher_client_certificates_expiring",
            "Active subscriptions whose client certificate (mTLS) expires within 14 days or "
            "has expired (checked hourly)",
            registry=r,
        )
        self.db_seconds = Histogram(
            "dispatcher_db_duration_seconds",
            "Duration of the hot path's statements (claim, record), by operation",
            ["operation"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.db_errors = Counter(
            "dispatcher_db_errors",
            "Database errors on the hot path, by operation",
            ["operation"],
            registry=r,
        )

    def observe_db(self, operation: str, seconds: float, rows: int) -> None:
        """A hot-path statement's duration; one that took SLOW_STATEMENT_SECONDS or more is
        also logged (`db.slow_statement`), with its operation and how many rows it handled."""
        self.db_seconds.labels(operation).observe(seconds)
        if seconds >= SLOW_STATEMENT_SECONDS:
            log.warning(
                "db.slow_statement", operation=operation, ms=round(seconds * 1000, 1), rows=rows
            )

    def mean_db_seconds(self, operation: str) -> float | None:
        """The mean duration of one hot-path statement so far (None before the first)."""
        total = count = 0.0
        for metric in self.db_seconds.collect():
            for sample in metric.samples:
                if sample.labels.get("operation") != operation:
                    continue
                if sample.name.endswith("_sum"):
                    total = sample.value
                elif sample.name.endswith("_count"):
                    count = sample.value
        return total / count if count else None

    def attempt_seconds_total(self) -> float:
        """Seconds of recorded HTTP attempts, summed: over a span of time, divided by it,
        the mean number of requests in flight."""
        for metric in self.attempt_seconds.collect():
            for sample in metric.samples:
                if sample.name.endswith("_sum"):
                    return float(sample.value)
        return 0.0
