# -*- test-case-name: tests.unit.test_greylist -*-
"""Expired policy state deleted in batches (in the database pool, on the purge timer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Engine,
    and_,
    delete,
    select,
)

from mailplugins.db.policy_models import (
    GreylistClient,
    GreylistEntry,
    RateBucket,
    RateSubject,
)
from policyd.sql.greylist import GreylistTiming
from policyd.sql.transactions import one_writer, write_lock


@dataclass(frozen=True)
class PurgeCounts:
    buckets: int
    subjects: int
    triplets: int
    clients: int


def purge(
    engine: Engine, now: float, timing: GreylistTiming, longest_window: int, batch: int = 5000
) -> PurgeCounts:
    """Delete expired rows: buckets outside every window, idle subjects, triplets and clients
    past their expiry, and never-passed triplets past the retry window. Runs in the database
    pool, in batches, so a large backlog never holds long locks."""
    second = int(now)

    def sweep(table: Any, condition: Any, key: Sequence[Any]) -> int:
        removed = 0
        while True:
            with one_writer(engine), engine.begin() as conn:
                write_lock(conn)
                rows = conn.execute(select(*key).where(condition).limit(batch)).all()
                if not rows:
                    return removed
                if len(key) == 1:
                    where = key[0].in_([r[0] for r in rows])
                    conn.execute(delete(table).where(where, condition))
                else:
                    for row in rows:
                        conn.execute(delete(table).where(
                            and_(*(col == value for col, value in zip(key, row, strict=True))),
                            condition))
                removed += len(rows)
            if len(rows) < batch:
                return removed

    buckets = sweep(RateBucket, RateBucket.expires < second,
                    (RateBucket.rule, RateBucket.subject, RateBucket.period, RateBucket.bucket))
    subjects = sweep(RateSubject, RateSubject.last_seen < second - max(longest_window, 1),
                     (RateSubject.rule, RateSubject.subject))
    # Never-passed triplets go once past the retry window (a later attempt would start over
    # anyway); their last attempt was less than ``delay`` after the first, so last_seen tells.
    # Both cutoffs are on last_seen, so the sweep is a range scan of its index.
    unpassed = second - timing.retry_window - timing.delay
    every = second - timing.expiry
    triplets = sweep(
        GreylistEntry,
        (GreylistEntry.last_seen < max(unpassed, every))
        & ((GreylistEntry.last_seen < every)
           | (GreylistEntry.passed.is_(False) & (GreylistEntry.last_seen < unpassed))),
        (GreylistEntry.key,),
    )
    clients = sweep(GreylistClient, GreylistClient.last_seen < second - timing.expiry,
                    (GreylistClient.address,))
    return PurgeCounts(buckets, subjects, triplets, clients)
