# -*- test-case-name: tests.unit.test_greylist -*-
"""Greylisting in SQL (postgrey's decision): the triplet read ``FOR UPDATE`` after an
insert-if-absent, so two MX hosts seeing the same retry agree on its first pass; auto-whitelisting
of clients that passed often enough."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    false,
    literal_column,
    select,
    true,
    update,
)

from mailplugins.db.policy_models import (
    GreylistClient,
    GreylistEntry,
)
from mailplugins.db.upsert import insert_for as _insert
from policyd.sql.transactions import Compiled, Target, one_writer, transaction, write_lock

#: At most one auto-whitelist pass is counted per client and hour (postgrey).
AWL_INTERVAL = 3600


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
    lock, see :func:`write_lock`, and commits); given an Engine, it is its own transaction.
    """
    if isinstance(target, Connection):
        return _greylist_check(target, key, client, int(now), timing)
    with one_writer(target), transaction(target) as conn:
        conn.begin()  # the raw statements run inside this transaction
        try:
            write_lock(conn)
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


def _greylist_statements(conn: Connection) -> dict[str, Compiled]:
    """The greylisting statements, compiled once per dialect (see :class:`Compiled`)."""
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
    found = {name: Compiled(stmt, conn) for name, stmt in statements.items()}
    _GREYLIST_COMPILED[conn.dialect.name] = found
    return found


_GREYLIST_COMPILED: dict[str, dict[str, Compiled]] = {}


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
