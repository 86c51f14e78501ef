"""authd's shared failure counters: atomic on every backend, and seen by every host."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from authd import failures
from authd.sasl_codec import Outcome
from authd.verify import Verifier
from tests.support.sync import migrated_engine
from tests.unit.test_authd_verify import Rig


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    yield from migrated_engine(database_url, pool_size=8)


def test_counts_window_fingerprint_clear_purge(engine: Engine) -> None:
    keys = ["ip:192.0.2.1", "user:bob@example.org"]
    failures.record_failure(engine, keys, "aa", now=1000, window=600)
    failures.record_failure(engine, keys, "aa", now=1001, window=600)  # same password again
    failures.record_failure(engine, keys[:1], "bb", now=1002, window=600)
    assert failures.failure_counts(engine, [*keys, "ip:other"], now=1003, window=600) == {
        "ip:192.0.2.1": 2, "user:bob@example.org": 1}
    # Outside the window a row no longer counts, and a new failure restarts it at one.
    assert failures.failure_counts(engine, keys, now=1700, window=600) == {}
    failures.record_failure(engine, keys[:1], "cc", now=1700, window=600)
    assert failures.failure_counts(engine, keys, now=1700, window=600) == {"ip:192.0.2.1": 1}
    failures.clear(engine, "ip:192.0.2.1")
    assert failures.failure_counts(engine, keys, now=1700, window=600) == {}
    assert failures.purge(engine, now=1700, window=600) == 1  # bob's stale row


def test_a_batch_applies_its_writes_in_order(engine: Engine) -> None:
    """What the writer sends with a backlog: the same result as the writes one by one."""
    keys = ("ip:192.0.2.1", "user:bob@example.org")
    failures.write_batch(engine, [
        failures.RecordFailure(keys, "aa", 1000, 600),
        failures.RecordFailure(keys, "aa", 1001, 600),  # same password again
        failures.RecordFailure(keys[:1], "bb", 1002, 600),
        failures.ClearLogin("user:bob@example.org"),
        failures.RecordFailure(keys[1:], "cc", 1003, 600),
    ])
    assert failures.failure_counts(engine, keys, now=1003, window=600) == {
        "ip:192.0.2.1": 2, "user:bob@example.org": 1}


def test_concurrent_failures_are_all_counted(engine: Engine) -> None:
    """Eight writers on one key: an exact total proves each update is one atomic statement."""
    errors: list[BaseException] = []

    def hammer(worker: int) -> None:
        try:
            for attempt in range(25):
                failures.record_failure(engine, ["ip:203.0.113.9"], f"{worker:02x}{attempt:02x}",
                                        now=5000, window=600)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert failures.failure_counts(engine, ["ip:203.0.113.9"], now=5000, window=600) == {
        "ip:203.0.113.9": 200}


def test_another_host_sees_the_attacker() -> None:
    host_a = Rig(penalty_threshold=2, penalty_initial="1s", penalty_max="4s", failure_delay="0s")
    host_b_verifier = Verifier(
        clock=host_a.clock, store=host_a.store, db_run=host_a.db_run, cpu_run=host_a.cpu_run,
        config=host_a.authd, passwords=host_a.passwords, metrics=host_a.authd_metrics,
    )
    for attempt in range(4):
        verdict, _ = host_a.verify(password=f"guess-{attempt}", rip="198.51.100.7")
        assert verdict.outcome is Outcome.FAIL
    # Host B has never seen this client, yet delays it: the counters are in the database.
    host_a.clock.advance(3)  # past host B's count cache
    host_a.verifier = host_b_verifier
    verdict, took = host_a.verify(password="s3cret", rip="198.51.100.7")
    assert verdict.outcome is Outcome.OK
    assert took >= 2.0
    # The right password from another network is not delayed.
    verdict, took = host_a.verify(password="s3cret", rip="192.0.2.50")
    assert verdict.outcome is Outcome.OK
    assert took < 1.0


def test_without_sharing_other_hosts_know_nothing() -> None:
    host_a = Rig(penalty_threshold=2, penalty_initial="1s", failure_delay="0s", penalty_shared=False)
    host_b_verifier = Verifier(
        clock=host_a.clock, store=host_a.store, db_run=host_a.db_run, cpu_run=host_a.cpu_run,
        config=host_a.authd, passwords=host_a.passwords, metrics=host_a.authd_metrics,
    )
    for attempt in range(4):
        host_a.verify(password=f"guess-{attempt}", rip="198.51.100.7")
    host_a.verifier = host_b_verifier
    verdict, took = host_a.verify(password="s3cret", rip="198.51.100.7")
    assert verdict.outcome is Outcome.OK
    assert took < 1.0


def test_database_trouble_leaves_the_local_counters_in_charge() -> None:
    rig = Rig(penalty_threshold=1, penalty_initial="1s", failure_delay="0s")
    rig.verify(password="wrong", rip="198.51.100.8")
    rig.clock.advance(3)  # past the shared-count cache; the mailbox record is still cached
    rig.db_down = True
    verdict, took = rig.verify(password="wrong-again", rip="198.51.100.8")
    assert verdict.outcome is Outcome.FAIL
    assert 1.0 <= took < 2.0  # the local penalty, nothing added by the failed shared read
