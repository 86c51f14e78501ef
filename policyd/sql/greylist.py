# -*- test-case-name: tests.unit.test_greylist -*-
"""Greylisting in SQL (postgrey's decision) and auto-whitelisting of clients that passed often
enough.

On SQLite and PostgreSQL each sighting is two statements: one read of the triplet and the
client's auto-whitelist row together, then the one write the decision needs (insert the new
triplet, touch a waiting one, or mark the first pass and count it for the auto-whitelist).
Writes that depend on what was read are compare-and-set: the insert is an upsert returning the
stored row (another process may have inserted it meanwhile), the first pass and a restart after
a late retry update only a row still holding the values read. So processes and MX hosts racing
on one triplet agree without locks held between statements: exactly one of them sees the first
pass, and one whose write found the row changed decides again on the new row. On PostgreSQL
every statement commits on its own (autocommit: no ``BEGIN``/``COMMIT`` round trips, one commit
per sighting), and the first pass and its auto-whitelist count are one statement. MariaDB,
whose upsert returns no row, keeps one transaction with the triplet read ``FOR UPDATE``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    case,
    false,
    func,
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
from mailplugins.db.upsert import upsert_stmt
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
        return _decide(target, key, client, int(now), timing)
    if target.dialect.name == "postgresql":
        with target.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            dbapi.autocommit = True  # each statement is its own transaction
            try:
                return _greylist_cas(conn, key, client, int(now), timing)
            finally:
                dbapi.autocommit = False
    with one_writer(target), transaction(target) as conn:
        conn.begin()  # the raw statements run inside this transaction
        try:
            write_lock(conn)
            result = _decide(conn, key, client, int(now), timing)
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
        return result


def _decide(
    conn: Connection, key: str, client: str, second: int, timing: GreylistTiming
) -> GreylistResult:
    if conn.dialect.name in ("sqlite", "postgresql"):
        return _greylist_cas(conn, key, client, second, timing)
    return _greylist_check(conn, key, client, second, timing)


#: Decisions taken again when a compare-and-set write found the triplet changed by another
#: process; each time means another process made progress on it, so a few always suffice.
_CAS_ATTEMPTS = 10


def _greylist_cas(
    conn: Connection, key: str, client: str, second: int, timing: GreylistTiming
) -> GreylistResult:
    """:func:`_greylist_check`'s decision in two statements (see the module docstring); every
    branch leaves the triplet's ``last_seen`` at ``second``, as the transaction path does."""
    statement = _greylist_statements(conn)
    awl = timing.awl_passes
    for _attempt in range(_CAS_ATTEMPTS):
        passes, client_seen, first, passed = statement["lookup"].run(
            conn, address=client, key=key).fetchone()
        if (awl and passes is not None and passes >= awl
                and second - client_seen <= timing.expiry):
            statement["client_seen"].run(conn, address=client, now=second)
            return GreylistResult("whitelisted")
        touched = first is None
        if touched:
            first, passed = statement["triplet_upsert"].run(conn, key=key, now=second).fetchone()
            if int(first) == second and not passed:
                return GreylistResult("greylisted", timing.delay)
        first, passed = int(first), bool(passed)
        waited = second - first
        if not passed and waited > timing.retry_window:
            # The first retry came too late: start over, as postgrey does.
            if statement["triplet_restart"].run(
                    conn, key=key, now=second, first=first).rowcount:
                return GreylistResult("greylisted", timing.delay)
            continue
        if waited < timing.delay:
            if not touched:
                statement["triplet_seen"].run(conn, key=key, now=second)
            return GreylistResult("greylisted", timing.delay - waited)
        if not passed:
            if not _first_pass(conn, statement, key, client, first, second, awl):
                continue
            return GreylistResult("passed", waited, first_pass=True)
        if not touched:
            statement["triplet_seen"].run(conn, key=key, now=second)
        if awl:
            statement["client_pass"].run(
                conn, address=client, now=second, counted_before=second - AWL_INTERVAL)
        return GreylistResult("passed", waited)
    raise RuntimeError("greylisting: the triplet kept changing under this check")


def _first_pass(conn: Connection, statement: dict[str, Compiled], key: str, client: str,
                first: int, second: int, awl: int) -> bool:
    """Mark the triplet passed if it still is unpassed with ``first``, and then count the
    client's pass; False when another process changed the row first."""
    params = {"key": key, "now": second, "first": first}
    if not awl:
        return bool(statement["triplet_pass_cas"].run(conn, **params).rowcount)
    params.update(address=client, counted_before=second - AWL_INTERVAL)
    if "pass_and_count" in statement:  # PostgreSQL: both in one statement, one commit
        return bool(statement["pass_and_count"].run(conn, **params).fetchone()[0])
    if not statement["triplet_pass_cas"].run(conn, **params).rowcount:
        return False
    statement["client_pass"].run(conn, **params)
    return True


def _greylist_check(
    conn: Connection, key: str, client: str, second: int, timing: GreylistTiming
) -> GreylistResult:
    """MariaDB: the decision in the caller's transaction, the triplet row locked first.

    The upsert takes the row's exclusive lock whether it inserts or not (a locking read of an
    absent row would take gap locks that two inserting transactions deadlock on), and the
    client's pass is counted in one upsert for the same reason."""
    statement = _greylist_statements(conn)
    if timing.awl_passes:
        row = statement["client"].run(conn, address=client).fetchone()
        if (row is not None and row[0] >= timing.awl_passes
                and second - row[1] <= timing.expiry):
            statement["client_seen"].run(conn, address=client, now=second)
            return GreylistResult("whitelisted")
    statement["triplet_touch"].run(conn, key=key, now=second)
    entry = statement["triplet"].run(conn, key=key).fetchone()
    first, passed = int(entry[0]), bool(entry[1])
    if first == second and not passed:
        return GreylistResult("greylisted", timing.delay)
    if not passed and second - first > timing.retry_window:
        # The first retry came too late: start over, as postgrey does.
        statement["triplet_restart"].run(conn, key=key, now=second)
        return GreylistResult("greylisted", timing.delay)
    waited = second - first
    if waited < timing.delay:
        return GreylistResult("greylisted", timing.delay - waited)
    if not passed:
        statement["triplet_pass"].run(conn, key=key, now=second)
    if timing.awl_passes:
        statement["client_pass"].run(
            conn, address=client, now=second, counted_before=second - AWL_INTERVAL)
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
    counted: Any = GreylistClient.__table__.c.last_counted <= bindparam("counted_before")
    statements: dict[str, Any] = {
        "client": select(clients.passes, clients.last_seen).where(clients.address == address),
        "client_seen": update(clients).where(clients.address == address).values(last_seen=now),
        "triplet_seen": update(entry).where(entry.key == key).values(last_seen=now),
        # One pass counted at once, then at most one per AWL_INTERVAL, in one statement (the
        # SET expressions read the stored row as it was; on MariaDB passes is assigned before
        # last_counted changes).
        "client_pass": upsert_stmt(
            conn, GreylistClient.__table__,
            {"address": address, "passes": literal_column("1"), "last_counted": now,
             "last_seen": now},
            ["address"],
            {"passes": lambda c, new: case((counted, c.passes + literal_column("1")),
                                           else_=c.passes),
             "last_counted": lambda c, new: case((counted, new.last_counted),
                                                 else_=c.last_counted),
             "last_seen": lambda c, new: new.last_seen},
        ),
    }
    if conn.dialect.name not in ("sqlite", "postgresql"):
        statements.update({
            "triplet_touch": upsert_stmt(
                conn, GreylistEntry.__table__,
                {"key": key, "first_seen": now, "last_seen": now, "passed": false()},
                ["key"], {"last_seen": lambda c, new: new.last_seen}),
            "triplet": select(entry.first_seen, entry.passed).where(entry.key == key)
            .with_for_update(),
            "triplet_restart": update(entry).where(entry.key == key)
            .values(first_seen=now, last_seen=now),
            "triplet_pass": update(entry).where(entry.key == key)
            .values(last_seen=now, passed=true()),
        })
    if conn.dialect.name in ("sqlite", "postgresql"):
        statements.update(_cas_statements(conn))
    found = {name: Compiled(stmt, conn) for name, stmt in statements.items()}
    _GREYLIST_COMPILED[conn.dialect.name] = found
    return found


_GREYLIST_COMPILED: dict[str, dict[str, Compiled]] = {}


def _cas_statements(conn: Connection) -> dict[str, Any]:
    """The statements of :func:`_greylist_cas` (SQLite and PostgreSQL)."""
    entry: Any = GreylistEntry.__table__
    clients: Any = GreylistClient.__table__
    now: Any = bindparam("now")
    key: Any = bindparam("key")
    first: Any = bindparam("first")
    address: Any = bindparam("address")
    one = select(literal_column("1").label("one")).subquery("one")
    triplet = _insert(conn, entry).values(key=key, first_seen=now, last_seen=now, passed=false())
    counted = clients.c.last_counted <= bindparam("counted_before")
    # client_pass's assignments, for the CTE below.
    count = {
        "passes": case((counted, clients.c.passes + literal_column("1")), else_=clients.c.passes),
        "last_counted": case((counted, now), else_=clients.c.last_counted),
        "last_seen": now,
    }
    unpassed = (entry.c.key == key, entry.c.first_seen == first, entry.c.passed == false())
    statements: dict[str, Any] = {
        # Always one row: the client's auto-whitelist columns and the triplet's, NULL when absent.
        "lookup": select(clients.c.passes, clients.c.last_seen, entry.c.first_seen,
                         entry.c.passed)
        .select_from(one.outerjoin(clients, clients.c.address == address)
                     .outerjoin(entry, entry.c.key == key)),
        # Inserts the triplet, or (inserted meanwhile elsewhere) touches it; returns the stored
        # first_seen and passed either way (the update sets neither).
        "triplet_upsert": triplet.on_conflict_do_update(
            index_elements=["key"], set_={"last_seen": triplet.excluded.last_seen},
        ).returning(entry.c.first_seen, entry.c.passed),
        "triplet_restart": update(entry).where(*unpassed).values(first_seen=now, last_seen=now),
        "triplet_pass_cas": update(entry).where(*unpassed).values(passed=true(), last_seen=now),
    }
    if conn.dialect.name == "postgresql":
        # The first pass and its count in one statement (data-modifying CTEs run once, to
        # completion): the count happens only when the pass did; returns 1 or 0.
        passing = update(entry).where(*unpassed).values(passed=true(), last_seen=now) \
            .returning(entry.c.key).cte("passing")
        counting = _insert(conn, clients).from_select(
            ["address", "passes", "last_counted", "last_seen"],
            select(address, literal_column("1"), now, now)
            .where(select(passing.c.key).exists()),
        )
        counting = counting.on_conflict_do_update(index_elements=["address"], set_=count)
        statements["pass_and_count"] = select(func.count()).select_from(passing) \
            .add_cte(counting.cte("counting"))
    return statements
