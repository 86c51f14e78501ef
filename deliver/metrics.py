# -*- test-case-name: tests.unit.test_deliver_service -*-
"""deliver's own Prometheus metrics (names get the ``mailplugins_deliver_`` prefix)."""

from __future__ import annotations

from typing import Any

from mailplugins.metrics import DaemonMetrics

SIZE_BUCKETS = (1024.0, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120,
)


class DeliverMetrics:
    """deliver's own metrics (names get the ``mailplugins_deliver_`` prefix)."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.recipients = metrics.counter(
            "recipients_total",
            "Recipients by outcome (at RCPT: accepted, unknown, ...; after DATA: delivered, ...).",
            ["result"],
        )
        self.message_size = metrics.histogram(
            "message_size_bytes", "Size of messages received (LF line ends).", buckets=SIZE_BUCKETS
        )
        self.duration = metrics.histogram(
            "delivery_duration_seconds", "Time spent per stage (resolve, data, write).", ["stage"],
            buckets=DURATION_BUCKETS,
        )
        self.bytes_written = metrics.counter(
            "bytes_written_total", "Bytes written to Maildir files (hard links not counted)."
        )
        self.quota_rejections = metrics.counter(
            "quota_rejections_total", "Recipients refused for quota, by stage (rcpt, data).",
            ["stage"],
        )
        self.junk = metrics.counter(
            "junk_total", "Messages filed into Junk for milterd's DMARC quarantine verdict."
        )
        self._recipient: dict[str, Any] = {}
        self._stage: dict[str, Any] = {}

    def recipient(self, result: str) -> Any:
        """``recipients.labels(result)``, looked up once: prometheus-client's ``labels`` takes a
        lock and validates on every call, several times per message. The results are a fixed
        set of words, so the dictionary stays small."""
        child = self._recipient.get(result)
        if child is None:
            child = self._recipient[result] = self.recipients.labels(result)
        return child

    def stage(self, stage: str) -> Any:
        """``duration.labels(stage)``, looked up once (resolve, data, write)."""
        child = self._stage.get(stage)
        if child is None:
            child = self._stage[stage] = self.duration.labels(stage)
        return child

