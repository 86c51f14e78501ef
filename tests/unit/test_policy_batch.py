"""Group commit of greylisting and rate-limit checks on SQLite (policyd.batch)."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, func, select
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock

from mailplugins.config.policy_state import Window
from mailplugins.db.policy_models import GreylistEntry
from policyd import batch as batch_module
from policyd.batch import GroupCommit, batching_runner, run_batch
from policyd.pooled import Pending
from policyd.sql.greylist import GreylistTiming, greylist_check
from policyd.sql.overrides import rate_usage
from policyd.sql.ratelimit import RateKey, rate_check
from tests.support.pools import HeldPool
from tests.support.sync import migrated_engine

T0 = 1_800_000_000.0


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    yield from migrated_engine(f"sqlite:///{tmp_path}/state.db", pool_size=2)


def outcomes(ds: list[Deferred[Any]]) -> list[Any]:
    results: list[Any] = []
    for d in ds:
        d.addBoth(results.append)
    assert len(results) == len(ds), "not every check was answered"
    return results


def limit_key(limit: int) -> RateKey:
    return RateKey("out", "bob@example.org", (Window(3600, messages=limit),))


def triplets(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(GreylistEntry)).scalar_one())


def test_checks_arriving_during_a_batch_share_the_next_transaction(engine: Engine) -> None:
    pool = HeldPool()
    group = GroupCommit(engine, pool.run)
    first = group.run(rate_check, engine, [limit_key(3)], T0, messages=1)
    assert len(pool.waiting) == 1 and not first.called
    # Five more while the first batch is in the pool: they wait on the reactor, together.
    rest = [group.run(rate_check, engine, [limit_key(3)], T0, messages=1) for _ in range(5)]
    assert len(pool.waiting) == 1
    pool.finish_one()
    assert first.called and not any(d.called for d in rest)
    assert len(pool.waiting) == 1  # the next batch went to the pool as the first ended
    pool.finish_one()
    # One transaction for the five, each seeing the counts of the ones before it.
    assert [d.admitted for d in outcomes([first, *rest])] == [True, True, True, False, False,
                                                                False]
    assert (group.batches, group.checks) == (2, 6)


def test_a_failing_check_is_rolled_back_alone(engine: Engine) -> None:
    def broken(conn: Connection, key: str) -> None:
        greylist_check(conn, key, "192.0.2.1", T0, GreylistTiming())
        raise RuntimeError("bug after a write")

    results = run_batch(engine, [
        (greylist_check, ("kept-1", "192.0.2.1", T0, GreylistTiming()), {}),
        (broken, ("dropped",), {}),
        (greylist_check, ("kept-2", "192.0.2.1", T0, GreylistTiming()), {}),
    ])
    assert [ok for ok, _ in results] == [True, False, True]
    assert isinstance(results[1][1], RuntimeError)
    assert triplets(engine) == 2  # the broken check's insert was undone, its neighbours kept


def test_a_failing_check_counts_nothing_and_its_neighbours_count_once(engine: Engine) -> None:
    # The batch runs first without savepoints; the failure makes it start again with them.
    # Whatever the first attempt counted must be gone: each admitted message counts once.
    def broken(conn: Connection) -> None:
        rate_check(conn, [limit_key(10)], T0, messages=1)
        raise RuntimeError("bug after counting")

    results = run_batch(engine, [
        (rate_check, ([limit_key(10)], T0), {"messages": 1}),
        (broken, (), {}),
        (rate_check, ([limit_key(10)], T0), {"messages": 1}),
    ])
    assert [ok for ok, _ in results] == [True, False, True]
    assert [r.admitted for ok, r in results if ok] == [True, True]
    assert rate_usage(engine, limit_key(10), T0)[0].messages == 2


def test_a_check_run_again_is_counted_down_once(engine: Engine) -> None:
    # The pending work of a check whose batch ran twice must not go below what is in flight.
    pending = Pending()
    kept = pending.track(greylist_check)
    other = pending.track(greylist_check)
    run_batch(engine, [(kept, ("k", "192.0.2.1", T0, GreylistTiming()), {}),
                       (pending.track(_broken), (), {})])
    assert pending.count == 1  # ``other`` is still in flight
    other(engine, "k2", "192.0.2.1", T0, GreylistTiming())
    assert pending.count == 0


def _broken(conn: Connection) -> None:
    raise RuntimeError("bug")


def test_writers_of_several_processes_queue_on_the_lock_file(engine: Engine, tmp_path: Path
                                                             ) -> None:
    # Another process (here: another open of the lock file) is writing: a batch waits for it
    # on the lock file, and goes as soon as it is done.
    other = os.open(tmp_path / "state.db.writer", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    done = threading.Event()

    def batch() -> None:
        run_batch(engine, [(greylist_check, ("k", "192.0.2.1", T0, GreylistTiming()), {})])
        done.set()

    worker = threading.Thread(target=batch)
    worker.start()
    try:
        assert not done.wait(0.5)
        assert triplets(engine) == 0
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
        worker.join(30)
    assert done.is_set() and triplets(engine) == 1


def test_failures_reach_each_waiting_check(engine: Engine) -> None:
    group = GroupCommit(engine, lambda fn, *a: fail(RuntimeError("database down")))
    answers = outcomes([group.run(rate_check, engine, [limit_key(3)], T0, messages=1)
                        for _ in range(2)])
    assert all(a.check(RuntimeError) for a in answers)
    # Nothing stays stuck: the next check is tried again.
    assert group.batches == 2

    def raises(fn: Any, *args: Any) -> Deferred[Any]:
        raise RuntimeError("pool stopped")

    stopped = GroupCommit(engine, raises)
    assert outcomes([stopped.run(rate_check, engine, [limit_key(3)], T0)])[0].check(RuntimeError)


def test_a_check_answered_by_its_timeout_is_not_answered_twice(engine: Engine) -> None:
    pool = HeldPool()
    clock = Clock()
    group = GroupCommit(engine, pool.run)
    first = group.run(greylist_check, engine, "k0", "192.0.2.1", T0, GreylistTiming())
    late = group.run(greylist_check, engine, "k1", "192.0.2.1", T0, GreylistTiming())
    other = group.run(greylist_check, engine, "k2", "192.0.2.1", T0, GreylistTiming())
    late.addTimeout(1.0, clock)
    pool.finish_one()  # the first batch; late and other form the second
    clock.advance(1.0)
    assert late.called
    late.addErrback(lambda _: None)
    pool.finish_one()  # no AlreadyCalledError; the work itself was done
    assert [r.status for r in outcomes([first, other])] == ["greylisted", "greylisted"]
    assert triplets(engine) == 3


def test_synchronous_runner_runs_every_batch(engine: Engine) -> None:
    group = GroupCommit(engine, maybeDeferred, max_batch=2)
    ds = [group.run(greylist_check, engine, f"k{n}", "192.0.2.1", T0, GreylistTiming())
          for n in range(5)]
    assert [r.status for r in outcomes(ds)] == ["greylisted"] * 5
    assert group.batches == 5  # each ran at once: nothing was waiting to join it


def test_only_sqlite_batches_every_check(engine: Engine) -> None:
    """SQLite batches rate limits and greylisting; PostgreSQL only greylisting
    (tests/unit/test_greylist_batches.py); MariaDB nothing."""
    def run(fn: Any, *args: Any) -> Deferred[Any]:
        return maybeDeferred(fn, *args)

    assert batching_runner(engine, run) != run
    server = create_engine("mysql+pymysql://nobody@127.0.0.1:1/none")
    assert batching_runner(server, run) is run
    with pytest.raises(ValueError, match="own engine"):
        GroupCommit(engine, run).run(rate_check, server, [limit_key(1)], T0)



def wal_restarts(engine: Engine) -> int:
    """The write-ahead log's checkpoint sequence number (its header's fourth word), which
    grows each time a writer starts the log over after a checkpoint copied all of it."""
    with open(f"{engine.url.database}-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


def test_the_log_is_checkpointed_beside_the_batches_not_under_the_write_lock(
        engine: Engine) -> None:
    # A file database: every CHECKPOINT_EVERY batches a checkpoint goes to the pool on its
    # own, and SQLite's own checkpoints (inside a commit, under the write lock) only come
    # past a backstop the batches never reach here.
    pool = HeldPool()
    runner = batching_runner(engine, pool.run)
    group = runner.__self__  # type: ignore[attr-defined]
    assert group.checkpoint_every == batch_module.CHECKPOINT_EVERY
    for n in range(batch_module.CHECKPOINT_EVERY):
        runner(greylist_check, engine, f"k{n}", "192.0.2.1", T0, GreylistTiming())
        fn, _args, _kwargs, _result = pool.waiting[0]
        assert fn is run_batch
        pool.finish_one()
    assert group.checkpoints == 1
    fn, args, _kwargs, _result = pool.waiting[0]
    assert fn is batch_module.checkpoint and args == (engine,)
    with engine.connect() as conn:  # the batches' connection: SQLite checkpoints only late
        cursor = conn.connection.cursor()
        cursor.execute("PRAGMA wal_autocheckpoint")
        assert cursor.fetchone() == (batch_module.AUTOCHECKPOINT_PAGES,)
    restarts = wal_restarts(engine)
    pool.finish_one()  # the checkpoint copies the whole log: the next batch starts it over
    # Until the next one is due, batches go alone.
    runner(greylist_check, engine, "more", "192.0.2.1", T0, GreylistTiming())
    pool.finish_one()
    assert group.checkpoints == 1 and not pool.waiting
    assert wal_restarts(engine) == restarts + 1


def test_no_checkpoints_of_a_memory_database(tmp_path: Path) -> None:
    memory = create_engine("sqlite://")
    group = batching_runner(memory, HeldPool().run).__self__  # type: ignore[attr-defined]
    assert group.checkpoint_every is None
