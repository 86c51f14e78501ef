"""authd.shared_writes: the shared failure counters' writes never queue in front of logins."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from authd import failures
from authd.daemon import DAEMON
from authd.sasl_codec import Outcome
from authd.shared_writes import SharedWrites
from authd.verify import Verifier
from mailplugins.config import parse_config
from mailplugins.daemon import Runtime
from mailplugins.database import Database
from mailplugins.metrics import DaemonMetrics
from mailplugins.threads import WorkerPool
from tests.support.sync import sync_run
from tests.unit.test_authd_verify import Rig

ATTACKER = "198.51.100.66"
WRITES = {failures.record_failure, failures.write_batch, failures.clear}


class HeldPool:
    """A one-thread pool that runs nothing until the test says so: what is in flight is seen."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((fn, args, d))
        return d

    def finish_next(self) -> None:
        fn, args, d = self.calls.pop(0)
        d.callback(fn(*args))

    def fail_next(self) -> None:
        _, _, d = self.calls.pop(0)
        d.errback(RuntimeError("database is locked"))


class Attacked:
    """A verifier whose lookups run at once (and are recorded) and whose writer is held."""

    def __init__(self, limit: int = 1000) -> None:
        self.rig = Rig(penalty_threshold=1000, failure_delay="0s", lookup_cache_ttl="0s")
        self.lookups: list[Callable[..., Any]] = []
        self.writer = HeldPool()
        self.writes = SharedWrites(self.writer.run, self.rig.store.engine,
                                   self.rig.authd_metrics.shared_writes, limit=limit)
        self.rig.verifier = Verifier(
            clock=self.rig.clock, store=self.rig.store, db_run=self.db_run,
            cpu_run=self.rig.cpu_run, config=self.rig.authd, passwords=self.rig.passwords,
            metrics=self.rig.authd_metrics, shared_writes=self.writes,
        )

    def db_run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.lookups.append(fn)
        return sync_run(fn, *args)

    def attack(self, times: int) -> None:
        for n in range(times):
            verdict, _ = self.rig.verify(password=f"guess-{n}", rip=ATTACKER)
            assert verdict.outcome is Outcome.FAIL


def test_an_attack_puts_no_write_in_the_lookups_pool() -> None:
    attacked = Attacked()
    attacked.attack(100)
    # Every call in the database pool was a read: a login's lookup waits behind no write.
    assert attacked.lookups and not WRITES & set(attacked.lookups)
    # The writer has one batch in flight (the first failure) and the other 99 waiting.
    assert len(attacked.writer.calls) == 1 and attacked.writes.waiting == 99
    verdict, _ = attacked.rig.verify(password="s3cret", rip="192.0.2.50")
    assert verdict.outcome is Outcome.OK
    assert not WRITES & set(attacked.lookups)
    attacked.writer.finish_next()
    # The next batch takes the whole backlog in one transaction: 99 failures, and the clear
    # of alice's own counter that her successful login asked for.
    assert len(attacked.writer.calls) == 1 and attacked.writes.waiting == 0
    fn, (engine, batch), _ = attacked.writer.calls[0]
    assert fn is failures.write_batch and len(batch) == 100
    assert batch[-1] == failures.ClearLogin("user:alice@example.org")
    attacked.writer.finish_next()
    assert not attacked.writes.busy
    counts = failures.failure_counts(engine, ["ip:" + ATTACKER, "user:alice@example.org"],
                                     now=int(attacked.rig.clock.seconds()), window=900)
    assert counts == {"ip:" + ATTACKER: 100}
    assert attacked.rig.metric("shared_writes_total", result="written") == 101


def test_a_full_backlog_drops_and_counts() -> None:
    attacked = Attacked(limit=10)
    attacked.attack(30)
    # One in flight, ten waiting, nineteen dropped: the backlog never grows past its bound.
    assert len(attacked.writer.calls) == 1 and attacked.writes.waiting == 10
    assert attacked.rig.metric("shared_writes_total", result="dropped") == 19
    attacked.writer.finish_next()
    attacked.writer.finish_next()
    assert attacked.rig.metric("shared_writes_total", result="written") == 11


def test_a_failed_batch_is_counted_and_the_next_goes_on() -> None:
    attacked = Attacked()
    attacked.attack(3)
    attacked.writer.fail_next()
    assert attacked.rig.metric("shared_writes_total", result="failed") == 1
    assert len(attacked.writer.calls) == 1  # the two that waited
    attacked.writer.finish_next()
    assert attacked.rig.metric("shared_writes_total", result="written") == 2


def test_a_forgiven_login_is_cleared_through_the_writer() -> None:
    attacked = Attacked()
    attacked.attack(1)
    attacked.writer.finish_next()
    attacked.rig.clock.advance(3)  # past the shared-count cache: the failure is read back
    verdict, _ = attacked.rig.verify(password="s3cret", rip="192.0.2.50")
    assert verdict.outcome is Outcome.OK
    fn, (_, batch), _ = attacked.writer.calls[0]
    assert fn is failures.write_batch
    assert batch == [failures.ClearLogin("user:alice@example.org")]
    assert not WRITES & set(attacked.lookups)


def test_the_daemon_gives_the_writer_its_own_thread_and_connection(tmp_path: Path) -> None:
    cfg = parse_config({
        "database": {"url": f"sqlite:///{tmp_path}/mail.db"},
        "authd": {"sasl_listen": "tcp:0:interface=127.0.0.1"},
    })
    reactor = MemoryReactorClock()
    db = Database(reactor, cfg.database)
    runtime = Runtime(reactor, cfg, db, DaemonMetrics("authd"), WorkerPool(reactor, "cpu", 1))
    try:
        writes = DAEMON.build(runtime).verifier.shared_writes
        assert writes.pool is not None and writes.pool is not db.pool
        assert (writes.pool.name, writes.pool.size) == ("authd-shared-writes", 1)
        assert writes.engine is not db.engine
        assert writes.engine.pool.size() == 1  # type: ignore[attr-defined]
        writes.engine.dispose()
    finally:
        db.close()
