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

import json
from collections.abc import Sequence
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


# -- PostgreSQL: many sightings in a few multi-row statements ----------------------------------

#: One sighting of a batch: ``(key, client, now, timing)``, greylist_check's arguments.
Sighting = tuple[str, str, float, GreylistTiming]

# The batch statements name the tables and AWL_INTERVAL as written here.
assert GreylistEntry.__tablename__ == "policy_greylist"
assert GreylistClient.__tablename__ == "policy_greylist_clients"
assert AWL_INTERVAL == 3600

#: PostgreSQL decides a batch in one statement, so one round trip and one commit: the
#: function (made by migration 0006, where its SQL and its reasons are) reads the batch's
#: client and triplet rows, sorts each sighting as :func:`greylist_many` does on SQLite,
#: inserts the new triplets, marks the first passes (compare-and-set) and counts them for the
#: auto-whitelist, taking row locks in key and then address order. Returns
#: ``('n', key, first_seen, passed)`` per inserted or touched triplet and
#: ``('p', key, first_seen, NULL)`` per first pass. The rows come as one text per column
#: (:meth:`_PostgresqlMany._rows`), so the statement's text and types are the same whatever the
#: batch's size, and psycopg prepares it: PostgreSQL parses and plans it once per connection.
_MANY_DECIDE = """
SELECT kind, key, first_seen, passed FROM policy_greylist_decide(
  %(keys)s::text, %(addresses)s::text, %(nows)s::text, %(awl)s::integer,
  %(expiry)s::bigint, %(delay)s::bigint, %(window)s::bigint)"""


class StaleConnection(Exception):
    """The batch's statement found its connection dead before it got an answer: the batch
    may run once more on another connection (see :func:`greylist_many`)."""


@dataclass
class Lookup:
    """The first step of :func:`greylist_many`, which may run ahead of the others (on SQLite
    outside the write lock: see :func:`policyd.batch.run_batch`).

    ``batch`` holds the sightings decided together (one per triplet and per client, all with
    one timing), ``later`` the others, and ``rows`` the client and triplet columns read for
    each of ``batch`` on SQLite (None: not read yet, or the read failed; PostgreSQL reads them
    in the statement that writes).
    """

    batch: list[int]
    later: list[int]
    rows: list[Any] | None = None


def lookup_many(conn: Connection, sightings: Sequence[Sighting], *, read: bool = True
                ) -> Lookup:
    """Which sightings :func:`greylist_many` decides together, and (``read``, SQLite) their
    rows.

    The rows are only a guess at what the writes will find: every write that depends on them
    is compare-and-set, so rows read before another process wrote lead to the decision being
    taken again on the stored row, never to a wrong answer. Raises when the read fails.
    """
    later: list[int] = []
    batch: list[int] = []
    keys: set[str] = set()
    clients: set[str] = set()
    timing = sightings[0][3] if sightings else GreylistTiming()
    for n, (key, client, _now, t) in enumerate(sightings):
        if key in keys or client in clients or t != timing:
            later.append(n)
        else:
            keys.add(key)
            clients.add(client)
            batch.append(n)
    found = Lookup(batch, later)
    if read and batch and conn.dialect.name == "sqlite":
        found.rows = _read_rows(conn, sightings, batch)
    return found


def _read_rows(conn: Connection, sightings: Sequence[Sighting], batch: list[int]) -> list[Any]:
    """SQLite: the client and triplet columns of each of ``batch``, in one statement."""
    return _SQLITE.lookup(conn.connection.cursor(), [sightings[n][1] for n in batch],
                          [sightings[n][0] for n in batch])


def greylist_many(conn: Connection, sightings: Sequence[Sighting], *, fail_fast: bool = False,
                  looked_up: Lookup | None = None) -> list[tuple[bool, Any]]:
    """:func:`greylist_check` for many sightings at once: on PostgreSQL in autocommit, on
    SQLite inside the group commit's transaction (which holds the write lock).

    Returns ``(True, GreylistResult)`` or ``(False, exception)`` per sighting, in order. The
    common cases (a new triplet, a first pass) are decided for the whole batch, whatever its
    size, on PostgreSQL in one statement (:data:`_MANY_DECIDE`: one commit), on SQLite in one
    read and up to three writes inside the group commit's transaction. Everything else (a
    triplet or client seen twice in the batch, a whitelisted client, a triplet inside its
    delay or already passed, a late retry, a row another host changed meanwhile, a statement
    that failed) is decided afterwards one sighting at a time by :func:`_greylist_cas`, in the
    batch's order, so later sightings of a triplet see what the earlier ones wrote: every
    answer is one the checks would have got run one by one, in some order, against other
    hosts' concurrent checks.
    A connection found dead on PostgreSQL raises :class:`StaleConnection`, and the caller may
    run the batch once more on another: nothing was written unless the server committed the
    statement and the connection died before its answer came back, and then the second run
    finds those rows and gives the same answers, save that a first pass loses its
    ``first_pass`` (its X-Greylist header). A connection lost later raises as it is, and so
    does any failure with ``fail_fast`` (the group commit then runs the batch again, each
    check alone under a savepoint: in a transaction some errors end the transaction itself).
    ``looked_up`` is the first step already taken (:func:`lookup_many`, same ``sightings``);
    its rows, read earlier, are used as any row read before another process's write is.
    """
    results: list[tuple[bool, Any] | None] = [None] * len(sightings)
    step = looked_up if looked_up is not None else lookup_many(conn, sightings, read=False)
    later = list(step.later)  # decided one by one afterwards
    batch = step.batch
    timing = sightings[0][3] if sightings else GreylistTiming()
    seconds = [int(s[2]) for s in sightings]
    stored: dict[str, tuple[int, bool]] = {}  # new triplets: (first_seen, passed) as stored
    passed: dict[str, int] = {}  # first passes: their first_seen
    if batch and conn.dialect.name == "postgresql":
        try:
            stored, passed = _POSTGRESQL.decide(
                conn.connection.cursor(), [sightings[n][0] for n in batch],
                [sightings[n][1] for n in batch], [seconds[n] for n in batch], timing)
        except Exception as exc:
            if fail_fast:
                raise
            if _connection_lost(conn):
                raise StaleConnection("the connection was lost before the batch's answer"
                                      ) from exc
    elif batch:
        stored, passed = _sqlite_many(conn, sightings, step, seconds, fail_fast)
    for n in batch:
        key = sightings[n][0]
        row = stored.get(key)
        if row is not None and row == (seconds[n], False):
            results[n] = (True, GreylistResult("greylisted", timing.delay))
        elif row is None and key in passed:
            results[n] = (True, GreylistResult("passed", seconds[n] - passed[key],
                                               first_pass=True))
        else:  # inserted elsewhere, changed meanwhile, not a common case, or failed
            later.append(n)
    for n in sorted(later):
        key, client, _now, t = sightings[n]
        try:
            results[n] = (True, _greylist_cas(conn, key, client, seconds[n], t))
        except Exception as exc:
            if fail_fast or _connection_lost(conn):
                raise
            results[n] = (False, exc)
    return [r for r in results if r is not None]


def _sqlite_many(conn: Connection, sightings: Sequence[Sighting], step: Lookup,
                 seconds: list[int], fail_fast: bool
                 ) -> tuple[dict[str, tuple[int, bool]], dict[str, int]]:
    """SQLite's part of :func:`greylist_many`: the batch's rows (read ahead or now), sorted
    into new triplets and first passes as :data:`_MANY_DECIDE` sorts them on PostgreSQL,
    then the writes. Returns what :meth:`_PostgresqlMany.decide` does; a failure returns
    nothing decided (the sightings go one by one), or raises with ``fail_fast``."""
    timing = sightings[0][3]
    try:
        rows = step.rows if step.rows is not None else _read_rows(conn, sightings, step.batch)
    except Exception:
        if fail_fast:
            raise
        return {}, {}
    new: list[int] = []
    passing: list[tuple[int, int]] = []  # (sighting, first_seen read)
    awl = timing.awl_passes
    for n, (passes, client_seen, first, was_passed) in zip(step.batch, rows, strict=True):
        second = seconds[n]
        if (awl and passes is not None and passes >= awl
                and second - client_seen <= timing.expiry):
            continue  # whitelisted: rare, decided alone
        if first is None:
            new.append(n)
        elif not was_passed and timing.delay <= second - first <= timing.retry_window:
            passing.append((n, int(first)))
    if not new and not passing:
        return {}, {}
    try:
        stored, passed_keys = _SQLITE.write(
            conn.connection.cursor(), [sightings[n][0] for n in new], [seconds[n] for n in new],
            [sightings[n][0] for n, _ in passing], [first for _, first in passing],
            [seconds[n] for n, _ in passing], [sightings[n][1] for n, _ in passing], bool(awl))
    except Exception:
        if fail_fast:
            raise
        return {}, {}
    return stored, {sightings[n][0]: first for n, first in passing
                    if sightings[n][0] in passed_keys}


# SQLite (3.35 or later: RETURNING, UPDATE ... FROM): the rows as JSON arrays, joined on
# their index; run inside the group commit's transaction (policyd.batch), which holds the
# database's write lock, so no other writer can come between them.
_SQLITE_LOOKUP = """
SELECT c.passes, c.last_seen, e.first_seen, e.passed
FROM json_each(:addresses) AS a JOIN json_each(:keys) AS k ON k.key = a.key
LEFT JOIN policy_greylist_clients c ON c.address = a.value
LEFT JOIN policy_greylist e ON e.key = k.value
ORDER BY a.key"""

_SQLITE_INSERT = """
INSERT INTO policy_greylist (key, first_seen, last_seen, passed)
SELECT k.value, n.value, n.value, 0
FROM json_each(:keys) AS k JOIN json_each(:nows) AS n ON n.key = k.key WHERE true
ON CONFLICT (key) DO UPDATE SET last_seen = excluded.last_seen
RETURNING key, first_seen, passed"""

_SQLITE_FIRST_PASSES = """
UPDATE policy_greylist SET passed = 1, last_seen = v.now
FROM (SELECT k.value AS key, f.value AS first, n.value AS now FROM json_each(:keys) AS k
      JOIN json_each(:firsts) AS f ON f.key = k.key JOIN json_each(:nows) AS n ON n.key = k.key
     ) AS v
WHERE policy_greylist.key = v.key AND policy_greylist.first_seen = v.first
  AND NOT policy_greylist.passed
RETURNING policy_greylist.key"""

_SQLITE_COUNT = """
INSERT INTO policy_greylist_clients AS c (address, passes, last_counted, last_seen)
SELECT a.value, 1, n.value, n.value
FROM json_each(:addresses) AS a JOIN json_each(:nows) AS n ON n.key = a.key WHERE true
ON CONFLICT (address) DO UPDATE SET
  passes = CASE WHEN c.last_counted <= excluded.last_counted - 3600
                THEN c.passes + 1 ELSE c.passes END,
  last_counted = CASE WHEN c.last_counted <= excluded.last_counted - 3600
                      THEN excluded.last_counted ELSE c.last_counted END,
  last_seen = excluded.last_seen"""


class _SqliteMany:
    """The read and the writes of :func:`greylist_many` in SQLite's SQL, the rows as JSON
    arrays for ``json_each``."""

    def lookup(self, cursor: Any, addresses: list[str], keys: list[str]) -> list[Any]:
        cursor.execute(_SQLITE_LOOKUP, {"addresses": json.dumps(addresses),
                                        "keys": json.dumps(keys)})
        return list(cursor.fetchall())

    def write(self, cursor: Any, new_keys: list[str], new_nows: list[int], keys: list[str],
              firsts: list[int], nows: list[int], addresses: list[str], awl: bool
              ) -> tuple[dict[str, tuple[int, bool]], set[str]]:
        """Insert the new triplets and mark the first passes (two to three statements, inside
        the group commit's transaction): ``(stored, passed)``, the stored ``(first_seen,
        passed)`` of each new triplet and the keys that passed."""
        stored: dict[str, tuple[int, bool]] = {}
        if new_keys:
            cursor.execute(_SQLITE_INSERT, {"keys": json.dumps(new_keys),
                                            "nows": json.dumps(new_nows)})
            stored = {key: (int(first), bool(was_passed))
                      for key, first, was_passed in cursor.fetchall()}
        if not keys:
            return stored, set()
        cursor.execute(_SQLITE_FIRST_PASSES, {"keys": json.dumps(keys),
                                              "firsts": json.dumps(firsts),
                                              "nows": json.dumps(nows)})
        passed = {row[0] for row in cursor.fetchall()}
        if awl and passed:
            counted = [n for n, key in enumerate(keys) if key in passed]
            cursor.execute(_SQLITE_COUNT, {
                "addresses": json.dumps([addresses[n] for n in counted]),
                "nows": json.dumps([nows[n] for n in counted])})
        return stored, passed


class _PostgresqlMany:
    """:data:`_MANY_DECIDE` run for one batch."""

    @staticmethod
    def _rows(values: list[Any]) -> str:
        """One column of the batch's rows as one text parameter, comma-separated for
        ``string_to_array``. psycopg adapts a Python list element by element in Python (about
        90 µs for a batch of 11 sightings, as much as the rest of the batch's Python work); a
        string it passes as it is. The values are hashes, client addresses and integers,
        which hold no comma; one that did would shift the rows, so it is refused."""
        text = ",".join(v if isinstance(v, str) else str(int(v)) for v in values)
        if text.count(",") != max(len(values) - 1, 0):
            raise ValueError("a greylisting batch value holds a comma")
        return text

    def decide(self, cursor: Any, keys: list[str], addresses: list[str], nows: list[int],
               timing: GreylistTiming) -> tuple[dict[str, tuple[int, bool]], dict[str, int]]:
        """``(stored, passed)``: the stored ``(first_seen, passed)`` of each triplet inserted
        (or found inserted by another host), and the first-seen time of each triplet that
        passed for the first time; the batch's other sightings were left alone."""
        rows = self._rows
        cursor.execute(_MANY_DECIDE, {
            "keys": rows(keys), "addresses": rows(addresses), "nows": rows(nows),
            "awl": timing.awl_passes, "expiry": timing.expiry, "delay": timing.delay,
            "window": timing.retry_window}, prepare=True)
        stored: dict[str, tuple[int, bool]] = {}
        passed: dict[str, int] = {}
        for kind, key, first, was_passed in cursor.fetchall():
            if kind == "n":
                stored[key] = (int(first), bool(was_passed))
            else:
                passed[key] = int(first)
        return stored, passed


_SQLITE = _SqliteMany()
_POSTGRESQL = _PostgresqlMany()


def _connection_lost(conn: Connection) -> bool:
    """The DBAPI connection is closed or broken (the server went away): the batch cannot go
    on, and the caller drops the connection."""
    dbapi: Any = conn.connection.dbapi_connection
    return dbapi is None or bool(getattr(dbapi, "closed", False)) or bool(
        getattr(dbapi, "broken", False))
