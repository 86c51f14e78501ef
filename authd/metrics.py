# -*- test-case-name: tests.unit.test_authd_verify -*-
"""authd's own metrics, on the daemon's registry. No label ever carries a login or address.

Every labelled metric here is a :class:`~mailplugins.metrics.LabelCache` (``auth_requests[
"plain", "success"].inc()``; the metric itself is ``.metric``): most are updated on every
login or dict command. Their label values come from small fixed sets: mechanisms (plain,
login, http), results, protocols (sasl, dict), dict commands, and password schemes, which are
the ``{SCHEME}`` prefixes of the stored hashes (written by the administrator's tools and
imports, never chosen by a client; prometheus-client keeps each of those series anyway).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from mailplugins.metrics import DaemonMetrics, LabelCache

#: Hash costs range from microseconds (SSHA) to a second (strong bcrypt).
VERIFY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class AuthdMetrics:
    def __init__(self, metrics: DaemonMetrics) -> None:
        self.registry = metrics
        #: ``auth_requests[mechanism, result]`` (result: success, failure, tempfail).
        self.auth_requests: LabelCache[Counter] = LabelCache(metrics.counter(
            "auth_requests_total",
            "Authentication requests answered, by mechanism (plain, login, http) and result.",
            ["mechanism", "result"],
        ))
        #: ``auth_duration[mechanism, result]``, as ``auth_requests``.
        self.auth_duration: LabelCache[Histogram] = LabelCache(metrics.histogram(
            "auth_duration_seconds",
            "Time to answer an authentication, excluding deliberate failure and penalty delays.",
            ["mechanism", "result"],
        ))
        #: ``verify_duration[scheme]``, observed on the CPU pool's threads: a miss there is
        #: harmless, ``labels()`` gives every thread the same child.
        self.verify_duration: LabelCache[Histogram] = LabelCache(metrics.histogram(
            "password_verify_duration_seconds",
            "Time to check one password against its stored hash, by scheme.",
            ["scheme"],
            buckets=VERIFY_BUCKETS,
        ))
        #: ``rehashes[old_scheme]``.
        self.rehashes: LabelCache[Counter] = LabelCache(metrics.counter(
            "password_rehashes_total", "Stored hashes upgraded on login, by old scheme.", ["scheme"]
        ))
        #: ``cache["hit"]`` or ``cache["miss"]``.
        self.cache: LabelCache[Counter] = LabelCache(metrics.counter(
            "verify_cache_total", "Lookups in the cache of successful verifications.", ["result"]
        ))
        self.master_logins: Counter = metrics.counter(
            "master_logins_total", "Successful logins of a master user as another mailbox."
        )
        self.penalties: Counter = metrics.counter(
            "penalties_total", "Requests delayed by a brute-force penalty."
        )
        self.penalty_seconds: Counter = metrics.counter(
            "penalty_seconds_total", "Seconds of brute-force penalty applied."
        )
        #: ``shared_writes[result]`` (written, failed, dropped).
        self.shared_writes: LabelCache[Counter] = LabelCache(metrics.counter(
            "shared_writes_total",
            "Shared failure-counter writes (penalty_shared), by result: written, failed, or "
            "dropped because the writer's backlog was full.",
            ["result"],
        ))
        #: ``protocol_errors["sasl"]`` or ``protocol_errors["dict"]``.
        self.protocol_errors: LabelCache[Counter] = LabelCache(metrics.counter(
            "protocol_errors_total", "Connections dropped for breaking the protocol.", ["protocol"]
        ))
        #: ``dict_requests[command, result]`` (lookup, iterate, commit; found, not_found, ok,
        #: error).
        self.dict_requests: LabelCache[Counter] = LabelCache(metrics.counter(
            "dict_requests_total", "Dict proxy commands answered, by command and result.",
            ["command", "result"],
        ))
