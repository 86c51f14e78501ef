# -*- test-case-name: tests.unit.test_milterd_session -*-
"""One milter connection's messages: direction, headers, body streaming, and what to answer.

No sockets here: :class:`MilterSession` takes decoded commands and gives the reply bytes (at
once, or through a Deferred that never fails); the database, DNS and crypto sit behind the
injected :class:`~milterd.checks.Checks`, time behind an injected clock.

Direction. A message is *outgoing* when the client authenticated (``{auth_authen}``, sent
with MAIL), when the client address is in ``milterd.mynetworks``, or when it came through
``non_smtpd_milters`` (``sendmail``/pickup: Postfix's cleanup writes the envelope sender
without the angle brackets smtpd always uses); everything else is *incoming*.

Outgoing. At end of headers: the one ``From:`` address must be one the login may use (the rule
policyd applies to the envelope, :mod:`mailplugins.senders`), else ``550 5.7.1`` (or accepted
unsigned with ``unowned_from: accept-unsigned``); the ``From:`` domain's active keys are looked
up; no key, or a message without exactly one ``From:`` address with a domain, is accepted
unsigned (``a``: Postfix then sends this milter nothing more of it). The body is hashed as it
streams by; at end of message the ``DKIM-Signature`` headers are inserted at the very top. A
database or signing failure, or the budget running out, is a tempfail: mail is retried rather
than sent unsigned.

Incoming. SPF starts at MAIL (in a pool, while the message is still arriving); the body feeds
the DKIM verifier; at end of message DKIM keys are looked up, DMARC is evaluated for the
``From:`` domain, every ``Authentication-Results`` claiming our authserv-id is deleted (it
came from outside) and ours is inserted at the top. A DMARC failure under ``p=reject`` is
answered ``550 5.7.1`` (``milterd.dmarc.reject_action`` may downgrade it), under
``p=quarantine`` it is marked ``dis=quarantine`` for deliver to file into Junk. The ``From:``
cases are ``milterd.dmarc``'s (RFC 9989): no ``From:``, several, or one without a usable
domain is ``permerror``, one naming several domains is exempt (``none``); milterd rejects a
message with several ``From:`` header fields (RFC 5322 allows one, and a second ``From:`` is the
classic way around ``p=reject``) and accepts the others. A failure in the checks never loses
mail: forged headers are still deleted and the message is accepted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplugins.clients import client_in
from mailplugins.config.milterd import MilterdConfig
from mailplugins.metrics import DaemonMetrics, LabelCache
from milterd import codec, fromheader
from milterd.checks import Checks, DkimLike, DmarcLike, SignerLike, SpfLike, VerifierLike

log = Logger(namespace="milterd.session")

OUTGOING = "outgoing"
INCOMING = "incoming"
AR_NAME = "Authentication-Results"

Reply = bytes | Deferred[bytes] | None


def milter_address(text: str) -> str:
    """An address as milter macros give it (``[192.0.2.1]``, ``IPv6:2001:db8::1``) made plain."""
    return text.strip("[]").removeprefix("IPv6:")


@dataclass(frozen=True)
class _Spf:
    """An SPF outcome made here (the check failed or was not run)."""

    result: str


class MilterMetrics:
    """``mailplugins_milterd_*``; no label carries an address or a domain.

    Each labelled one is a :class:`~mailplugins.metrics.LabelCache` (``dkim[result].inc()``,
    ``dmarc[result, disposition].inc()``): about five updates per incoming message, with label
    values from small fixed sets (directions, outcomes, results, stages).
    """

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.messages = LabelCache(metrics.counter(
            "messages_total", "Messages handled, by direction and outcome.", ["direction", "outcome"]
        ))
        self.duration = LabelCache(metrics.histogram(
            "message_duration_seconds", "Time from end of message to our answer.", ["direction"]
        ))
        self.signatures = metrics.counter("signatures_total", "DKIM signatures added.")
        self.dkim = LabelCache(metrics.counter(
            "dkim_results_total", "DKIM signatures verified, by result.", ["result"]
        ))
        self.spf = LabelCache(metrics.counter(
            "spf_results_total", "SPF results of incoming mail.", ["result"]
        ))
        self.dmarc = LabelCache(metrics.counter(
            "dmarc_results_total", "DMARC results of incoming mail.", ["result", "disposition"]
        ))
        self.failures = LabelCache(metrics.counter(
            "failures_total", "Checks that failed or ran out of time, by stage.", ["stage"]
        ))

    def outcome(self, direction: str, outcome: str) -> None:
        self.messages[direction, outcome].inc()


def normalise_value(value: str) -> str:
    """Postfix hands folded lines over with a bare LF between them; DKIM needs CRLF."""
    if "\n" not in value:
        return value
    return value.replace("\r\n", "\n").replace("\n", "\r\n")


def from_domains(headers: Sequence[tuple[str, str]]) -> tuple[int, list[str], list[str]]:
    """(number of From: fields, addresses of the first one, their domains; "" when none)."""
    values = [value for name, value in headers if name.lower() == "from"]
    if not values:
        return 0, [], []
    pairs = fromheader.addresses(values[0])
    addresses = [address for _name, address in pairs if address]
    domains = []
    for address in addresses:
        _local, at, domain = address.rpartition("@")
        domains.append(domain.strip().rstrip(".").lower() if at and domain.strip() else "")
    return len(values), addresses, domains


@dataclass
class _Message:
    direction: str = INCOMING
    sender: str = ""
    login: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    header_bytes: int = 0
    overflow: bool = False
    #: 1-based indexes of Authentication-Results fields claiming our authserv-id.
    forged: list[int] = field(default_factory=list)
    ar_count: int = 0
    signer: SignerLike | None = None
    verifier: VerifierLike | None = None
    spf: Deferred[SpfLike] | None = None
    #: Set once the message is decided (accepted unsigned or rejected at end of headers).
    done: bool = False


class MilterSession:
    """The milter conversation of one connection (possibly several messages)."""

    def __init__(
        self,
        checks: Checks,
        config: MilterdConfig,
        clock: IReactorTime,
        metrics: MilterMetrics | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._checks = checks
        self.config = config
        self._clock = clock
        self._metrics = metrics
        self._timer = timer
        self.negotiated = False
        self.client_address = ""
        self.client_name = ""
        self.helo = ""
        self._macros: dict[str, str] = {}
        self.message = _Message()
        #: Protocol flags to ask for on top of codec.PROTOCOL (codec.NO_REPLY on unix sockets).
        self.extra_protocol = 0
        #: Names of the commands Postfix was told not to wait for (their reply is dropped).
        self.silent: frozenset[str] = frozenset()

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, command: codec.Command) -> Reply:
        """The reply to ``command`` (None for commands Postfix expects no reply to)."""
        if isinstance(command, codec.Macros):
            if command.stage == "C":
                self._macros.clear()
            self._macros.update(command.values)
            return None
        if isinstance(command, codec.Body):
            return self._body(command.chunk)
        if isinstance(command, codec.Header):
            return self._header(command.name, command.value)
        if isinstance(command, codec.OptNeg):
            answer = codec.negotiate(command, protocol=codec.PROTOCOL | self.extra_protocol)
            self.negotiated = True  # (NegotiationError: the protocol closes)
            self.silent = frozenset(name for name, flag in codec.NO_REPLY_FLAGS.items()
                                    if answer.protocol & flag)
            return codec.encode_optneg(answer)
        if isinstance(command, codec.Connect):
            self.client_name = command.hostname
            self.client_address = command.address if command.family in ("4", "6") else ""
            return codec.CONTINUE
        if isinstance(command, codec.Helo):
            self.helo = command.name
            return codec.CONTINUE
        if isinstance(command, codec.Mail):
            return self._mail(command.sender)
        if isinstance(command, codec.EndOfHeaders):
            return self._end_of_headers()
        if isinstance(command, codec.EndOfMessage):
            if command.chunk:
                self._body(command.chunk)
            return self._end_of_message()
        if isinstance(command, codec.Abort):
            self._reset()
            self._forget_message_macros()
            return None
        # RCPT, DATA, unknown SMTP commands: nothing to decide.
        return codec.CONTINUE

    def _reset(self) -> None:
        spf = self.message.spf
        if spf is not None and not spf.called:
            spf.cancel()
        self.message = _Message()

    def close(self) -> None:
        """The connection is gone: stop what runs for a message nobody will answer."""
        self._reset()

    def _forget_message_macros(self) -> None:
        """Macros of one message (Postfix sends them again with the next MAIL)."""
        for name in ("{auth_authen}", "{auth_type}", "{auth_author}", "i", "{mail_addr}"):
            self._macros.pop(name, None)

    # -- MAIL --------------------------------------------------------------------------------

    def _mail(self, sender: str) -> bytes:
        self._reset()
        message = self.message
        non_smtpd = not sender.startswith("<")
        message.sender = sender.strip().removeprefix("<").removesuffix(">")
        message.login = self._macros.get("{auth_authen}", "")
        trusted = client_in(milter_address(self.client_address), self.config.mynetworks)
        if message.login or non_smtpd or trusted:
            message.direction = OUTGOING
        else:
            message.direction = INCOMING
            message.spf = self._start_spf(message.sender)
        return codec.CONTINUE

    def _start_spf(self, sender: str) -> Deferred[SpfLike]:
        try:
            started = self._checks.spf(self.client_address, self.helo, sender)
        except Exception:
            log.failure("SPF check could not start")
            started = succeed(_Spf("temperror"))

        def failed(failure: Failure) -> SpfLike:
            if not failure.check(CancelledError):
                log.warn("SPF check failed: {error}", error=failure.getErrorMessage())
            return _Spf("temperror")

        started.addErrback(failed)
        return started

    # -- headers and body --------------------------------------------------------------------

    def _header(self, name: str, value: str) -> bytes:
        message = self.message
        if name.lower() == AR_NAME.lower():
            message.ar_count += 1
            if len(message.forged) < self.config.max_headers and self._checks.claims_our_id(value):
                # Bounded like the headers kept: any left over sit below Postfix's Received:,
                # where deliver never looks (deliver/junk.py).
                message.forged.append(message.ar_count)
        if message.overflow or message.done:
            return codec.CONTINUE
        size = len(name) + len(value) + 3
        if (len(message.headers) >= self.config.max_headers
                or message.header_bytes + size > self.config.max_header_bytes):
            message.overflow = True
            message.headers.clear()
            return codec.CONTINUE
        message.header_bytes += size
        message.headers.append((name, normalise_value(value)))
        return codec.CONTINUE

    def _body(self, chunk: bytes) -> bytes:
        message = self.message
        if message.done:
            return codec.CONTINUE
        if message.signer is not None:
            message.signer.feed(chunk)
        elif message.verifier is not None:
            message.verifier.feed(chunk)
        return codec.CONTINUE

    # -- end of headers ----------------------------------------------------------------------

    def _end_of_headers(self) -> Reply:
        message = self.message
        if message.direction == OUTGOING:
            return self._guard(self._outgoing_headers(message), message, "headers")
        if not message.overflow:
            try:
                message.verifier = self._checks.verifier(message.headers)
            except Exception:
                log.failure("DKIM verifier could not start")
                self._fail("verifier")
        return codec.CONTINUE

    async def _outgoing_headers(self, message: _Message) -> bytes:
        if message.overflow:
            message.done = True
            self._count(OUTGOING, "rejected")
            return codec.reply_code("552", "5.3.4 Message header too large to sign")
        count, addresses, domains = from_domains(message.headers)
        if count != 1 or len(addresses) != 1 or not domains[0]:
            log.info("outgoing message without exactly one From: address with a domain: not signed")
            return self._accept_unsigned(message, "no_from")
        address, domain = addresses[0], domains[0]
        if message.login and not await self._checks.may_send_as(message.login, address):
            if self.config.unowned_from == "reject":
                log.info("login {login} may not send as From: {address}: rejected",
                         login=message.login, address=address)
                message.done = True
                self._count(OUTGOING, "rejected")
                return codec.reply_code(
                    "550", f"5.7.1 Sender address in From: is not owned by user {message.login}"
                )
            log.info("login {login} may not send as From: {address}: not signed",
                     login=message.login, address=address)
            return self._accept_unsigned(message, "unowned_from")
        signer = await self._checks.signer(domain, message.headers)
        if signer is None:
            return self._accept_unsigned(message, "no_key")
        message.signer = signer
        return codec.CONTINUE

    def _accept_unsigned(self, message: _Message, outcome: str) -> bytes:
        message.done = True
        self._count(OUTGOING, outcome)
        return codec.ACCEPT

    # -- end of message ----------------------------------------------------------------------

    def _end_of_message(self) -> Reply:
        message = self.message
        self.message = _Message(direction=message.direction)  # the next message starts clean
        self._forget_message_macros()
        if message.done:
            return codec.CONTINUE
        started = self._timer()
        if message.direction == OUTGOING:
            if message.signer is None:
                return codec.CONTINUE
            result = self._guard(self._sign(message), message, "sign")
        else:
            result = self._guard(self._check(message), message, "check")

        def timed(reply: bytes) -> bytes:
            if self._metrics is not None:
                self._metrics.duration[message.direction].observe(
                    self._timer() - started)
            return reply

        return result.addCallback(timed)

    async def _sign(self, message: _Message) -> bytes:
        assert message.signer is not None
        signatures = await self._checks.sign(message.signer)
        self._count(OUTGOING, "signed")
        if self._metrics is not None:
            self._metrics.signatures.inc(len(signatures))
        # Each insert at 0 goes on top: the last inserted ends up first.
        return b"".join(
            codec.insert_header(0, "DKIM-Signature", value) for value in reversed(signatures)
        ) + codec.CONTINUE

    async def _check(self, message: _Message) -> bytes:
        removals = self._removals(message)
        if message.overflow:
            self._count(INCOMING, "unchecked")
            return removals + codec.CONTINUE
        verifier = message.verifier
        dkim: list[DkimLike] = []
        if verifier is not None:
            dkim = await self._checks.verify(verifier)
        spf: SpfLike = await message.spf if message.spf is not None else _Spf("none")
        from_values = [value for name, value in message.headers if name.lower() == "from"]
        spf_domain = message.sender.rpartition("@")[2].lower() if "@" in message.sender else ""
        verdict = await self._checks.dmarc(from_values, dkim, spf, spf_domain)
        disposition = self._disposition(verdict)
        if len(from_values) > 1:
            disposition = "reject"
        self._record(dkim, spf, verdict, disposition)
        if disposition == "reject":
            self._count(INCOMING, "rejected")
            if len(from_values) > 1:
                return codec.reply_code("550", "5.7.1 Message has several From: header fields")
            return codec.reply_code("550", f"5.7.1 {self.config.dmarc.reject_text}")
        value = self._checks.authentication_results(dkim, spf, verdict, disposition,
                                                    mailfrom=message.sender, helo=self.helo)
        self._count(INCOMING, "quarantined" if disposition == "quarantine" else "accepted")
        return removals + codec.insert_header(0, AR_NAME, value) + codec.CONTINUE

    def _disposition(self, verdict: DmarcLike) -> str:
        """What we do: the domain's wish, downgraded as ``milterd.dmarc`` says."""
        if verdict.result != "fail":
            return "none"
        if verdict.disposition == "reject":
            return self.config.dmarc.reject_action
        if verdict.disposition == "quarantine":
            return self.config.dmarc.quarantine_action
        return "none"

    def _removals(self, message: _Message) -> bytes:
        # Highest index first: whether Postfix renumbers after a deletion or not, the lower
        # ones still name the same fields.
        return b"".join(codec.change_header(index, AR_NAME, "") for index in reversed(message.forged))

    # -- failure handling --------------------------------------------------------------------

    def _guard(self, work: Any, message: _Message, stage: str) -> Deferred[bytes]:
        """Run a coroutine within the budget; a failure becomes the direction's safe answer."""
        result: Deferred[bytes] = Deferred.fromCoroutine(work)
        if not result.called:  # (answered at once from the caches: no timer to set and cancel)
            result.addTimeout(self.config.budget, self._clock)

        def failed(failure: Failure) -> bytes:
            message.done = True
            if failure.check(TimeoutError, CancelledError):
                log.warn("{direction} message: {stage} took longer than {budget}s",
                         direction=message.direction, stage=stage, budget=self.config.budget)
            else:
                log.failure("{direction} message: {stage} failed", failure,
                            direction=message.direction, stage=stage)
            self._fail(stage)
            if message.spf is not None and not message.spf.called:
                message.spf.cancel()
            if message.direction == OUTGOING:
                self._count(OUTGOING, "tempfail")
                return codec.reply_code("451", "4.7.0 Cannot sign the message now, try again later")
            self._count(INCOMING, "unchecked")
            return self._removals(message) + codec.CONTINUE

        return result.addErrback(failed)

    def _fail(self, stage: str) -> None:
        if self._metrics is not None:
            self._metrics.failures[stage].inc()

    def _count(self, direction: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.outcome(direction, outcome)

    def _record(self, dkim: Sequence[DkimLike], spf: SpfLike, verdict: DmarcLike,
                disposition: str) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        for result in dkim:
            metrics.dkim[result.result].inc()
        metrics.spf[spf.result].inc()
        metrics.dmarc[verdict.result, disposition].inc()
