"""mailplugins.timers: periodic jobs as services that survive their steps' errors."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mailplugins.timers import PeriodicService


def test_steps_run_every_interval_from_one_interval_after_start() -> None:
    clock = Clock()
    calls: list[float] = []
    timer = PeriodicService("job", 10, lambda: calls.append(clock.seconds()), clock)
    timer.startService()
    assert calls == []  # not at once
    clock.advance(10)
    clock.advance(10)
    assert calls == [10, 20]
    timer.stopService()
    clock.advance(100)
    assert calls == [10, 20]
    assert not timer.running


def test_a_step_that_raises_or_fails_is_logged_and_the_timer_goes_on() -> None:
    clock = Clock()
    calls: list[int] = []

    def step() -> Deferred[None] | None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("boom")
        if len(calls) == 2:
            return fail(RuntimeError("boom later"))
        return succeed(None)

    timer = PeriodicService("job", 5, step, clock)
    timer.startService()
    clock.pump([5, 5, 5])
    assert calls == [0, 1, 2]
    assert timer.running
    timer.stopService()


def test_a_slow_step_is_not_overlapped() -> None:
    clock = Clock()
    pending: list[Deferred[None]] = []

    def step() -> Deferred[None]:
        d: Deferred[None] = Deferred()
        pending.append(d)
        return d

    timer = PeriodicService("job", 5, step, clock)
    timer.startService()
    clock.pump([5, 5, 5])
    assert len(pending) == 1
    pending[0].callback(None)
    clock.advance(5)
    assert len(pending) == 2
    timer.stopService()


def test_added_to_a_running_parent_it_starts_and_removed_it_stops() -> None:
    clock = Clock()
    calls: list[Any] = []
    parent = MultiService()
    parent.startService()
    timer = PeriodicService("job", 5, lambda: calls.append(1), clock)
    timer.setServiceParent(parent)
    assert timer.running
    clock.advance(5)
    timer.disownServiceParent()
    assert not timer.running
    clock.advance(50)
    assert calls == [1]
