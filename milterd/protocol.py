# -*- test-case-name: tests.unit.test_milterd_protocol -*-
"""The thin Twisted side: bytes to the codec, commands to the session, replies back in one send.

Commands are handled strictly in order. The replies to everything decided at once are gathered
and written with one ``send`` when the read is done (or before waiting on a decision), so Postfix
never sees two small writes where one would do; while a decision is pending, commands that
arrive behind it wait, and reading is paused so nothing queues unboundedly.

TCP: ``TCP_NODELAY`` on accepted sockets, so a reply never waits on Nagle's algorithm for an
ACK, and ``TCP_QUICKACK`` after each read, so our ACKs are not delayed by up to 40 ms while
Postfix has a second small packet waiting on its side (the stall OpenDKIM shows over TCP).

Bad input (the codec's limits, a failed negotiation): one log line and the connection closed;
Postfix then applies the milter's ``default_action``. Two timers as in the other daemons: the
idle timeout (longer than Postfix's own) while nothing is pending, and a deadline from a
frame's first byte to its last.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplugins.config.milterd import MilterdConfig
from mailplugins.connections import peer_text
from mailplugins.deadline import Deadline
from mailplugins.writethrough import write_now
from milterd import codec
from milterd.checks import Checks
from milterd.session import MilterMetrics, MilterSession

log = Logger(namespace="milterd.protocol")

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class MilterProtocol(Protocol):
    transport: Any

    def __init__(self, checks: Checks, config: MilterdConfig, clock: IReactorTime,
                 metrics: MilterMetrics | None = None) -> None:
        self._checks = checks
        self._config = config
        self._clock: Any = clock
        self._metrics = metrics
        self.session = MilterSession(checks, config, clock, metrics)
        self._decoder = codec.MilterDecoder(config.max_frame, config.max_macros)
        self._queue: deque[codec.Command] = deque()
        self._out: list[bytes] = []
        self._busy = False
        self._paused = False
        self._closed = False
        self._draining = False
        self._quickack: Any = None
        self._idle = Deadline(self._timed_out)
        self._deadline = Deadline(self._too_slow)

    def _peer(self) -> str:
        return peer_text(self.transport)

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        sock = _socket_of(self.transport)
        unix = sock is None or sock.family == socket.AF_UNIX
        if unix or self._config.no_reply_tcp:
            self.session.extra_protocol = codec.NO_REPLY
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if _QUICKACK is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                    self._quickack = sock
            except OSError:
                pass
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._closed or not data:
            return
        if self._quickack is not None:
            try:  # the kernel turns quick ACKs off again by itself; ask anew after each read
                self._quickack.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._quickack = None
        try:
            commands = self._decoder.feed(data)
        except codec.CodecError as exc:
            log.warn("{peer}: closing milter connection: {reason}", peer=self._peer(), reason=str(exc))
            self._close()
            return
        if commands:
            self._queue.extend(commands)
            self._deadline.stop()
            self._drain()
        self._arm()

    # -- commands --------------------------------------------------------------------------

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue and not self._busy and not self._closed:
                command = self._queue.popleft()
                if isinstance(command, codec.Quit):
                    if command.new_connection:
                        old = self.session
                        self.session = MilterSession(self._checks, self._config, self._clock,
                                                     self._metrics)
                        self.session.extra_protocol = old.extra_protocol
                        self.session.silent = old.silent
                        continue
                    self._flush()
                    self._close()
                    return
                try:
                    reply = self.session.handle(command)
                except codec.CodecError as exc:
                    log.warn("{peer}: closing milter connection: {reason}", peer=self._peer(),
                             reason=str(exc))
                    self._close()
                    return
                if reply is None:
                    continue
                if type(command).__name__ in self.session.silent:
                    # Postfix does not wait for this one; it is always a plain "continue".
                    continue
                if isinstance(reply, bytes):
                    self._out.append(reply)
                    continue
                if reply.called:
                    reply.addCallback(self._out.append)
                    continue
                self._busy = True
                self._flush()
                reply.addCallback(self._answer).addErrback(self._crashed)
        finally:
            self._draining = False
        if self._closed:
            return
        if not self._busy:
            self._flush()
        if self._busy and self._queue and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not self._queue:
            self._paused = False
            self.transport.resumeProducing()

    def _answer(self, reply: bytes) -> None:
        self._busy = False
        if self._closed:
            return
        self._out.append(reply)
        self._drain()
        self._arm()

    def _crashed(self, failure: Failure) -> None:
        log.failure("{peer}: internal error, closing milter connection", failure, peer=self._peer())
        self._busy = False
        self._close()

    def _flush(self) -> None:
        if self._out and not self._closed:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            write_now(self.transport, data)

    # -- timers ----------------------------------------------------------------------------

    def _arm(self) -> None:
        if self._closed or self._busy or self._queue:
            self._idle.stop()
            self._deadline.stop()
            return
        if self._decoder.pending:
            self._idle.stop()
            self._deadline.start(self._clock, self._config.frame_timeout)
        else:
            self._deadline.stop()
            self._idle.start(self._clock, self._config.idle_timeout, restart=True)

    def _timed_out(self) -> None:
        log.info("{peer}: idle for {seconds}s, closing", peer=self._peer(),
                 seconds=self._config.idle_timeout)
        self._close()

    def _too_slow(self) -> None:
        log.warn("{peer}: milter frame not complete {seconds}s after its first byte, closing",
                 peer=self._peer(), seconds=self._config.frame_timeout)
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._queue.clear()
        self._out.clear()
        self._idle.stop()
        self._deadline.stop()
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._queue.clear()
        self._idle.stop()
        self._deadline.stop()
        self.session.close()


def _socket_of(transport: Any) -> socket.socket | None:
    """The socket under a transport (through the connection-limit wrapper), if it has one."""
    get_handle = getattr(transport, "getHandle", None)
    try:
        handle = get_handle() if get_handle is not None else None
    except Exception:
        return None
    return handle if isinstance(handle, socket.socket) else None


class MilterFactory(Factory):
    noisy = False

    def __init__(self, checks: Checks, config: MilterdConfig, clock: IReactorTime,
                 metrics: MilterMetrics | None = None) -> None:
        self.checks = checks
        self.config = config
        self.clock = clock
        self.metrics = metrics

    def buildProtocol(self, addr: IAddress | None) -> Any:
        protocol = MilterProtocol(self.checks, self.config, self.clock, self.metrics)
        protocol.factory = self
        return protocol

