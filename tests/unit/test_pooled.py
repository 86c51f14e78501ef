"""What the pooled checks share (policyd.pooled): timeouts on one timer, pending counts."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock

from policyd.pooled import Deadlines, Pending, PooledCheck


def outcome(work: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    work.addBoth(lambda r: seen.append(r.type if hasattr(r, "type") else r))
    return seen


def test_work_still_waiting_at_its_deadline_is_cancelled_then_and_not_before() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    work: Deferred[str] = Deferred()
    deadlines.add(work, 1.0)
    seen = outcome(work)
    clock.advance(0.999)
    assert seen == []
    clock.advance(0.001)
    assert seen == [CancelledError]
    work.callback("late")  # a result after the deadline is ignored
    assert seen == [CancelledError] and len(deadlines) == 0


def test_work_that_fired_is_forgotten_and_never_cancelled() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    works: list[Deferred[str]] = [Deferred() for _ in range(100)]
    for work in works:
        deadlines.add(work, 1.0)
    seen = [outcome(work) for work in works]
    assert len(clock.getDelayedCalls()) == 1  # one timer for all of them
    for work in works:
        work.callback("ok")
    assert len(deadlines) == 0
    assert clock.getDelayedCalls() == []  # nothing waits: no timer left behind
    clock.advance(1.0)
    assert all(s == ["ok"] for s in seen)


def test_a_shorter_timeout_added_later_fires_first() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    long: Deferred[str] = Deferred()
    short: Deferred[str] = Deferred()
    deadlines.add(long, 1.0)
    clock.advance(0.1)
    deadlines.add(short, 0.2)
    seen_long, seen_short = outcome(long), outcome(short)
    clock.advance(0.2)
    assert (seen_long, seen_short) == ([], [CancelledError])
    clock.advance(0.7)
    assert seen_long == [CancelledError]
    assert clock.getDelayedCalls() == []


def test_the_timer_follows_the_earliest_deadline_still_waiting() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    first: Deferred[str] = Deferred()
    deadlines.add(first, 1.0)
    clock.advance(0.5)
    second: Deferred[str] = Deferred()
    deadlines.add(second, 1.0)
    first.callback("ok")
    seen = outcome(second)
    clock.advance(0.5)  # first's deadline: nothing to cancel, the timer moves to second's
    assert seen == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0.5)
    assert seen == [CancelledError]


def test_pending_counts_work_until_it_ends() -> None:
    pending = Pending()
    tracked = pending.track(lambda x: x * 2)
    assert pending.count == 1
    assert tracked(2) == 4
    assert pending.count == 0


def test_work_that_has_already_fired_leaves_nothing_behind() -> None:
    # A synchronous pool (tests, a cache) hands back work that has fired already.
    clock = Clock()
    deadlines = Deadlines(clock)
    for _ in range(3):
        done: Deferred[str] = Deferred()
        done.callback("ok")
        deadlines.add(done, 1.0)
        assert outcome(done) == ["ok"]
    assert len(deadlines) == 0 and clock.getDelayedCalls() == []


def test_a_check_whose_work_is_late_fails_with_a_timeout() -> None:
    clock = Clock()
    held: Deferred[str] = Deferred()
    check = PooledCheck(lambda fn, *args, **kwargs: held, clock, max_pending=10)
    work = check.submit(0.5, lambda: "never")
    seen = outcome(work)
    clock.advance(0.5)
    assert seen == [TimeoutError]
    held.callback("late")  # ignored
    assert seen == [TimeoutError]
