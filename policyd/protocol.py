# -*- test-case-name: tests.unit.test_policyd_protocol -*-
"""The thin Twisted side: bytes to the codec, requests to the service, actions back.

Requests on one connection are answered strictly in order, one at a time; while one is being
decided the transport is paused, so a peer that pipelines cannot make us queue unboundedly.
Bad input is logged and the connection closed without a reply (Postfix then retries and applies
its ``default_action``); requests that arrived in the same read as the bad bytes are dropped with
them (Postfix never sends a second request before the first reply). The connection stays open
otherwise: Postfix pays a 1 s reconnect for every close, so only the idle timeout (longer than
Postfix's own) ends a quiet connection.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplugins.config.policyd import PolicydConfig
from policyd.codec import CodecError, PolicyRequest, RequestDecoder, encode_reply
from policyd.service import PolicyService

log = Logger(namespace="policyd.protocol")


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
        self._idle_timeout = config.idle_timeout
        self._idle: Any = None

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        host = getattr(peer, "host", None)
        return f"{host}:{getattr(peer, 'port', '')}" if host else "local"

    # -- idle timeout ----------------------------------------------------------------------

    def _touch(self) -> None:
        idle = self._idle
        if idle is not None and idle.active():
            idle.reset(self._idle_timeout)
        elif not self._closed:
            self._idle = self._clock.callLater(self._idle_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._idle = None
        log.info("{peer}: idle for {seconds}s, closing", peer=self._peer(),
                 seconds=self._idle_timeout)
        self._close()

    def _stop_timer(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    # -- protocol --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._touch()

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._touch()
        try:
            requests = self._decoder.feed(data)
        except CodecError as exc:
            log.warn("{peer}: closing connection: {reason}", peer=self._peer(), reason=str(exc))
            self._close()
            return
        if requests:
            self._pending.extend(requests)
            self._next()

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
        self.transport.write(encode_reply(action))
        self._touch()
        self._next()

    def _crashed(self, failure: Failure) -> None:
        # The service never fails; if it does anyway, never send a half or a wrong reply.
        log.failure("{peer}: internal error, closing connection", failure, peer=self._peer())
        self._busy = False
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._pending.clear()
        self._stop_timer()
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._pending.clear()
        self._stop_timer()


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
