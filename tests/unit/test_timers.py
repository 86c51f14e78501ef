"""mailplugins.timers: periodic jobs as services that survive their steps' errors."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mailplugins.timers import DaemonServices, Periodic, PeriodicService, Timers


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


def test_timers_start_and_stop_exactly_the_jobs_wanted() -> None:
    clock = Clock()
    calls: list[str] = []
    timers = Timers(clock)
    timers.startService()
    timers.want([Periodic("purge", 10, lambda: calls.append("purge"))])
    assert timers.names() == ["purge"]
    clock.advance(10)
    timers.want([Periodic("purge", 10, lambda: calls.append("purge")),
                 Periodic("sweep", 5, lambda: calls.append("sweep"))])
    clock.advance(5)
    timers.want([Periodic("sweep", 5, lambda: calls.append("sweep"))])
    assert timers.names() == ["sweep"]
    clock.advance(10)
    assert calls == ["purge", "sweep", "sweep"]  # no purge once it was switched off
    timers.want([])
    clock.advance(100)
    assert calls == ["purge", "sweep", "sweep"]
    assert timers.names() == []


def test_a_kept_job_keeps_its_schedule_and_takes_the_new_step() -> None:
    clock = Clock()
    calls: list[str] = []
    timers = Timers(clock)
    timers.startService()
    timers.want([Periodic("purge", 10, lambda: calls.append("old"))])
    for _ in range(3):  # reloads more often than the interval do not postpone the job
        clock.advance(4)
        timers.want([Periodic("purge", 10, lambda: calls.append("new"))])
    assert calls == ["new"]


def test_a_new_interval_starts_the_job_over() -> None:
    clock = Clock()
    calls: list[float] = []
    timers = Timers(clock)
    timers.startService()
    timers.want([Periodic("purge", 10, lambda: calls.append(clock.seconds()))])
    clock.advance(4)
    timers.want([Periodic("purge", 3, lambda: calls.append(clock.seconds()))])
    clock.pump([3, 3])
    assert calls == [7, 10]


def test_jobs_wanted_before_the_start_run_only_once_started_and_stop_with_it() -> None:
    clock = Clock()
    calls: list[float] = []
    timers = Timers(clock)
    timers.want([Periodic("purge", 10, lambda: calls.append(clock.seconds()))])
    clock.advance(30)
    assert calls == []
    timers.startService()
    clock.advance(10)
    timers.stopService()
    clock.advance(30)
    assert calls == [40]


def test_daemon_services_stop_their_timers_once() -> None:
    clock = Clock()
    calls: list[float] = []
    services = DaemonServices(clock)
    services.startService()
    services.timers.want([Periodic("purge", 10, lambda: calls.append(clock.seconds()))])
    clock.advance(10)
    services.stop()
    services.stop()
    clock.advance(30)
    assert calls == [10] and not services.timers.running
