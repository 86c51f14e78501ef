# -*- test-case-name: tests.unit.test_deliver_service -*-
"""deliver's own Prometheus metrics (names get the ``mailplugins_deliver_`` prefix)."""

from __future__ import annotations

from mailplugins.metrics import DaemonMetrics, LabelCache

SIZE_BUCKETS = (1024.0, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120,
)


class DeliverMetrics:
    """deliver's own metrics (names get the ``mailplugins_deliver_`` prefix)."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        #: Label children cached (:class:`~mailplugins.metrics.LabelCache`): several updates
        #: per message. ``recipients["accepted"].inc()``; the results are a fixed set of words.
        self.recipients = LabelCache(metrics.counter(
            "recipients_total",
            "Recipients by outcome (at RCPT: accepted, unknown, ...; after DATA: delivered, ...).",
            ["result"],
        ))
        self.message_size = metrics.histogram(
            "message_size_bytes", "Size of messages received (LF line ends).", buckets=SIZE_BUCKETS
        )
        #: ``duration[stage].observe(seconds)`` (resolve, data, write).
        self.duration = LabelCache(metrics.histogram(
            "delivery_duration_seconds", "Time spent per stage (resolve, data, write).", ["stage"],
            buckets=DURATION_BUCKETS,
        ))
        self.bytes_written = metrics.counter(
            "bytes_written_total", "Bytes written to Maildir files (hard links not counted)."
        )
        #: ``quota_rejections[stage].inc()`` (rcpt, data).
        self.quota_rejections = LabelCache(metrics.counter(
            "quota_rejections_total", "Recipients refused for quota, by stage (rcpt, data).",
            ["stage"],
        ))
        self.junk = metrics.counter(
            "junk_total", "Messages filed into Junk for milterd's DMARC quarantine verdict."
        )
