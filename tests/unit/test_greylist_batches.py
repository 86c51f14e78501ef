"""Greylisting batches (policyd.sql.greylist.greylist_many): on PostgreSQL in
policyd.batch.GreylistBatches, on SQLite inside the group commit (policyd.batch.run_batch).
The multi-row statements give the answers and leave the rows that checks run one by one
would."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, select, text

from mailplugins.db import schema
from mailplugins.db.policy_models import GreylistClient, GreylistEntry
from policyd import batch as batch_module
from policyd.batch import GreylistBatches, batching_runner, run_batch
from policyd.pooled import Pending
from policyd.sql import greylist as greylist_module
from policyd.sql.greylist import GreylistResult, GreylistTiming, greylist_check, greylist_many
from policyd.sql.ratelimit import rate_check
from tests.conftest import PG_ADMIN_URL, _server_database
from tests.support.pools import HeldPool
from tests.support.sync import migrated_engine

T0 = 1_800_000_000
TIMING = GreylistTiming(delay=300, retry_window=2 * 86400, awl_passes=2)


def _pg(request: pytest.FixtureRequest) -> Iterator[Engine]:
    for url in _server_database(PG_ADMIN_URL, "postgresql"):
        yield from migrated_engine(url, pool_size=3)


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> Iterator[Engine]:
    yield from _pg(request)


@pytest.fixture
def pg2(request: pytest.FixtureRequest) -> Iterator[Engine]:
    yield from _pg(request)


@pytest.fixture(params=["postgresql", "sqlite"])
def two(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Two empty databases of one kind: one for batches, one for checks one by one."""
    if request.param == "sqlite":
        for a in migrated_engine(f"sqlite:///{tmp_path}/a.db", pool_size=2):
            for b in migrated_engine(f"sqlite:///{tmp_path}/b.db", pool_size=2):
                yield a, b
        return
    for a in _pg(request):
        for b in _pg(request):
            yield a, b


def many(engine: Engine, sightings: list[tuple[str, str, float, GreylistTiming]]
         ) -> list[tuple[bool, Any]]:
    """The batch as policyd runs it: on SQLite the group commit's transaction."""
    if engine.dialect.name == "sqlite":
        return run_batch(engine, [(greylist_check, sighting, {}) for sighting in sightings])
    with engine.connect() as conn:
        conn.connection.dbapi_connection.autocommit = True
        try:
            return greylist_many(conn, sightings)
        finally:
            conn.connection.dbapi_connection.autocommit = False


def rows(engine: Engine) -> tuple[list[Any], list[Any]]:
    with engine.connect() as conn:
        entries = conn.execute(select(GreylistEntry.key, GreylistEntry.first_seen,
                                      GreylistEntry.last_seen, GreylistEntry.passed)
                               .order_by(GreylistEntry.key)).all()
        clients = conn.execute(select(GreylistClient.address, GreylistClient.passes,
                                      GreylistClient.last_counted, GreylistClient.last_seen)
                               .order_by(GreylistClient.address)).all()
    return [tuple(r) for r in entries], [tuple(r) for r in clients]


def label(result: GreylistResult) -> tuple[str, int, bool]:
    return result.status, result.seconds, result.first_pass


def test_batches_answer_and_write_as_checks_one_by_one(two: tuple[Engine, Engine]) -> None:
    """Random batches over few triplets and clients (duplicates within a batch, first
    sightings, waits inside the delay, first passes, passed triplets, late retries that start
    over, auto-whitelisted clients): batched on one database, one by one on the other, the
    same answers in the same order and the same rows."""
    pg, pg2 = two
    rng = random.Random(7)
    keys = [f"k{n}" for n in range(40)]
    clients = [f"192.0.2.{n}" for n in range(12)]
    now = T0
    batches = 0
    for _round in range(60):
        now += rng.choice([0, 5, 200, 301, 400, 3700, 2 * 86400 + 10])
        batch = [(rng.choice(keys), rng.choice(clients), float(now), TIMING)
                 for _ in range(rng.randrange(1, 25))]
        got = many(pg, batch)
        assert all(ok for ok, _ in got), got
        expected = [greylist_check(pg2, *sighting) for sighting in batch]
        assert [label(r) for _, r in got] == [label(r) for r in expected]
        batches += 1
    assert rows(pg) == rows(pg2)
    statuses = {label(r)[0] for r in expected}
    assert batches == 60 and statuses  # the rounds ran


def test_every_branch_is_reached(two: tuple[Engine, Engine]) -> None:
    """The branches the equivalence above must cover, in one scripted sequence."""
    pg, pg2 = two
    script = [
        [("a", "c1", T0), ("b", "c2", T0), ("a", "c1", T0)],           # new, new, duplicate
        [("a", "c1", T0 + 100), ("c", "c3", T0 + 100)],                # inside the delay
        [("a", "c1", T0 + 301), ("b", "c2", T0 + 301), ("a", "c1", T0 + 301)],  # first passes
        [("a", "c1", T0 + 400)],                                       # passed already
        [("c", "c3", T0 + 3 * 86400)],                                 # late: starts over
        [("d", "c1", T0 + 4000), ("e", "c1", T0 + 4000)],              # same client twice
        [("d", "c1", T0 + 4301), ("x", "c9", T0 + 4301)],              # 2nd pass: whitelisted
        [("z", "c1", T0 + 4302)],                                      # whitelisted client
    ]
    answers: list[tuple[str, int, bool]] = []
    for batch in script:
        sightings = [(k, c, float(t), TIMING) for k, c, t in batch]
        got = many(pg, sightings)
        expected = [greylist_check(pg2, *s) for s in sightings]
        assert [label(r) for _, r in got] == [label(r) for r in expected]
        answers.extend(label(r) for _, r in got)
    assert answers == [
        ("greylisted", 300, False), ("greylisted", 300, False), ("greylisted", 300, False),
        ("greylisted", 200, False), ("greylisted", 300, False),
        ("passed", 301, True), ("passed", 301, True), ("passed", 301, False),
        ("passed", 400, False),
        ("greylisted", 300, False),
        ("greylisted", 300, False), ("greylisted", 300, False),
        ("passed", 301, True), ("greylisted", 300, False),
        ("whitelisted", 0, False),
    ]
    assert rows(pg) == rows(pg2)


def test_common_sightings_take_one_statement(
        two: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    """New triplets and first passes of distinct triplets and clients never fall back to the
    one-by-one path: on PostgreSQL one statement for the whole batch (one round trip, one
    commit), on SQLite one read and up to three writes."""
    pg, _other = two
    alone: list[str] = []
    real = greylist_module._greylist_cas

    def counted(conn: Any, key: str, *args: Any) -> GreylistResult:
        alone.append(key)
        return real(conn, key, *args)

    monkeypatch.setattr(greylist_module, "_greylist_cas", counted)
    statements: list[str] = []
    if pg.dialect.name == "postgresql":
        real_execute = psycopg.Cursor.execute

        def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            if "policy_greylist" in str(query):
                statements.append(str(query))
            return real_execute(self, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, "execute", execute)
    fresh = [(f"k{n}", f"c{n}", float(T0), TIMING) for n in range(50)]
    assert {label(r) for _, r in many(pg, fresh)} == {("greylisted", 300, False)}
    retries = [(f"k{n}", f"c{n}", float(T0 + 310), TIMING) for n in range(50)]
    assert {label(r) for _, r in many(pg, retries)} == {("passed", 310, True)}
    assert alone == []
    if pg.dialect.name == "postgresql":
        assert statements == [greylist_module._MANY_DECIDE] * 2
    assert rows(pg)[1] == [(f"c{n}", 1, T0 + 310, T0 + 310) for n in sorted(range(50), key=str)]


def test_batches_read_a_grown_table_through_its_indexes(pg: Engine) -> None:
    """The batch's plan, made once per connection while the tables were small, still reads
    them through their primary keys once they have grown. PostgreSQL keeps a generic plan for
    a statement run often on a connection (prepared by psycopg, or inside a PL/pgSQL
    function); made on small tables (a new installation, a fresh benchmark database) it read
    them whole, a hash join over a sequential scan, and went on doing so as they grew, until
    an ANALYZE happened to invalidate it: on the fresh-triplet benchmark that was most of
    PostgreSQL's CPU. The function of migration 0006 plans with sequential scans, hash and
    merge joins off (without those settings this test fails)."""
    def seq_scans(conn: Any) -> int:
        cursor = conn.cursor()
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute("SELECT 1")  # ends a transaction: the counts are flushed
        cursor.execute("SELECT sum(seq_scan) FROM pg_stat_user_tables "
                       "WHERE relname IN ('policy_greylist', 'policy_greylist_clients')")
        return int(cursor.fetchone()[0])

    with pg.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        dbapi.autocommit = True
        second = T0
        for n in range(8):  # small tables, the same statements again and again
            second += 400
            got = greylist_many(conn, [(f"k{n}-{m}", f"c{n}-{m}", float(second), TIMING)
                                       for m in range(10)])
            assert all(ok for ok, _ in got)
            got = greylist_many(conn, [(f"k{n}-{m}", f"c{n}-{m}", float(second + 301), TIMING)
                                       for m in range(10)])
            assert {label(r) for _, r in got} == {("passed", 301, True)}
        cursor = dbapi.cursor()
        cursor.execute("INSERT INTO policy_greylist (key, first_seen, last_seen, passed) "
                       "SELECT 'grown' || n, %s, %s, false FROM generate_series(1, 50000) n",
                       (T0, T0))
        cursor.execute("INSERT INTO policy_greylist_clients (address, passes, last_counted, "
                       "last_seen) SELECT 'grown' || n, 1, %s, %s "
                       "FROM generate_series(1, 50000) n", (T0, T0))
        before = seq_scans(dbapi)
        second += 1000
        fresh = [(f"new{m}", f"grown{m}", float(second), TIMING) for m in range(1, 11)]
        assert {label(r) for _, r in greylist_many(conn, fresh)} == {("greylisted", 300, False)}
        retries = [(key, client, now + 301, t) for key, client, now, t in fresh]
        assert {label(r) for _, r in greylist_many(conn, retries)} == {("passed", 301, True)}
        assert seq_scans(dbapi) == before
        dbapi.autocommit = False


def test_a_failing_sighting_fails_alone(two: tuple[Engine, Engine]) -> None:
    """A client the driver cannot send makes the multi-row read fail: the batch's sightings
    are then decided one by one (on SQLite, the group commit's transaction is rolled back and
    run again with each check under a savepoint) and only that one fails."""
    pg, _other = two
    sightings: list[tuple[str, Any, float, GreylistTiming]] = [
        ("good1", "c1", float(T0), TIMING), ("bad", object(), float(T0), TIMING),
        ("good2", "c3", float(T0), TIMING)]
    got = many(pg, sightings)
    assert [ok for ok, _ in got] == [True, False, True]
    assert [label(r) for ok, r in got if ok] == [("greylisted", 300, False)] * 2
    assert [key for key, *_ in rows(pg)[0]] == ["good1", "good2"]


def test_a_value_holding_a_comma_cannot_shift_the_rows(pg: Engine) -> None:
    """PostgreSQL's batch statements take each column as one comma-separated text: a client
    holding a comma (never one policyd sends) would split in two and shift every row after
    it, so the batch refuses it, and the sightings are decided one by one, right."""
    sightings = [("k1", "c1", float(T0), TIMING), ("k2", "c,2", float(T0), TIMING),
                 ("k3", "c3", float(T0), TIMING)]
    got = many(pg, sightings)
    assert [label(r) for _, r in got] == [("greylisted", 300, False)] * 3
    retries = [(key, client, now + 301, t) for key, client, now, t in sightings]
    assert [label(r) for _, r in many(pg, retries)] == [("passed", 301, True)] * 3
    assert [(address, passes) for address, passes, *_ in rows(pg)[1]] == [
        ("c,2", 1), ("c1", 1), ("c3", 1)]


def test_checks_wait_for_a_batch_and_see_it_committed(pg: Engine) -> None:
    """At most ``max_running`` batches run at once (two here, each on its own connection);
    checks that arrive meanwhile go together in the next.
    No answer comes before its batch's statements committed (another connection sees the rows
    when it comes), and the pending counts are released once each."""
    pool = HeldPool()
    batches = GreylistBatches(pg, pool.run, max_running=2)
    pending = Pending()
    seen: list[int] = []

    def committed(result: GreylistResult) -> GreylistResult:
        with pg.connect() as conn:
            seen.append(int(conn.execute(text("SELECT count(*) FROM policy_greylist"))
                            .scalar_one()))
        return result

    first, second = [
        batches.run(pending.track(greylist_check), pg, f"k{n}", f"c{n}", float(T0), TIMING)
        .addCallback(committed) for n in range(2)]
    rest = [batches.run(pending.track(greylist_check), pg, f"k{n}", f"c{n}", float(T0), TIMING)
            .addCallback(committed) for n in range(2, 6)]
    assert len(pool.waiting) == 2 and pending.count == 6
    assert not first.called and seen == []
    pool.finish_one()
    assert first.called and seen == [1] and not second.called
    assert not any(d.called for d in rest)
    assert len(pool.waiting) == 2  # the four waiting went to the pool as one batch
    pool.finish_one()
    assert second.called and seen == [1, 2]
    pool.finish_one()
    assert all(d.called for d in rest) and seen == [1, 2, 6, 6, 6, 6]
    assert (batches.batches, batches.checks, pending.count) == (3, 6, 0)


def test_a_dead_connection_is_replaced_and_the_batch_run_again(
        pg: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that dies between the pool's pre-ping and the batch's statement is
    dropped and the batch runs once more on another; the pool replaces one killed between
    batches by itself."""
    pool = HeldPool()
    batches = GreylistBatches(pg, pool.run)
    results: list[Any] = []
    batches.run(greylist_check, pg, "k1", "c1", float(T0), TIMING).addBoth(results.append)
    pool.finish_one()
    with pg.connect() as conn:  # every other connection of this database killed
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        conn.commit()
    real = greylist_many
    lost = [True]

    def dies_once(conn: Any, sightings: Any, **kwargs: Any) -> Any:
        if lost.pop() if lost else False:
            conn.connection.dbapi_connection.close()  # as if the server had gone
            return real(conn, sightings, **kwargs)
        return real(conn, sightings, **kwargs)

    monkeypatch.setattr(batch_module, "greylist_many", dies_once)
    batches.run(greylist_check, pg, "k2", "c2", float(T0), TIMING).addBoth(results.append)
    pool.finish_one()
    batches.run(greylist_check, pg, "k3", "c3", float(T0), TIMING).addBoth(results.append)
    pool.finish_one()
    assert [label(r) for r in results] == [("greylisted", 300, False)] * 3
    assert batches.reconnects == 1
    assert set(key for key, *_ in rows(pg)[0]) == {"k1", "k2", "k3"}


def test_an_answer_lost_after_the_commit_gives_the_same_answers_again(
        pg: Engine, pg2: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's statement committed, then its connection died before the answer came
    back: the batch runs again on another connection, finds the rows it wrote, and gives the
    answers it would have given (a first pass only loses its X-Greylist header), with the
    rows and the auto-whitelist count of the checks run one by one."""
    pool = HeldPool()
    batches = GreylistBatches(pg, pool.run)
    first = [("k1", "c1", float(T0), TIMING)]
    second = [("k1", "c1", float(T0 + 301), TIMING), ("k2", "c2", float(T0 + 301), TIMING)]
    results: list[Any] = []
    for sighting in first + second:  # the second two wait for the first: one batch
        batches.run(greylist_check, pg, *sighting).addBoth(results.append)
    pool.finish_one()
    real = greylist_module._POSTGRESQL.decide
    lost = [True]

    def answer_lost(cursor: Any, *args: Any) -> Any:
        got = real(cursor, *args)
        if lost.pop() if lost else False:
            cursor.connection.close()  # the server committed; its answer never came
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return got

    monkeypatch.setattr(greylist_module._POSTGRESQL, "decide", answer_lost)
    pool.finish_one()
    assert batches.reconnects == 1 and not lost
    assert [label(r) for r in results] == [
        ("greylisted", 300, False), ("passed", 301, False), ("greylisted", 300, False)]
    for sighting in first + second:
        greylist_check(pg2, *sighting)
    assert rows(pg) == rows(pg2)
    assert rows(pg)[1] == [("c1", 1, T0 + 301, T0 + 301)]


def test_migration_0006_adds_and_removes_the_batch_function(pg: Engine) -> None:
    """Downgraded to 0005 the function is gone, and a batch then fails as a statement: its
    sightings are decided one by one, with the same answers; upgraded again it is back."""
    def functions() -> int:
        with pg.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM pg_proc WHERE proname = 'policy_greylist_decide'")
            ).scalar_one())

    assert functions() == 1
    config = schema._alembic_config()
    with pg.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0005")
    pg.dispose()  # no connection keeps a plan of the dropped function
    assert functions() == 0
    got = many(pg, [("k1", "c1", float(T0), TIMING), ("k2", "c2", float(T0), TIMING)])
    assert [label(r) for _, r in got] == [("greylisted", 300, False)] * 2
    schema.upgrade(pg)
    assert functions() == 1
    got = many(pg, [("k1", "c1", float(T0 + 301), TIMING), ("k2", "c2", float(T0 + 301), TIMING)])
    assert [label(r) for _, r in got] == [("passed", 301, True)] * 2


def test_only_greylisting_batches_on_postgresql(pg: Engine) -> None:
    """Rate limits keep their transaction per check in the pool."""
    pool = HeldPool()
    runner = batching_runner(pg, pool.run)
    assert isinstance(getattr(runner, "__self__", None), GreylistBatches)
    runner(rate_check, pg, [], float(T0), messages=1)
    assert pool.waiting[0][0] is rate_check
    engine = create_engine("mysql+pymysql://u@127.0.0.1/x")
    assert batching_runner(engine, pool.run) == pool.run


def test_rows_read_ahead_of_the_lock_and_changed_meanwhile_are_decided_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite a batch reads its triplets before taking the write lock: another worker's
    writes in between (a first sighting of a triplet read as new, the first pass of one read
    as waiting) make the compare-and-set writes miss, and those sightings are decided again
    under the lock, with the answers they get after the other worker's checks."""
    url = f"sqlite:///{tmp_path}/state.db"
    for ours in migrated_engine(url, pool_size=2):
        for other in migrated_engine(url, pool_size=2):
            greylist_check(other, "waiting", "192.0.2.2", T0 - 400, TIMING)
            real = batch_module._read_ahead
            read: list[Any] = []

            def read_then_other_worker_writes(conn: Any, sightings: Any, real: Any = real,
                                              read: Any = read, other: Engine = other) -> Any:
                looked_up = real(conn, sightings)
                read.append(looked_up)
                greylist_check(other, "new", "192.0.2.1", T0 - 400, TIMING)
                assert label(greylist_check(other, "waiting", "192.0.2.2", T0 - 10,
                                            TIMING)) == ("passed", 390, True)
                return looked_up

            monkeypatch.setattr(batch_module, "_read_ahead", read_then_other_worker_writes)
            results = many(ours, [("new", "192.0.2.1", float(T0), TIMING),
                                  ("waiting", "192.0.2.2", float(T0), TIMING)])
            assert read and read[0].rows is not None  # the rows were read before the writes
            assert [(ok, label(r)) for ok, r in results] == [
                (True, ("passed", 400, True)), (True, ("passed", 400, False))]
            entries, clients = rows(ours)
            assert entries == [("new", T0 - 400, T0, True), ("waiting", T0 - 400, T0, True)]
            assert [c[:2] for c in clients] == [("192.0.2.1", 1), ("192.0.2.2", 1)]
