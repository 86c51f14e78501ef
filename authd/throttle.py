# -*- test-case-name: tests.unit.test_authd_throttle -*-
"""Brute-force counters: failures per client network and per login, and the penalty they earn.

Pure: ``now`` is passed in. Past ``threshold`` failures a key's next request waits a penalty
doubling from ``initial`` up to ``maximum``; retrying the same wrong password (a client with a
stale one) does not count again. Memory is bounded by ``size`` (the shared TTL cache)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from mailplugins.clients import client_ip, client_network
from mailplugins.ttlcache import TTLCache


@dataclass
class _Counter:
    failures: int
    fingerprint: bytes


class Throttle:
    """Failure counters per key (client network or login), with bounded memory.

    Pure: ``now`` is passed in. A counter lasts ``window`` seconds after its last failure; the
    keys failed longest ago are forgotten first when the table is full.
    """

    def __init__(
        self,
        *,
        threshold: int,
        initial: float,
        maximum: float,
        window: float,
        size: int,
    ) -> None:
        self.threshold = threshold
        self.initial = initial
        self.maximum = maximum
        self.window = window
        self.size = size
        self._table: TTLCache[str, _Counter] = TTLCache(size)

    def _get(self, key: str, now: float) -> _Counter | None:
        return self._table.get(key, now)

    def penalty(
        self, keys: list[str], now: float, shared: Mapping[str, int] | None = None
    ) -> float:
        """Seconds to hold the next request for any of ``keys``; ``shared`` adds the counts
        other hosts recorded (the larger of the two counts applies)."""
        worst = 0.0
        for key in keys:
            counter = self._get(key, now)
            failures = max(counter.failures if counter else 0, (shared or {}).get(key, 0))
            if failures < self.threshold:
                continue
            steps = min(failures - self.threshold, 32)
            worst = max(worst, min(self.maximum, self.initial * 2**steps))
        return worst

    def failure(self, keys: list[str], fingerprint: bytes, now: float) -> None:
        for key in keys:
            counter = self._get(key, now)
            if counter is None:
                counter = _Counter(1, fingerprint)
            elif not hmac.compare_digest(counter.fingerprint, fingerprint):
                counter.failures += 1
            counter.fingerprint = fingerprint
            self._table.put(key, counter, expires=now + self.window)

    def success(self, key: str) -> None:
        self._table.discard(key)

    def __len__(self) -> int:
        return len(self._table)


def network_key(remote_ip: str | None, ipv6_prefix: int) -> str | None:
    """The counter key of a client: its IPv4 address, or its IPv6 network."""
    address = client_ip(remote_ip) if remote_ip else None
    if address is None or remote_ip is None:
        return None
    if address.version == 6:
        return f"ip:{client_network(remote_ip, 32, ipv6_prefix)}"
    return f"ip:{address}"
