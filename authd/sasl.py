# -*- test-case-name: tests.unit.test_authd_sasl -*-
"""The thin Twisted side of the auth-client protocol: bytes to the session, actions to the world.

There is no idle timeout: Postfix keeps one connection per smtpd process and only notices a
closed one when a write fails, so closing a quiet connection would cost a 454 later (idle
clients are bounded by ``max_connections``). A *line* however must arrive whole within
``line_timeout`` of its first byte: Postfix writes each line in one go, and a peer trickling
bytes would otherwise hold its connection and buffer forever.

A peer that half-closes gets the answers to the logins being verified, then the connection is
closed (exchanges waiting for a CONT can no longer finish and are dropped).
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from authd.logins import Verdict, VerifyRequest
from authd.metrics import AuthdMetrics
from authd.sasl_codec import AuthServerSession, Drop, Send, Verify, handshake
from authd.verify import Verifier
from mailplugins.config import AuthdConfig
from mailplugins.deadline import Deadline

log = Logger(namespace="authd.sasl")


@implementer(IHalfCloseableProtocol)
class AuthClientProtocol(Protocol):
    """One Postfix smtpd process (or doveadm) talking to us."""

    factory: AuthClientFactory
    transport: Any

    def __init__(self, session: AuthServerSession, cuid: int) -> None:
        self.session = session
        self.cuid = cuid
        self._sweeper: Any = None
        self._deadline = Deadline(self._too_slow)
        self._closed = False
        self._ended = False

    def connectionMade(self) -> None:
        self.transport.write(
            handshake(self.factory.spid, self.cuid, self.factory.cookie())
        )
        self._schedule_sweep()

    def dataReceived(self, data: bytes) -> None:
        self._carry_out(self.session.receive(data, self.factory.clock.seconds()))
        self._deadline.follow_line(
            self.factory.clock, self.factory.config.line_timeout, data=data,
            pending=not (self._closed or self._ended) and self.session.pending,
        )

    def readConnectionLost(self) -> None:
        """The peer will send nothing more (half-close): answer what is being verified."""
        self._ended = True
        self._deadline.stop()
        self._close_if_ended()

    def writeConnectionLost(self) -> None:
        self._closed = True
        self.transport.loseConnection()

    def _close_if_ended(self) -> None:
        if not self._ended or self._closed:
            return
        if any(r.waiting_since is None for r in self.session.requests.values()):
            return  # a verification is still running; its answer comes first
        self._closed = True
        self.session.closed = True
        self.transport.loseConnection()

    def _too_slow(self) -> None:
        if self._closed:
            return
        self.factory.metrics.protocol_errors["sasl"].inc()
        log.warn("dropping auth-client connection from {peer}: line not complete {seconds}s "
                 "after its first byte", peer=self.transport.getPeer(),
                 seconds=self.factory.config.line_timeout)
        self._closed = True
        self.session.closed = True
        self.transport.loseConnection()

    def _carry_out(self, actions: list[Any]) -> None:
        for action in actions:
            if self._closed:
                return
            if isinstance(action, Send):
                self.transport.write(action.data)
            elif isinstance(action, Verify):
                self._verify(action)
            elif isinstance(action, Drop):
                self._drop(action)

    def _verify(self, action: Verify) -> None:
        request = VerifyRequest(
            user=action.credentials.authcid,
            password=action.credentials.password,
            service=action.service,
            remote_ip=action.remote_ip,
            mechanism=action.mechanism.lower(),
            secured=action.secured,
            authzid=action.credentials.authzid,
        )

        def done(verdict: Verdict) -> None:
            if not self._closed:
                answer = self.session.verified(action.request_id, verdict.outcome, verdict.user,
                                               action.serial)
                self._carry_out(answer)
                self._close_if_ended()

        self.factory.verifier.verify(request).addCallback(done)

    def _drop(self, drop: Drop) -> None:
        peer = self.transport.getPeer() if self.transport else None
        if drop.temporary:
            log.warn("closing auth-client connection from {peer}: {reason}",
                     peer=peer, reason=drop.reason)
        else:
            self.factory.metrics.protocol_errors["sasl"].inc()
            log.warn("dropping auth-client connection from {peer}: {reason}",
                     peer=peer, reason=drop.reason)
        self._closed = True
        self._deadline.stop()
        if drop.temporary:
            # A reset rather than a FIN: Postfix reconnects only when a write fails, so after a
            # FIN one more of its sessions would hit the dead socket and answer 454 for nothing.
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def _schedule_sweep(self) -> None:
        interval = max(1.0, min(self.session.continue_timeout / 2, 30.0))
        self._sweeper = self.factory.clock.callLater(interval, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        if self._closed:
            return
        self.session.expire(self.factory.clock.seconds())
        self._schedule_sweep()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._closed = True
        self.session.closed = True
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        self._deadline.stop()


class AuthClientFactory(Factory):
    """Shared by every auth-client connection: settings, the verifier, the connection counter."""

    noisy = False

    def __init__(
        self, *, verifier: Verifier, config: AuthdConfig, metrics: AuthdMetrics, clock: Any
    ) -> None:
        self.verifier = verifier
        self.config = config
        self.metrics = metrics
        self.clock: Any = clock
        self.spid = os.getpid()
        self._next_cuid = 0

    def cookie(self) -> str:
        """Dovecot's per-connection cookie; only auth-master clients use it, so any random hex."""
        return secrets.token_hex(16)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        self._next_cuid += 1
        session = AuthServerSession(
            max_line=self.config.max_line_length,
            max_requests=self.config.max_requests_per_connection,
            continue_timeout=self.config.continue_timeout,
        )
        protocol = AuthClientProtocol(session, self._next_cuid)
        protocol.factory = self
        return protocol
