# -*- test-case-name: tests.unit.test_balance -*-
"""Spreading a burst of new connections evenly over a daemon's workers.

Every worker of a daemon listens on the same sockets (:mod:`mailplugins.listening`). A new
connection wakes every worker whose epoll watches the socket, and the first to run accepts:
Twisted's port accepts up to ``numberAccepts`` connections per wake-up (100 at first, growing),
so a burst (every smtpd of a restarted Postfix opening its policy connection at once) lands
nearly whole on one worker. Policy and LMTP connections last, and so does the imbalance: one
worker's core busy, another idle. Accepting one connection per wake-up is not enough on its
own: the worker already running takes the next connection before a sleeping one is scheduled
(measured: mostly 0 to 3 of 40 connections left for the second worker).

So a worker of a daemon with several accepts one connection per wake-up and then looks at the
open counts every worker publishes (:class:`~mailplugins.connections.WorkerSlots`): while it
holds more than its share, ``ceil(total / workers) + SLACK``, it stops reading that listening
socket until it is back within its share (it looks every ``TICK``), for ``PAUSE`` seconds
at most, and the connections waiting in the kernel's queue go to the workers still watching
it. The pause always ends by its timer, whatever the other workers do: a dead, stuck or busy
worker slows another's accepting (one connection per pause while it is over its share) but
never stops it. ``max_connections`` refuses over the daemon's cap as before.
"""

from __future__ import annotations

from typing import Any, Protocol

from mailplugins.connections import WorkerSlots

#: Seconds a worker over its share leaves the listening socket to the others, at most.
PAUSE = 0.005
#: Seconds between looks at the counts during a pause: a worker back within its share (its
#: own connections closed, or the others took new ones) listens again at once. Short
#: connections swing the counts past the share all the time; with only the full pause, each
#: worker in turn stopped accepting for 5 ms and the churn of connections fell to a third.
TICK = 0.001
#: Connections a worker may hold over an even split before it pauses: an exact split cannot
#: hold at every instant (connections open and close in every worker), and pausing for one
#: connection would only add latency.
SLACK = 1


class Pausable(Protocol):
    """What :class:`Balance` needs of a listening port (Twisted's ``tcp.Port``)."""

    @property
    def connected(self) -> int: ...

    @property
    def disconnecting(self) -> int: ...

    def startReading(self) -> None: ...

    def stopReading(self) -> None: ...


class Balance:
    """One worker's side: pauses its listening ports while it holds more than its share."""

    #: What Twisted's port should accept per wake-up, so that :meth:`after_read` runs between
    #: accepts (Twisted raises ``numberAccepts`` after every full read: the port resets it).
    accepts_per_read = 1

    def __init__(self, reactor: Any, slots: WorkerSlots, pause: float = PAUSE,
                 slack: int = SLACK, tick: float = TICK) -> None:
        self._reactor = reactor
        self._slots = slots
        self.pause = pause
        self.tick = tick
        self.slack = slack
        self._paused: set[Pausable] = set()

    def over_share(self) -> bool:
        """Whether this worker holds more than its share of the daemon's open connections."""
        total = self._slots.total()
        share = -(-total // self._slots.workers)
        return self._slots.own() > share + self.slack

    def after_read(self, port: Pausable) -> None:
        """Called by ``port`` after each read (an accept, or a race lost to another worker)."""
        if port in self._paused or not self.over_share():
            return
        port.stopReading()
        self._paused.add(port)
        self._reactor.callLater(self.tick, self._look, port, self._reactor.seconds() + self.pause)

    def _look(self, port: Pausable, until: float) -> None:
        """Listen again once back within the share, or at the pause's end whatever the others
        do; else look again a tick later."""
        if self.over_share() and self._reactor.seconds() < until:
            self._reactor.callLater(self.tick, self._look, port, until)
            return
        self._paused.discard(port)
        if port.connected and not port.disconnecting:  # not stopped meanwhile
            port.startReading()
