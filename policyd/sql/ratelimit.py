# -*- test-case-name: tests.unit.test_ratelimit -*-
"""Atomic rate-limit counting: one transaction per check that locks the subject's row first, then
reads its live buckets and overrides and counts the message only when every window admits it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    case,
    func,
    literal_column,
    select,
    union_all,
)

from mailplugins.config.policy_state import Window
from mailplugins.db.policy_models import (
    RateBucket,
    RateOverride,
    RateSubject,
)
from mailplugins.db.upsert import insert_for as _insert
from mailplugins.db.upsert import upsert_stmt as _upsert_stmt
from policyd.sql.transactions import Target, compiled, one_writer, transaction


@dataclass(frozen=True)
class Usage:
    period: int
    messages: int
    recipients: int
    bytes: int


@dataclass(frozen=True)
class RateKey:
    """One rule's subject and its windows, as configured (overrides are applied in SQL)."""

    rule: str
    subject: str
    windows: tuple[Window, ...]
    #: Override subjects, least specific first (``@domain`` then ``user@domain``).
    override_subjects: tuple[str, ...] = ()


@dataclass(frozen=True)
class RateDecision:
    admitted: bool
    #: The rule and window that refused (None when admitted).
    rule: str | None = None
    window: Window | None = None
    #: (rule, totals) per window after counting, or as they stood when refused.
    usage: tuple[tuple[str, Usage], ...] = ()
    #: Refused and every further message will be too, until this epoch second (the next
    #: step of the refusing window: totals only grow while the window does not move).
    #: 0 when a smaller message could still pass (e.g. fewer recipients).
    saturated_until: int = 0


def effective_windows(
    configured: Sequence[Window], overrides: Iterable[tuple[int, int | None, int | None, int | None]]
) -> list[Window]:
    """Config windows with overrides applied in order (domain first, then mailbox).

    An override row is ``(period, messages, recipients, bytes)``: NULL inherits, -1 lifts the
    limit, a period the config lacks adds a window.
    """
    windows = {w.period: w for w in configured}
    for period, messages, recipients, size in overrides:
        base = windows.get(period, Window(period))

        def pick(new: int | None, old: int | None) -> int | None:
            if new is None:
                return old
            return None if new < 0 else new

        windows[period] = Window(
            period,
            pick(messages, base.messages),
            pick(recipients, base.recipients),
            pick(size, base.bytes),
        )
    return [windows[p] for p in sorted(windows) if windows[p].limited]


def override_limits(
    conn: Connection, rule: str, subjects: Sequence[str]
) -> list[tuple[int, int | None, int | None, int | None]]:
    if not subjects:
        return []
    if len(subjects) > 2:
        raise ValueError("at most two override subjects (domain, mailbox)")
    rows = list(compiled(conn, "overrides", _overrides_stmt).run(
        conn, rule=rule, s1=subjects[0], s2=subjects[-1]).fetchall())
    order = {subject: index for index, subject in enumerate(subjects)}
    rows.sort(key=lambda r: order[r[0]])
    return [(int(r[1]), _int(r[2]), _int(r[3]), _int(r[4])) for r in rows]


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _window_total_stmt(conn: Connection) -> Any:
    return (
        select(func.coalesce(func.sum(RateBucket.messages), literal_column("0")),
               func.coalesce(func.sum(RateBucket.recipients), literal_column("0")),
               func.coalesce(func.sum(RateBucket.bytes), literal_column("0")))
        .where(RateBucket.rule == bindparam("rule"), RateBucket.subject == bindparam("subject"),
               RateBucket.period == bindparam("period"),
               RateBucket.bucket > bindparam("oldest"),
               RateBucket.bucket <= bindparam("bucket"))
    )


def window_total(conn: Connection, key: RateKey, window: Window, bucket: int) -> Any:
    return compiled(conn, "window_total", _window_total_stmt).run(
        conn, rule=key.rule, subject=key.subject, period=window.period,
        oldest=bucket - window.buckets, bucket=bucket,
    ).fetchone()


#: Seconds by which ``last_seen`` of a rate subject may lag (it only decides when the purge
#: drops an idle subject's lock row, which the next check recreates).
SUBJECT_SEEN_GRANULARITY = 60


def _subject_upsert_stmt(conn: Connection) -> Any:
    """Insert the subject's lock row, or lock the existing one.

    Either way the row stays locked to the end of the transaction: PostgreSQL locks the
    conflicting row even when the ``WHERE`` of ``DO UPDATE`` is false, MariaDB's ``ON
    DUPLICATE KEY UPDATE`` locks it before evaluating the assignment, and SQLite holds the
    database write lock. ``last_seen`` is rewritten only once it is a minute old, so a busy
    subject does not rewrite its row and its index entry at every message.
    """
    table = RateSubject.__table__
    values: dict[str, Any] = {"rule": bindparam("rule"), "subject": bindparam("subject"),
                              "last_seen": bindparam("last_seen")}
    if conn.dialect.name in ("sqlite", "postgresql"):
        stmt = _insert(conn, table).values(**values)
        return stmt.on_conflict_do_update(
            index_elements=["rule", "subject"],
            set_={"last_seen": stmt.excluded.last_seen},
            where=table.c.last_seen
            <= stmt.excluded.last_seen - literal_column(str(SUBJECT_SEEN_GRANULARITY)),
        )
    return _upsert_stmt(
        conn, table, values, ("rule", "subject"),
        {"last_seen": lambda c, new: case(
            (c.last_seen <= new.last_seen - literal_column(str(SUBJECT_SEEN_GRANULARITY)),
             new.last_seen),
            else_=c.last_seen)},
    )


def _bucket_upsert_stmt(conn: Connection, rows: int) -> Any:
    """Add to ``rows`` sub-buckets at once (``rule0``, ``period0``, ... per row)."""
    table = RateBucket.__table__
    values: list[dict[str, Any]] = [
        {"rule": bindparam(f"rule{n}"), "subject": bindparam(f"subject{n}"),
         "period": bindparam(f"period{n}"), "bucket": bindparam(f"bucket{n}"),
         "messages": bindparam("messages"), "recipients": bindparam("recipients"),
         "bytes": bindparam("bytes"), "expires": bindparam(f"expires{n}")}
        for n in range(rows)
    ]
    stmt = _insert(conn, table).values(values)
    if conn.dialect.name in ("mysql", "mariadb"):
        new = stmt.inserted
        return stmt.on_duplicate_key_update(
            messages=table.c.messages + new.messages,
            recipients=table.c.recipients + new.recipients,
            bytes=table.c.bytes + new.bytes,
        )
    new = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=["rule", "subject", "period", "bucket"],
        set_={"messages": table.c.messages + new.messages,
              "recipients": table.c.recipients + new.recipients,
              "bytes": table.c.bytes + new.bytes},
    )


def _overrides_stmt(conn: Connection) -> Any:
    return (
        select(RateOverride.subject, RateOverride.period, RateOverride.messages,
               RateOverride.recipients, RateOverride.bytes)
        .where(RateOverride.rule == bindparam("rule"),
               RateOverride.subject.in_([bindparam("s1"), bindparam("s2")]))
    )


def _live_buckets_stmt(conn: Connection) -> Any:
    # Every bucket still inside some window of the subject (``expires`` is when a bucket
    # leaves its window), for all windows at once: one read instead of one SUM per window.
    return (
        select(RateBucket.period, RateBucket.bucket, RateBucket.messages,
               RateBucket.recipients, RateBucket.bytes, literal_column("0").label("kind"))
        .where(RateBucket.rule == bindparam("rule"), RateBucket.subject == bindparam("subject"),
               RateBucket.expires > bindparam("now"))
    )


def _live_and_overrides_stmt(conn: Connection) -> Any:
    # The live buckets and, in the same read, the overrides of the subject's domain (kind 1)
    # and mailbox (kind 2): one statement per address subject instead of two.
    overrides = (
        select(RateOverride.period, literal_column("NULL"), RateOverride.messages,
               RateOverride.recipients, RateOverride.bytes,
               case((RateOverride.subject == bindparam("s1"), literal_column("1")),
                    else_=literal_column("2")))
        .where(RateOverride.rule == bindparam("rule"),
               RateOverride.subject.in_([bindparam("s1"), bindparam("s2")]))
    )
    return union_all(_live_buckets_stmt(conn), overrides)


def _subject_rows(
    conn: Connection, key: RateKey, second: int
) -> tuple[list[Any], list[tuple[int, int | None, int | None, int | None]]]:
    """The subject's live buckets and its override rows (domain first, then mailbox)."""
    subjects = key.override_subjects
    if not subjects:
        rows = compiled(conn, "live_buckets", _live_buckets_stmt).run(
            conn, rule=key.rule, subject=key.subject, now=second).fetchall()
        return rows, []
    if len(subjects) > 2:
        raise ValueError("at most two override subjects (domain, mailbox)")
    rows = compiled(conn, "live_and_overrides", _live_and_overrides_stmt).run(
        conn, rule=key.rule, subject=key.subject, now=second, s1=subjects[0],
        s2=subjects[-1]).fetchall()
    buckets = [row for row in rows if int(row[5]) == 0]
    overrides = sorted((row for row in rows if int(row[5]) != 0), key=lambda row: int(row[5]))
    return buckets, [(int(r[0]), _int(r[2]), _int(r[3]), _int(r[4])) for r in overrides]


def _window_sums(rows: Sequence[Any], window: Window, bucket: int) -> tuple[int, int, int]:
    """Totals of ``window``'s buckets among ``rows`` (the same range as the SUM query)."""
    oldest = bucket - window.buckets
    messages = recipients = size = 0
    for period, number, m, r, b, _kind in rows:
        if period == window.period and oldest < number <= bucket:
            messages += m
            recipients += r
            size += b
    return messages, recipients, size


#: Where the policy state functions work: an Engine (they run their own transaction) or a
#: Connection inside a transaction its owner commits (a group commit, see policyd.batch).
def rate_check(
    target: Target,
    keys: Sequence[RateKey],
    now: float,
    *,
    messages: int = 0,
    recipients: int = 0,
    size: int = 0,
) -> RateDecision:
    """Count ``messages``/``recipients``/``size`` for every key if every window allows it.

    All keys are decided in one transaction, so a message refused by one rule is counted by
    none. Admission means the totals *including* this request stay within every limit.

    The subjects' lock rows are upserted first; the window totals are read after that, under
    the lock, and the buckets are incremented only when every window admits the message, so
    a refusal writes no counter and needs no rollback (several checks can share one
    transaction). Given a Connection, the work joins its transaction; the caller commits.
    """
    if isinstance(target, Connection):
        return _rate_check(target, keys, int(now), messages, recipients, size)
    with one_writer(target), transaction(target) as conn:
        conn.begin()  # the raw statements run inside this transaction
        try:
            decision = _rate_check(conn, keys, int(now), messages, recipients, size)
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
        return decision


def _rate_check(
    conn: Connection,
    keys: Sequence[RateKey],
    second: int,
    messages: int,
    recipients: int,
    size: int,
) -> RateDecision:
    counting = bool(messages or recipients or size)
    # Lock rows in one global order, so two transactions never wait for each other in a cycle.
    ordered = sorted(keys, key=lambda k: (k.rule, k.subject))
    subject_upsert = compiled(conn, "subject_upsert", _subject_upsert_stmt)
    for key in ordered:
        # The subject's lock row: every concurrent check of this subject waits here.
        subject_upsert.run(conn, rule=key.rule, subject=key.subject, last_seen=second)
    usage: list[tuple[str, Usage]] = []
    counts: list[tuple[RateKey, Window, int]] = []
    refused: tuple[str, Window] | None = None
    saturated_until = 0
    for key in ordered:
        rows, overrides = _subject_rows(conn, key, second)
        effective = effective_windows(key.windows, overrides)
        for window in effective:
            bucket = second // window.step
            before = _window_sums(rows, window, bucket)
            used = Usage(window.period, before[0] + messages, before[1] + recipients,
                         before[2] + size)
            usage.append((key.rule, used))
            counts.append((key, window, bucket))
            if refused is None and _over(window, used, messages, recipients, size):
                refused = (key.rule, window)
                if messages and _saturated(window, used, messages, recipients, size):
                    saturated_until = (bucket + 1) * window.step
    if refused is not None:
        return RateDecision(False, refused[0], refused[1], tuple(usage), saturated_until)
    if counting and counts:
        # Every window's bucket in one multi-row upsert.
        params: dict[str, Any] = {"messages": messages, "recipients": recipients, "bytes": size}
        for n, (key, window, bucket) in enumerate(counts):
            params.update({f"rule{n}": key.rule, f"subject{n}": key.subject,
                           f"period{n}": window.period, f"bucket{n}": bucket,
                           f"expires{n}": (bucket + 1) * window.step + window.period})
        rows_count = len(counts)
        compiled(conn, f"bucket_upsert_{rows_count}",
                  lambda c: _bucket_upsert_stmt(c, rows_count)).run(conn, **params)
    return RateDecision(True, None, None, tuple(usage))


def _saturated(window: Window, used: Usage, messages: int, recipients: int, size: int) -> bool:
    """Whether the totals *before* this request already reach a limit, so that any message
    (at least one recipient) is refused."""
    before = ((window.messages, used.messages - messages),
              (window.recipients, used.recipients - recipients),
              (window.bytes, used.bytes - size))
    return any(limit is not None and total >= limit for limit, total in before)


def _over(window: Window, used: Usage, messages: int, recipients: int, size: int) -> bool:
    """Whether counting this request passes a limit of ``window``.

    A measure being counted is over when its new total passes the limit. At DATA (a message
    counted, its size not known yet) a byte limit already reached refuses too. A request
    counting nothing is refused once any limit is reached (a dry check).
    """
    counting = bool(messages or recipients or size)
    checks = ((window.messages, used.messages, messages),
              (window.recipients, used.recipients, recipients))
    for limit, total, added in checks:
        if limit is None:
            continue
        if (added and total > limit) or (not counting and total >= limit):
            return True
    if window.bytes is not None:
        if size:
            return used.bytes > window.bytes
        if messages or not counting:
            return used.bytes >= window.bytes
    return False
