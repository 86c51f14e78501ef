# -*- test-case-name: tests.unit.test_ratelimit -*-
"""policyd's shared state in SQL: atomic rate-limit counting, greylisting, purges, overrides.

Every function here is synchronous and takes an Engine: the daemon runs them in the database
thread pool (never on the reactor), the CLI and tests call them directly. Time is an argument
(epoch seconds), never read here. The two checks, :func:`rate_check` and
:func:`greylist_check`, also take a Connection inside a transaction its owner commits: that is
how :mod:`policyd.batch` runs many of them in one transaction on SQLite.

Atomicity across processes and hosts (several MX on one PostgreSQL or MariaDB):

- :func:`rate_check` runs in ONE transaction that first upserts the subject's lock row
  (``INSERT ... ON CONFLICT DO UPDATE`` on PostgreSQL and SQLite, ``INSERT ... ON DUPLICATE
  KEY UPDATE`` on MariaDB). The upsert takes that row's write lock until commit, so every other
  check of the same subject waits there; the bucket read that follows sees everything the
  earlier transactions committed (see :func:`_transaction`), and the buckets are incremented
  only when every window admits the message: a refused message is never counted.
- Greylisting reads the triplet with ``SELECT ... FOR UPDATE`` after an insert-if-absent, so
  two hosts seeing the same retry agree on its first pass.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    literal_column,
    select,
    true,
    union_all,
    update,
)

from mailplugins.config.policy_state import Window
from mailplugins.db.policy_models import (
    GreylistClient,
    GreylistEntry,
    RateBucket,
    RateOverride,
    RateSubject,
)
from mailplugins.db.upsert import insert_for as _insert
from mailplugins.db.upsert import upsert_stmt as _upsert_stmt

#: An override limit meaning "no limit" (NULL means "inherit the configured limit").
UNLIMITED = -1
#: At most one auto-whitelist pass is counted per client and hour (postgrey).
AWL_INTERVAL = 3600


class OverrideError(ValueError):
    """A bad override (one line for the operator)."""


# --------------------------------------------------------------------------------------------
# Shared helpers


def _transaction(engine: Engine) -> Any:
    """A connection for one check-and-count transaction, at the backend's default isolation.

    That is enough: the transaction's first statement is the locking upsert of the subject
    row, so on PostgreSQL (READ COMMITTED) each later statement sees what the previous holder
    of the lock committed, and on MariaDB (REPEATABLE READ) the read view is only created by
    the first plain SELECT, after the lock is held. SQLite has a single writer.
    """
    return engine.connect()


_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_SQLITE_WRITERS_LOCK = threading.Lock()


@contextmanager
def _one_writer(engine: Engine) -> Iterator[None]:
    """On SQLite, one writing transaction per process at a time.

    SQLite has one writer per database anyway; threads of one process that compete for it get
    SQLITE_BUSY and sleep in the busy handler (milliseconds each time), which wastes far more
    than waiting on a lock. Other processes are still held off by SQLite's own locking.
    """
    if engine.dialect.name != "sqlite":
        yield
        return
    with _SQLITE_WRITERS_LOCK:
        lock = _SQLITE_WRITERS.get(engine)
        if lock is None:
            lock = _SQLITE_WRITERS[engine] = threading.Lock()
    with lock:
        yield


def _write_lock(conn: Connection) -> None:
    """On SQLite, take the database write lock before the first read of a read-then-write
    transaction. Otherwise a transaction that read first and then writes after another
    connection committed fails at once with "database is locked" (WAL snapshot), without
    waiting for busy_timeout. A no-op UPDATE opens a write transaction and so waits properly.
    The server backends lock rows instead (FOR UPDATE, upserts)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("UPDATE policy_greylist_clients SET passes = passes WHERE 0")


def _upsert(
    conn: Connection,
    table: Any,
    values: Mapping[str, Any],
    keys: Sequence[str],
    updates: Mapping[str, Any],
) -> None:
    """One atomic insert-or-update statement; ``updates`` may use ``excluded``/``inserted``."""
    conn.execute(_upsert_stmt(conn, table, values, keys, updates))


# --------------------------------------------------------------------------------------------
# Rate limits


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


def _overrides(
    conn: Connection, rule: str, subjects: Sequence[str]
) -> list[tuple[int, int | None, int | None, int | None]]:
    if not subjects:
        return []
    if len(subjects) > 2:
        raise ValueError("at most two override subjects (domain, mailbox)")
    rows = list(_compiled(conn, "overrides", _overrides_stmt).run(
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


def _window_total(conn: Connection, key: RateKey, window: Window, bucket: int) -> Any:
    return _compiled(conn, "window_total", _window_total_stmt).run(
        conn, rule=key.rule, subject=key.subject, period=window.period,
        oldest=bucket - window.buckets, bucket=bucket,
    ).fetchone()


class _Compiled:
    """A statement compiled once per dialect and run on the DBAPI cursor directly.

    The rate check runs a handful of statements per message; building, caching and executing
    SQLAlchemy constructs each time cost several times more than SQLite itself, so the hot
    statements are compiled to the driver's SQL once and executed on the raw cursor, inside
    the transaction the SQLAlchemy connection began (callers call ``conn.begin()`` first).
    """

    def __init__(self, stmt: Any, conn: Connection) -> None:
        compiled = stmt.compile(dialect=conn.dialect)
        self.sql = str(compiled)
        self.positions: Sequence[str] | None = compiled.positiontup

    def run(self, conn: Connection, **params: Any) -> Any:
        cursor = conn.connection.cursor()
        if self.positions is not None:
            cursor.execute(self.sql, tuple(params[n] for n in self.positions))
        else:
            cursor.execute(self.sql, params)
        return cursor


_COMPILED: dict[tuple[str, str], _Compiled] = {}


def _compiled(conn: Connection, name: str, build: Any) -> _Compiled:
    key = (conn.dialect.name, name)
    found = _COMPILED.get(key)
    if found is None:
        found = _COMPILED[key] = _Compiled(build(conn), conn)
    return found


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
        rows = _compiled(conn, "live_buckets", _live_buckets_stmt).run(
            conn, rule=key.rule, subject=key.subject, now=second).fetchall()
        return rows, []
    if len(subjects) > 2:
        raise ValueError("at most two override subjects (domain, mailbox)")
    rows = _compiled(conn, "live_and_overrides", _live_and_overrides_stmt).run(
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
Target = Engine | Connection


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
    with _one_writer(target), _transaction(target) as conn:
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
    subject_upsert = _compiled(conn, "subject_upsert", _subject_upsert_stmt)
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
        _compiled(conn, f"bucket_upsert_{rows_count}",
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


def rate_usage(engine: Engine, key: RateKey, now: float) -> list[Usage]:
    """Current totals per effective window of ``key``, counting nothing (for the CLI)."""
    second = int(now)
    with engine.connect() as conn:
        conn.begin()
        windows = effective_windows(key.windows, _overrides(conn, key.rule, key.override_subjects))
        result = []
        for window in windows:
            total = _window_total(conn, key, window, second // window.step)
            result.append(Usage(window.period, int(total[0]), int(total[1]), int(total[2])))
        return result


@dataclass(frozen=True)
class OverrideRecord:
    rule: str
    subject: str
    period: int
    messages: int | None
    recipients: int | None
    bytes: int | None


def normalise_override_subject(subject: str) -> str:
    """``user@domain`` or ``@domain``, case-folded (domains IDNA-encoded)."""
    from mailplugins.addresses import AddressError, parse_address, parse_domain

    text = subject.strip()
    try:
        if text.startswith("@"):
            return "@" + parse_domain(text[1:])
        return parse_address(text).key
    except AddressError as exc:
        raise OverrideError(f"not an address or @domain: {subject!r} ({exc})") from None


def set_rate_override(
    engine: Engine,
    rule: str,
    subject: str,
    period: int,
    *,
    messages: int | None = None,
    recipients: int | None = None,
    size: int | None = None,
) -> OverrideRecord:
    """Create or replace the override of ``subject`` (``user@domain`` or ``@domain``) for the
    window of ``period`` seconds. Each limit: None inherits, -1 is unlimited, else the limit."""
    if period <= 0:
        raise OverrideError("the period must be a positive number of seconds")
    for value in (messages, recipients, size):
        if value is not None and value < UNLIMITED:
            raise OverrideError("a limit must be -1 (unlimited) or a count")
    key = normalise_override_subject(subject)
    values = {"messages": messages, "recipients": recipients, "bytes": size}
    with engine.begin() as conn:
        _upsert(
            conn, RateOverride.__table__, {"rule": rule, "subject": key, "period": period, **values},
            ("rule", "subject", "period"),
            {name: (lambda c, new, name=name: getattr(new, name)) for name in values},
        )
    return OverrideRecord(rule, key, period, messages, recipients, size)


def remove_rate_override(engine: Engine, rule: str, subject: str, period: int | None = None) -> int:
    """Remove the override(s) of ``subject`` (one period, or all); returns rows removed."""
    key = normalise_override_subject(subject)
    with engine.begin() as conn:
        stmt = delete(RateOverride).where(RateOverride.rule == rule, RateOverride.subject == key)
        if period is not None:
            stmt = stmt.where(RateOverride.period == period)
        return int(conn.execute(stmt).rowcount)


def list_rate_overrides(engine: Engine, rule: str | None = None) -> list[OverrideRecord]:
    with engine.connect() as conn:
        stmt = select(RateOverride).order_by(RateOverride.rule, RateOverride.subject,
                                             RateOverride.period)
        if rule is not None:
            stmt = stmt.where(RateOverride.rule == rule)
        return [
            OverrideRecord(r.rule, r.subject, r.period, r.messages, r.recipients, r.bytes)
            for r in conn.execute(stmt).all()
        ]


def reset_rate_counters(engine: Engine, rule: str, subject: str) -> int:
    """Forget what ``subject`` has sent (an operator lifting a block at once)."""
    with engine.begin() as conn:
        return int(conn.execute(
            delete(RateBucket).where(RateBucket.rule == rule, RateBucket.subject == subject)
        ).rowcount)


# --------------------------------------------------------------------------------------------
# Greylisting


@dataclass(frozen=True)
class GreylistTiming:
    delay: int = 300
    retry_window: int = 2 * 86400
    expiry: int = 35 * 86400
    #: Passes after which a client address is whitelisted (0 disables).
    awl_passes: int = 5


@dataclass(frozen=True)
class GreylistResult:
    """``status`` is ``greylisted``, ``passed`` or ``whitelisted`` (auto-whitelisted client)."""

    status: str
    #: greylisted: seconds left to wait; passed: seconds the triplet was delayed.
    seconds: int = 0
    #: True on the triplet's first pass (the X-Greylist header goes with it).
    first_pass: bool = False


def greylist_check(
    target: Target, key: str, client: str, now: float, timing: GreylistTiming
) -> GreylistResult:
    """postgrey's decision for one triplet ``key`` (already hashed) from ``client``.

    Given a Connection, the work joins its transaction (the caller has taken SQLite's write
    lock, see :func:`_write_lock`, and commits); given an Engine, it is its own transaction.
    """
    if isinstance(target, Connection):
        return _greylist_check(target, key, client, int(now), timing)
    with _one_writer(target), _transaction(target) as conn:
        conn.begin()  # the raw statements run inside this transaction
        try:
            _write_lock(conn)
            result = _greylist_check(conn, key, client, int(now), timing)
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
        return result


def _greylist_check(
    conn: Connection, key: str, client: str, second: int, timing: GreylistTiming
) -> GreylistResult:
    statement = _greylist_statements(conn)
    if timing.awl_passes:
        row = statement["client"].run(conn, address=client).fetchone()
        if (row is not None and row[0] >= timing.awl_passes
                and second - row[1] <= timing.expiry):
            statement["client_seen"].run(conn, address=client, now=second)
            return GreylistResult("whitelisted")
    entry = statement["triplet"].run(conn, key=key).fetchone()
    if entry is None:
        inserted = statement["triplet_insert"].run(conn, key=key, now=second).rowcount
        if inserted:
            return GreylistResult("greylisted", timing.delay)
        entry = statement["triplet"].run(conn, key=key).fetchone()
        if entry is None:  # pragma: no cover - inserted and deleted meanwhile
            return GreylistResult("greylisted", timing.delay)
    first, passed = int(entry[0]), bool(entry[1])
    if not passed and second - first > timing.retry_window:
        # The first retry came too late: start over, as postgrey does.
        statement["triplet_restart"].run(conn, key=key, now=second)
        return GreylistResult("greylisted", timing.delay)
    waited = second - first
    if waited < timing.delay:
        statement["triplet_seen"].run(conn, key=key, now=second)
        return GreylistResult("greylisted", timing.delay - waited)
    statement["triplet_pass"].run(conn, key=key, now=second)
    if timing.awl_passes:
        _count_client_pass(conn, client, second)
    return GreylistResult("passed", waited, first_pass=not passed)


def _greylist_statements(conn: Connection) -> dict[str, _Compiled]:
    """The greylisting statements, compiled once per dialect (see :class:`_Compiled`)."""
    found = _GREYLIST_COMPILED.get(conn.dialect.name)
    if found is not None:
        return found
    entry, clients = GreylistEntry, GreylistClient
    now: Any = bindparam("now")
    key: Any = bindparam("key")
    address: Any = bindparam("address")
    statements = {
        "client": select(clients.passes, clients.last_seen).where(clients.address == address),
        "client_seen": update(clients).where(clients.address == address).values(last_seen=now),
        "triplet": select(entry.first_seen, entry.passed).where(entry.key == key)
        .with_for_update(),
        "triplet_insert": _insert_ignore(conn, entry.__table__).values(
            key=key, first_seen=now, last_seen=now, passed=false()),
        "triplet_restart": update(entry).where(entry.key == key)
        .values(first_seen=now, last_seen=now),
        "triplet_seen": update(entry).where(entry.key == key).values(last_seen=now),
        "triplet_pass": update(entry).where(entry.key == key)
        .values(last_seen=now, passed=true()),
        "pass_count": update(clients)
        .where(clients.address == address, clients.last_counted <= bindparam("counted_before"))
        .values(passes=clients.passes + literal_column("1"), last_counted=now, last_seen=now),
        "client_insert": _insert_ignore(conn, clients.__table__).values(
            address=address, passes=literal_column("1"), last_counted=now, last_seen=now),
    }
    found = {name: _Compiled(stmt, conn) for name, stmt in statements.items()}
    _GREYLIST_COMPILED[conn.dialect.name] = found
    return found


_GREYLIST_COMPILED: dict[str, dict[str, _Compiled]] = {}


def _insert_ignore(conn: Connection, table: Any) -> Any:
    stmt = _insert(conn, table)
    if conn.dialect.name in ("mysql", "mariadb"):
        return stmt.prefix_with("IGNORE")
    return stmt.on_conflict_do_nothing()


def _count_client_pass(conn: Connection, client: str, second: int) -> None:
    """One pass counted at once, then at most one per AWL_INTERVAL (postgrey)."""
    statement = _greylist_statements(conn)
    counted = statement["pass_count"].run(
        conn, address=client, now=second, counted_before=second - AWL_INTERVAL).rowcount
    if counted:
        return
    touched = statement["client_seen"].run(conn, address=client, now=second).rowcount
    if not touched:
        statement["client_insert"].run(conn, address=client, now=second)


# --------------------------------------------------------------------------------------------
# Purge


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
            with _one_writer(engine), engine.begin() as conn:
                _write_lock(conn)
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
