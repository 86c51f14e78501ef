# -*- test-case-name: tests.unit.test_timers -*-
"""Periodic jobs (purges, sweeps) as services a daemon starts and stops with its settings.

Like Twisted's ``TimerService``, with two differences the daemons need: the first step runs one
interval after the start, not at once (a daemon being built, or a setting just switched on by
SIGHUP, does not hit the database at that moment), and a step that fails, raising or through
its Deferred, is logged and the timer goes on (``TimerService`` stops for good on the first
error, and a sweep that silently stopped is how stale rows pile up).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="mailplugins.timers")


class PeriodicService(Service):
    """Run ``step`` every ``interval`` seconds of ``clock`` while the service runs."""

    def __init__(self, name: str, interval: float, step: Callable[[], Any], clock: Any) -> None:
        self.name = name
        self.interval = interval
        self.step = step
        self.clock = clock
        self._loop: LoopingCall | None = None

    def _run(self) -> Deferred[None]:
        def failed(failure: Failure) -> None:
            log.failure("{name} failed; it runs again in {interval}s", failure,
                        name=self.name, interval=self.interval)

        # The LoopingCall waits for a step's Deferred, so steps never overlap.
        return maybeDeferred(self.step).addCallbacks(lambda _: None, failed)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._run)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


@dataclass(frozen=True)
class Periodic:
    """A periodic job a daemon's settings call for: its name, interval and step."""

    name: str
    interval: float
    step: Callable[[], Any]


class Timers(MultiService):
    """The periodic jobs a daemon runs now, one :class:`PeriodicService` child each.

    A daemon builds the list of jobs its settings need (at start and on every reload) and
    calls :meth:`want`: a job switched on starts, one switched off stops, one whose interval
    changed starts over with the new one, and one that stays keeps its schedule (only its step
    is replaced, so it works on the new settings), so frequent reloads never postpone a purge.
    """

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self.clock = clock

    def want(self, jobs: Iterable[Periodic]) -> None:
        wanted = {job.name: job for job in jobs}
        for name in [n for n in self.namedServices if n not in wanted]:
            self.getServiceNamed(name).disownServiceParent()  # a running parent stops it
        for job in wanted.values():
            current = self.namedServices.get(job.name)
            if isinstance(current, PeriodicService) and current.interval == job.interval:
                current.step = job.step
                continue
            if current is not None:
                current.disownServiceParent()
            PeriodicService(job.name, job.interval, job.step, self.clock).setServiceParent(self)

    def names(self) -> list[str]:
        """The jobs that run now (sorted), for tests and logs."""
        return sorted(self.namedServices)


class DaemonServices(MultiService):
    """What a running daemon starts when it is built and stops with :meth:`stop`: the parent of
    its ``timers`` (and of any other service it comes to own; the runner keeps the listeners)."""

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self.timers = Timers(clock)
        self.timers.setName("timers")
        self.timers.setServiceParent(self)

    def stop(self) -> None:
        """Stop every child at once (a step in flight just ends); twice is harmless."""
        if self.running:
            self.stopService()
