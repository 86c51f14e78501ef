# -*- test-case-name: tests.unit.test_authd_verify -*-
"""authd's own metrics, on the daemon's registry. No label ever carries a login or address."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from mailplugins.metrics import DaemonMetrics

#: Hash costs range from microseconds (SSHA) to a second (strong bcrypt).
VERIFY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class AuthdMetrics:
    def __init__(self, metrics: DaemonMetrics) -> None:
        self.registry = metrics
        self.auth_requests: Counter = metrics.counter(
            "auth_requests_total",
            "Authentication requests answered, by mechanism (plain, login, http) and result.",
            ["mechanism", "result"],
        )
        self.auth_duration: Histogram = metrics.histogram(
            "auth_duration_seconds",
            "Time to answer an authentication, excluding deliberate failure and penalty delays.",
            ["mechanism", "result"],
        )
        self.verify_duration: Histogram = metrics.histogram(
            "password_verify_duration_seconds",
            "Time to check one password against its stored hash, by scheme.",
            ["scheme"],
            buckets=VERIFY_BUCKETS,
        )
        self.rehashes: Counter = metrics.counter(
            "password_rehashes_total", "Stored hashes upgraded on login, by old scheme.", ["scheme"]
        )
        self.cache: Counter = metrics.counter(
            "verify_cache_total", "Lookups in the cache of successful verifications.", ["result"]
        )
        self.master_logins: Counter = metrics.counter(
            "master_logins_total", "Successful logins of a master user as another mailbox."
        )
        self.penalties: Counter = metrics.counter(
            "penalties_total", "Requests delayed by a brute-force penalty."
        )
        self.penalty_seconds: Counter = metrics.counter(
            "penalty_seconds_total", "Seconds of brute-force penalty applied."
        )
        self.shared_writes: Counter = metrics.counter(
            "shared_writes_total",
            "Shared failure-counter writes (penalty_shared), by result: written, failed, or "
            "dropped because the writer's backlog was full.",
            ["result"],
        )
        self.protocol_errors: Counter = metrics.counter(
            "protocol_errors_total", "Connections dropped for breaking the protocol.", ["protocol"]
        )
        self.dict_requests: Counter = metrics.counter(
            "dict_requests_total", "Dict proxy commands answered, by command and result.",
            ["command", "result"],
        )
