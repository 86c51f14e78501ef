# -*- test-case-name: tests.unit.test_policyd_protocol -*-
"""The thin Twisted side: bytes to the codec, requests to the service, actions back.

Requests on one connection are answered strictly in order, one at a time; while one is being
decided the transport is paused, so a peer that pipelines cannot make us queue unboundedly.
Bad input is logged and the connection closed without a reply (Postfix then retries and applies
its ``default_action``); requests that arrived in the same read as the bad bytes are dropped with
them (Postfix never sends a second request before the first reply). The connection stays open
otherwise: Postfix pays a 1 s reconnect for every close, so only the idle timeout (longer than
Postfix's own) ends a quiet connection.

Two timers, never both running: the idle timeout counts from the last reply (or the connection)
while nothing is being received or decided; the request timeout counts from the first byte of a
request and closes the connection if the request is not complete by then. Postfix writes each
request whole, so only a broken or hostile peer ever meets the second one; without it a sender
of one byte a second would hold a connection (and its buffer) forever, since every byte would
postpone the idle timeout. While a request is being decided neither runs (the service answers
within its budget), and a request that arrived behind it is timed from that answer, since the
connection was not read from meanwhile.

A peer that half-closes (``printf '...\\n\\n' | nc -N -U socket``) gets the answers to the
requests it completed, then the connection is closed; a partial request is dropped.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplugins.config.policyd import PolicydConfig
from mailplugins.connections import peer_text
from mailplugins.deadline import Deadline
from mailplugins.writethrough import write_now
from policyd.codec import CodecError, PolicyRequest, RequestDecoder, encode_reply
from policyd.service import PolicyService

log = Logger(namespace="policyd.protocol")


@implementer(IHalfCloseableProtocol)
class PolicyProtocol(Protocol):
    transport: Any

    def __init__(self, service: PolicyService, config: PolicydConfig, clock: IReactorTime) -> None:
        self._service = service
        self._decoder = RequestDecoder(config.max_line_length, config.max_attributes)
        self._clock: Any = clock
        self._pending: deque[PolicyRequest] = deque()
        self._busy = False
        self._paused = False
        self._closed = False
        self._draining = False
        self._ended = False  # the peer half-closed: answer what is complete, then close
        self._idle_timeout = config.idle_timeout
        self._request_timeout = config.request_timeout
        self._idle = Deadline(self._timed_out)
        self._deadline = Deadline(self._too_slow)

    def _peer(self) -> str:
        return peer_text(self.transport)

    # -- timers ----------------------------------------------------------------------------

    def _arm(self) -> None:
        """Run the one timer that fits the connection's state (none while deciding).

        A running request deadline is kept, not restarted: it counts from the request's first
        byte. Callers stop it when a request completes, so the next one gets its own.
        """
        if self._closed or self._busy or self._pending:
            self._stop_timers()  # deciding, or between two answers of one drain
            return
        if self._ended:
            self._close()  # every complete request is answered; nothing more can come
            return
        if self._decoder.pending:
            self._idle.stop()
            self._deadline.start(self._clock, self._request_timeout)
        else:
            self._deadline.stop()
            self._idle.start(self._clock, self._idle_timeout)

    def _timed_out(self) -> None:
        log.info("{peer}: idle for {seconds}s, closing", peer=self._peer(),
                 seconds=self._idle_timeout)
        self._close()

    def _too_slow(self) -> None:
        log.warn("{peer}: request not complete {seconds}s after its first byte, closing",
                 peer=self._peer(), seconds=self._request_timeout)
        self._close()

    def _stop_timers(self) -> None:
        self._idle.stop()
        self._deadline.stop()

    # -- protocol --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._closed or not data:
            return
        try:
            requests = self._decoder.feed(data)
        except CodecError as exc:
            log.warn("{peer}: closing connection: {reason}", peer=self._peer(), reason=str(exc))
            self._close()
            return
        if requests:
            self._pending.extend(requests)
            self._deadline.stop()  # a partial request left in the buffer started in this read
            self._next()
        self._arm()

    def _next(self) -> None:
        if self._draining:
            return  # called back from _answer inside the loop below; the loop goes on
        self._draining = True
        try:
            while self._pending and not self._busy and not self._closed:
                request = self._pending.popleft()
                self._busy = True
                action = self._service.handle(request)
                if isinstance(action, str):
                    self._answer(action)  # every fact was cached: answered at once
                else:
                    action.addCallback(self._answer).addErrback(self._crashed)
        finally:
            self._draining = False
        if self._closed:
            return
        if self._busy and self._pending and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not self._pending:
            self._paused = False
            self.transport.resumeProducing()

    def _answer(self, action: str) -> None:
        self._busy = False
        if self._closed:
            return
        write_now(self.transport, encode_reply(action))
        self._stop_timers()  # the idle time, or a request behind this one, counts from now
        self._next()
        self._arm()

    def _crashed(self, failure: Failure) -> None:
        # The service never fails; if it does anyway, never send a half or a wrong reply.
        log.failure("{peer}: internal error, closing connection", failure, peer=self._peer())
        self._busy = False
        self._close()

    def readConnectionLost(self) -> None:
        """The peer will send nothing more (half-close)."""
        self._ended = True
        self._arm()

    def writeConnectionLost(self) -> None:
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._pending.clear()
        self._stop_timers()
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._pending.clear()
        self._stop_timers()


class PolicyFactory(Factory):
    noisy = False

    def __init__(self, service: PolicyService, config: PolicydConfig, clock: IReactorTime) -> None:
        self.service = service
        self.config = config
        self.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> Any:
        protocol = PolicyProtocol(self.service, self.config, self.clock)
        protocol.factory = self
        return protocol
