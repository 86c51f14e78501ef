# -*- test-case-name: tests.unit.test_timers -*-
"""Periodic jobs (purges, sweeps) as services a daemon starts and stops with its settings.

Like Twisted's ``TimerService``, with two differences the daemons need: the first step runs one
interval after the start, not at once (a daemon being built, or a setting just switched on by
SIGHUP, does not hit the database at that moment), and a step that fails, raising or through
its Deferred, is logged and the timer goes on (``TimerService`` stops for good on the first
error, and a sweep that silently stopped is how stale rows pile up).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
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
