"""Prometheus metrics of accounting. Labels are bounded: fixed small sets, never an account or a uuid.

The CDR writer and the low-balance mailer run in the sync worker, which creates this set on its
own registry (``BillingMetrics(sync_metrics.registry)``, engine.sync.worker), so they are served on
[sync] metrics_port with engine.sync.metrics. The two classes keep the same plain shape (a registry,
then one attribute per metric) rather than a shared base: a base would save two lines each and
hide which registry a metric lands in.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

EMAIL_STATUSES = ("sent", "failed", "retry")


class BillingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.cdrs_written = Counter(
            "callgate_cdrs_written_total",
            "CDR rows inserted into PostgreSQL (duplicates not counted)",
            registry=r,
        )
        self.cdrs_duplicate = Counter(
            "callgate_cdrs_duplicate_total",
            "CDR records already in PostgreSQL (a repeated hangup)",
            registry=r,
        )
        self.cdrs_bad = Counter(
            "callgate_cdrs_bad_total",
            "CDR records that could not be stored (logged, acknowledged)",
            registry=r,
        )
        self.duplicates_taken_back = Counter(
            "callgate_cdr_duplicate_debits_taken_back_total",
            "Accounts whose Redis spent counter was corrected for a hangup settled twice",
            registry=r,
        )
        self.debits_written = Counter(
            "callgate_call_debits_written_total", "Call debits applied to account balances", registry=r
        )
        self.debited_amount = Counter(
            "callgate_call_debited_amount_total",
            "Sum of the call debits applied to balances (all currencies added: a volume indicator)",
            registry=r,
        )
        self.backlog = Gauge(
            "callgate_cdr_backlog",
            "CDR stream entries not yet written to PostgreSQL (undelivered + delivered but unacknowledged)",
            registry=r,
        )
        self.lag = Gauge(
            "callgate_cdr_lag_seconds",
            "Age of the oldest CDR entry not yet written to PostgreSQL (0 when none)",
            registry=r,
        )
        self.batch_failures = Counter(
            "callgate_cdr_write_failures_total", "CDR batches that failed and will be retried", registry=r
        )
        self.emails = Counter(
            "callgate_low_balance_emails_total", "Low-balance e-mails by outcome", ["status"], registry=r
        )
        self.reserved = Gauge(
            "callgate_funds_reserved",
            "Funds held by open calls' reservations, all accounts added",
            registry=r,
        )
        self.open_reservations = Gauge(
            "callgate_funds_open_reservations", "Calls holding a funds reservation", registry=r
        )
        for status in EMAIL_STATUSES:
            self.emails.labels(status)
