# -*- test-case-name: tests.unit.test_auth_failures -*-
"""Failure counters in the database, so that every authd host sees the same attacker.

A password-guessing botnet spreads its attempts over every MX and submission host; counters
kept per process would let each host see only its share. Each failure is one atomic upsert
(retrying the same wrong password does not count again); before verifying, a host reads the
counters of the client's network and of the login, through a short cache so that a burst of
logins costs one read. The local, in-memory :class:`~authd.throttle.Throttle` still answers on
its own when the database is slow or down: sharing adds to the defence, never delays a login
by more than its database budget.

All functions here block; the verifier runs them in the database pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, case, delete, select

from mailplugins.db.auth_models import AuthFailure
from mailplugins.db.upsert import upsert_stmt
from mailplugins.ttlcache import TTLCache

TABLE = AuthFailure.__table__


@dataclass(frozen=True)
class RecordFailure:
    """One failure to count for each key (see :func:`record_failure`)."""

    keys: tuple[str, ...]
    fingerprint: str
    now: int
    window: int


@dataclass(frozen=True)
class ClearLogin:
    """A successful login forgives the login's own failures (see :func:`clear`)."""

    key: str


SharedWrite = RecordFailure | ClearLogin


def record_failure(engine: Engine, keys: Iterable[str], fingerprint: str, now: int, window: int) -> None:
    """Count one failure for each key, atomically; a row older than ``window`` restarts at 1."""
    with engine.begin() as conn:
        _record(conn, keys, fingerprint, now, window)


def write_batch(engine: Engine, writes: Sequence[SharedWrite]) -> None:
    """Apply ``writes`` in order in one transaction: what authd's writer does with a backlog."""
    with engine.begin() as conn:
        for write in writes:
            if isinstance(write, RecordFailure):
                _record(conn, write.keys, write.fingerprint, write.now, write.window)
            else:
                conn.execute(delete(AuthFailure).where(AuthFailure.key == write.key))


def _record(conn: Connection, keys: Iterable[str], fingerprint: str, now: int, window: int) -> None:
    stale = now - window
    for key in keys:
        conn.execute(upsert_stmt(
            conn, TABLE,
            {"key": key, "failures": 1, "last_seen": now, "fingerprint": fingerprint},
            ["key"],
            {
                # First: it reads last_seen and fingerprint before they are overwritten.
                "failures": lambda c, new: _next_count(c, new, stale),
                "last_seen": lambda c, new: new.last_seen,
                "fingerprint": lambda c, new: new.fingerprint,
            },
        ))


def _next_count(columns: object, new: object, stale: int) -> object:
    c = columns
    return case(
        (c.last_seen < stale, 1),  # type: ignore[attr-defined]
        (c.fingerprint == new.fingerprint, c.failures),  # type: ignore[attr-defined]
        else_=c.failures + 1,  # type: ignore[attr-defined]
    )


def failure_counts(engine: Engine, keys: Iterable[str], now: int, window: int) -> dict[str, int]:
    """Failures within ``window`` seconds for each key that has any."""
    wanted = list(keys)
    if not wanted:
        return {}
    with engine.connect() as conn:
        rows = conn.execute(
            select(AuthFailure.key, AuthFailure.failures)
            .where(AuthFailure.key.in_(wanted), AuthFailure.last_seen >= now - window)
        ).all()
    return {key: failures for key, failures in rows}


def clear(engine: Engine, key: str) -> None:
    """A successful login forgives the login's own failures (not its network's)."""
    with engine.begin() as conn:
        conn.execute(delete(AuthFailure).where(AuthFailure.key == key))


def purge(engine: Engine, now: int, window: int) -> int:
    """Drop rows that no longer count; returns how many."""
    with engine.begin() as conn:
        result = conn.execute(delete(AuthFailure).where(AuthFailure.last_seen < now - window))
        return int(result.rowcount or 0)


class CountCache:
    """Shared counts per key for a few seconds, bounded; a local failure bumps the cached value."""

    def __init__(self, ttl: float, size: int) -> None:
        self._entries: TTLCache[str, int] = TTLCache(size, ttl)

    def missing(self, keys: Iterable[str], now: float) -> list[str]:
        return [key for key in keys if self._entries.entry(key, now) is None]

    def counts(self, keys: Iterable[str], now: float) -> dict[str, int]:
        return {key: value for key in keys if (value := self._entries.get(key, now))}

    def store(self, keys: Iterable[str], counts: Mapping[str, int], now: float) -> None:
        for key in keys:
            self._entries.put(key, counts.get(key, 0), now)

    def bump(self, keys: Iterable[str], now: float) -> None:
        for key in keys:
            value = self._entries.get(key, now)
            if value is not None:
                self._entries.replace(key, value + 1)

    def forget(self, key: str) -> None:
        self._entries.discard(key)
