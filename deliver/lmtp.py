# -*- test-case-name: tests.unit.test_deliver_lmtp -*-
"""The LMTP server protocol: framing and sequencing only; decisions live in the service.

One command is handled at a time. While a command waits for a Deferred (a recipient lookup, a
spool write, the delivery), further pipelined input stays unread (the transport is paused as
soon as any arrives), so replies always go out in command order however slow the lookups are.
After the final ``.`` every accepted recipient gets its own reply, in RCPT order.

Why not ``twisted.mail.smtp.ESMTP``: it ignores ESMTP parameters, replies out of order under
pipelining with asynchronous validation, feeds every DATA line to one message object per
recipient and crashes on UNIX sockets in EHLO (see docs/deliver.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from deliver.envelope import Envelope, Recipient
from deliver.lmtp_codec import (
    BODY_TYPES,
    XFORWARD_ATTRIBUTES,
    Command,
    CommandError,
    DataDecoder,
    LineTooLong,
    Reply,
    decode_xtext,
    parse_command,
    split_line,
)
from deliver.service import DeliveryService
from deliver.spool import Spool
from mailplugins.deadline import Deadline
from mailplugins.writethrough import write_now

log = Logger(namespace="deliver.lmtp")

#: RCPTs per transaction (Postfix sends at most lmtp_destination_recipient_limit = 50).
MAX_RECIPIENTS = 1000
#: Commands rejected in one session before the connection is closed.
MAX_ERRORS = 50

OK = Reply(250, "2.0.0", "OK")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing")
#: RFC 6531 3.4: a UTF-8 address in a transaction whose MAIL did not say SMTPUTF8.
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "UTF-8 in an address needs MAIL FROM:<...> SMTPUTF8")


class LMTPServer(Protocol):
    def __init__(self, service: DeliveryService, clock: IReactorTime) -> None:
        self.service = service
        self.clock: Any = clock  # IReactorTime; zope methods do not type-check as attributes
        self._buffer = bytearray()
        self._busy = False
        self._paused = False
        self._processing = False
        self._closed = False
        self._discarding = False
        self._errors = 0
        self._timer = Deadline(self._timed_out)
        self._helo: str | None = None
        #: XFORWARD attributes for the next transaction (Postfix sends them after LHLO).
        self._xforward: dict[str, str] = {}
        self._envelope: Envelope | None = None
        self._decoder: DataDecoder | None = None
        self._spool: Spool | None = None
        self._too_big = False
        self._data_started = 0.0
        self._progress = 0
        self._progress_since = 0.0

    # -- connection --------------------------------------------------------------------

    @property
    def _transport(self) -> Any:
        return self.transport

    @property
    def settings(self) -> Any:
        return self.service.settings

    def connectionMade(self) -> None:
        self._send(Reply(220, "", f"{self.settings.hostname} LMTP mailplugins deliver ready"))
        self._reset_timer()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        self._cancel_timer()
        if self._spool is not None:
            self._spool.discard()
            self._spool = None

    def _send(self, *replies: Reply) -> None:
        if not self._closed and self._transport is not None:
            # At once when nothing is queued (mailplugins.writethrough): the client is waiting
            # for this reply, and Twisted's next-turn write costs two epoll_ctl calls and a turn.
            write_now(self._transport, b"".join(r.encode() for r in replies))

    def _close(self) -> None:
        self._closed = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.loseConnection()

    # -- timeouts ----------------------------------------------------------------------
    #
    # The timer runs from each reply to the next complete command line; bytes that do not
    # complete a line do not reset it (a client sending one byte a second is cut off after
    # idle_timeout like an idle one). In DATA it is reset while input averages at least
    # min_data_rate bytes/s since the last reset.

    def _cancel_timer(self) -> None:
        self._timer.stop()

    def _reset_timer(self) -> None:
        if self._closed or self._busy:
            return
        self._timer.start(self.clock, self.settings.idle_timeout, restart=True)

    def _timed_out(self) -> None:
        host = self.settings.hostname
        if self._decoder is not None or self._buffer or self._discarding:
            log.info("LMTP client too slow: no complete command or too little DATA in {timeout}s",
                     timeout=self.settings.idle_timeout)
            self._send(Reply(421, "4.4.2", f"{host} Timeout: client too slow, closing connection"))
        else:
            self._send(Reply(421, "4.4.2", f"{host} Idle timeout, closing connection"))
        self._close()

    def _data_progress(self, count: int) -> None:
        self._progress += count
        now = self.clock.seconds()
        if self._progress >= self.settings.min_data_rate * (now - self._progress_since):
            self._progress = 0
            self._progress_since = now
            self._reset_timer()

    # -- input -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._decoder is not None:
            self._data_progress(len(data))
        if self._decoder is not None and not self._busy and not self._buffer:
            self._guarded_data_chunk(data)  # the common case in DATA: no copy through the buffer
            if self._busy or self._decoder is not None:
                return
        else:
            self._buffer += data
            if self._busy:
                self._pause()  # input while a command waits: keep the rest of it unread
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not self._busy and not self._closed and self._buffer:
                if self._decoder is not None:
                    chunk = bytes(self._buffer)
                    self._buffer.clear()
                    self._guarded_data_chunk(chunk)
                    continue
                if self._discarding:
                    index = self._buffer.find(b"\n")
                    if index < 0:
                        self._buffer.clear()
                        return
                    del self._buffer[: index + 1]
                    self._discarding = False
                    continue
                try:
                    line = split_line(self._buffer, self.settings.max_line_length)
                except LineTooLong as exc:
                    self._discarding = not exc.complete
                    self._reject(Reply(500, "5.5.2", "Line too long"))
                    continue
                if line is None:
                    return
                self._line(line)
                self._reset_timer()  # a complete command: the client gets a fresh period
        finally:
            self._processing = False

    def _wait(
        self,
        d: Deferred[Any],
        handler: Callable[[Any], None],
        fallback: Callable[[], list[Reply]] | None = None,
    ) -> None:
        """Stop reading until ``d`` fires; ``handler`` sends the reply, then input resumes.

        An unexpected failure is logged and answered with ``fallback()`` (default: one 451).
        """
        self._busy = True
        self._cancel_timer()

        def done(result: Any) -> None:
            try:
                if isinstance(result, Failure):
                    log.failure("internal error", result)
                    self._send(*(fallback() if fallback else [LOCAL_ERROR]))
                else:
                    handler(result)
            except Exception:
                log.failure("internal error")
                self._send(*(fallback() if fallback else [LOCAL_ERROR]))
            self._busy = False
            if self._paused and not self._closed and self._transport is not None:
                self._paused = False
                self._transport.resumeProducing()
            self._reset_timer()
            self._process()

        d.addBoth(done)
        if self._busy and self._buffer:
            self._pause()

    def _pause(self) -> None:
        """Stop reading until the command in progress is answered.

        Only once input is waiting (pipelined commands, DATA faster than the disk): a client
        that waits for each reply, the common case, costs no pause and resume, which are two
        ``epoll_ctl`` calls per command.
        """
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pauseProducing()

    def _reject(self, reply: Reply) -> None:
        self._send(reply)
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._send(Reply(421, "4.7.0", "Too many errors, closing connection"))
            self._close()

    # -- commands ----------------------------------------------------------------------

    def _line(self, line: bytes) -> None:
        try:
            command = parse_command(line)
        except CommandError as exc:
            self._reject(exc.reply)
            return
        handler = getattr(self, f"do_{command.verb}")
        try:
            handler(command)
        except CommandError as exc:
            self._reject(exc.reply)
        except Exception:
            log.failure("internal error in {verb}", verb=command.verb)
            self._envelope = None
            self._send(LOCAL_ERROR)

    def do_LHLO(self, command: Command) -> None:
        if not command.argument:
            # No enhanced code yet: ENHANCEDSTATUSCODES holds after a successful LHLO (as Dovecot).
            raise CommandError(Reply(501, "", "Syntax: LHLO hostname"))
        self._helo = command.argument
        self._envelope = None
        self._xforward = {}
        capabilities = [
            self.settings.hostname,
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "SMTPUTF8",
            f"SIZE {self.settings.max_message_size}",
            "XFORWARD " + " ".join(XFORWARD_ATTRIBUTES),
        ]
        if self.settings.advertise_dsn:
            capabilities.append("DSN")
        self._send(Reply(250, "", "PIPELINING", lines=tuple(capabilities)))

    def do_HELO(self, command: Command) -> None:
        raise CommandError(Reply(500, "5.5.1", "This is an LMTP server: use LHLO"))

    do_EHLO = do_HELO

    def do_XFORWARD(self, command: Command) -> None:
        """Postfix's XFORWARD (``lmtp_send_xforward_command = yes``): IDENT is its queue ID,
        which lets a redelivery after a lost reply be recognised (see DeliveryService)."""
        if self._helo is None:
            raise CommandError(Reply(503, "5.5.1", "Send LHLO first"))
        if self._envelope is not None:
            raise CommandError(Reply(503, "5.5.1", "Error: MAIL transaction in progress"))
        values = {}
        for key, value in command.params.items():
            try:
                values[key] = decode_xtext(value)
            except ValueError:
                raise CommandError(Reply(501, "5.5.4", f"Bad XFORWARD attribute value for {key}")) from None
        self._xforward.update(values)
        self._send(Reply(250, "2.0.0", "Ok"))

    def do_MAIL(self, command: Command) -> None:
        if self._helo is None:
            raise CommandError(Reply(503, "5.5.1", "Send LHLO first"))
        if self._envelope is not None:
            raise CommandError(Reply(503, "5.5.1", "Nested MAIL command"))
        size: int | None = None
        smtputf8 = "SMTPUTF8" in command.params
        if not smtputf8 and not command.path.isascii():
            raise CommandError(NEEDS_SMTPUTF8)
        for key, value in command.params.items():
            if key == "SIZE":
                if not value.isdigit() or len(value) > 20:
                    raise CommandError(Reply(501, "5.5.4", "Invalid SIZE parameter"))
                size = int(value)
                if size > self.settings.max_message_size:
                    raise CommandError(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))
            elif key == "BODY":
                if value.upper() not in BODY_TYPES:
                    raise CommandError(Reply(555, "5.5.4", f"Unsupported BODY type {value[:20]}"))
            elif key == "SMTPUTF8":
                if value:
                    raise CommandError(Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
            elif key in ("RET", "ENVID") and self.settings.advertise_dsn:
                pass  # DSN is Postfix's job (lmtp_assume_final = yes); accepted, not used
            else:
                raise CommandError(Reply(555, "5.5.4", f"Unsupported parameter {key[:40]}"))
        ident = self._xforward.get("IDENT")
        peer = self._transport.getPeer() if self._transport is not None else None
        client_ip = getattr(peer, "host", None)
        if ident in (None, "[UNAVAILABLE]", "[TEMPUNAVAIL]"):
            ident = None
        else:
            # Queue IDs are unique per Postfix host: several MX hosts may hand us mail.
            ident = f"{client_ip or 'local'}/{ident}"
        self._envelope = Envelope(self._helo, command.path, size, ident=ident, smtputf8=smtputf8,
                                  client_ip=client_ip, timestamp=self.clock.seconds())
        self._send(Reply(250, "2.1.0", f"<{command.path}> Sender OK"))

    def do_RCPT(self, command: Command) -> None:
        envelope = self._envelope
        if envelope is None:
            raise CommandError(Reply(503, "5.5.1", "Send MAIL first"))
        if len(envelope.recipients) >= MAX_RECIPIENTS:
            raise CommandError(Reply(452, "4.5.3", "Too many recipients"))
        if not envelope.smtputf8 and not command.path.isascii():
            raise CommandError(NEEDS_SMTPUTF8)
        original: str | None = None
        for key, value in command.params.items():
            if key in ("ORCPT", "NOTIFY") and not self.settings.advertise_dsn:
                # RFC 5321 4.1.1.11: parameters of an extension not advertised are refused.
                raise CommandError(Reply(555, "5.5.4", f"Unsupported parameter {key} (no DSN)"))
            if key == "NOTIFY":
                words = value.upper().split(",")
                if words != ["NEVER"] and not set(words) <= {"SUCCESS", "FAILURE", "DELAY"}:
                    raise CommandError(Reply(501, "5.5.4", "Invalid NOTIFY parameter"))
            elif key == "ORCPT":
                kind, sep, text = value.partition(";")
                if not sep or not kind:
                    raise CommandError(Reply(501, "5.5.4", "Invalid ORCPT parameter"))
                try:
                    decoded = decode_xtext(text)
                except ValueError:
                    raise CommandError(Reply(501, "5.5.4", "Invalid ORCPT parameter")) from None
                if kind.lower() in ("rfc822", "utf-8"):
                    original = decoded
            else:
                raise CommandError(Reply(555, "5.5.4", f"Unsupported parameter {key[:40]}"))
        if not command.path:
            raise CommandError(Reply(501, "5.1.3", "Empty recipient address"))
        d = self.service.check_recipient(command.path, original, envelope.declared_size)

        def checked(result: Recipient | Reply) -> None:
            if isinstance(result, Reply):
                self._send(result)
            elif self._envelope is envelope:
                envelope.recipients.append(result)
                self._send(Reply(250, "2.1.5", f"<{command.path}> OK"))

        self._wait(d, checked)

    def do_DATA(self, command: Command) -> None:
        if self._envelope is None:
            raise CommandError(Reply(503, "5.5.1", "Send MAIL first"))
        if not self._envelope.recipients:
            raise CommandError(Reply(503, "5.5.1", "No valid recipients"))
        self._decoder = DataDecoder()
        self._spool = self.service.new_spool(self._envelope)
        self._too_big = False
        self._data_started = time.monotonic()
        self._progress = 0
        self._progress_since = self.clock.seconds()
        self._send(Reply(354, "", "Start mail input; end with <CRLF>.<CRLF>"))

    def do_RSET(self, command: Command) -> None:
        self._envelope = None
        self._xforward = {}
        self._send(OK)

    def do_NOOP(self, command: Command) -> None:
        self._send(OK)

    def do_VRFY(self, command: Command) -> None:
        self._send(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    def do_HELP(self, command: Command) -> None:
        self._send(Reply(214, "2.0.0", "Commands: LHLO MAIL RCPT DATA RSET NOOP QUIT VRFY"))

    def do_QUIT(self, command: Command) -> None:
        self._send(Reply(221, "2.0.0", f"{self.settings.hostname} Bye"))
        self._close()

    # -- DATA --------------------------------------------------------------------------

    def _guarded_data_chunk(self, chunk: bytes) -> None:
        """A bug while streaming must not leave a half-read message: say so and hang up."""
        try:
            self._data_chunk(chunk)
        except Exception:
            log.failure("internal error during DATA")
            self._decoder = None
            if self._spool is not None:
                self._spool.discard()
                self._spool = None
            self._send(Reply(421, "4.3.0", "Local error in processing, closing connection"))
            self._close()

    def _data_chunk(self, chunk: bytes) -> None:
        decoder = self._decoder
        spool = self._spool
        assert decoder is not None and spool is not None
        output = decoder.feed(chunk)
        pending: Deferred[None] | None = None
        if output and not self._too_big:
            if decoder.size > self.settings.max_message_size:
                self._too_big = True
                spool.discard()
            else:
                pending = spool.add(output)
        if decoder.done:
            self._buffer[:0] = decoder.leftover
            self._decoder = None
            self._end_of_data(decoder)
        elif pending is not None:
            self._wait(pending, lambda _: None)

    def _end_of_data(self, decoder: DataDecoder) -> None:
        envelope = self._envelope
        spool = self._spool
        assert envelope is not None and spool is not None
        self._spool = None
        self._envelope = None
        self._xforward = {}  # XFORWARD holds for one transaction
        self.service.metrics.duration["data"].observe(time.monotonic() - self._data_started)
        if self._too_big:
            self._send(*self.service.too_big(envelope))
            return
        d: Deferred[Any] = spool.finish(decoder.size, decoder.bare_newlines)

        def spooled(body: Any) -> Deferred[list[Reply]]:
            return self.service.deliver(envelope, body)

        def spool_failed(failure: Failure) -> list[Reply]:
            return self.service.spool_failed(envelope, failure.value or Exception())

        d.addCallbacks(spooled, spool_failed)

        def replies(result: list[Reply]) -> None:
            self._send(*result)

        self._wait(d, replies, lambda: [LOCAL_ERROR] * len(envelope.recipients))


class LMTPFactory(Factory):
    noisy = False

    def __init__(self, service: DeliveryService, clock: IReactorTime) -> None:
        self.service = service
        self.clock = clock

    def buildProtocol(self, addr: Any) -> LMTPServer:
        protocol = LMTPServer(self.service, self.clock)
        protocol.factory = self
        return protocol
