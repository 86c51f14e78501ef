# -*- test-case-name: tests.unit.test_authd_sasl_codec -*-
"""Dovecot's auth-client protocol, server side, with no transport: bytes in, actions out.

This is the socket Postfix's ``smtpd_sasl_type = dovecot`` talks to. The byte-level facts (the
handshake order Postfix insists on, what it sends, how it reacts to each reply) are recorded in
shared/reference/dovecot-auth.md; the behaviour on bad input copies Dovecot's
``auth-client-connection.c`` and ``auth-request-handler.c``: a client that breaks the protocol
(unknown command, duplicate id, unknown mechanism, over-long line) is disconnected, never answered
with guesses. A request that is malformed but whose id is known (empty ``service=``, a byte that
is not UTF-8 in a parameter, a ``CONT`` while the request is being verified, one request more than
the pending limit) is answered ``FAIL`` and the connection stays: Postfix keeps one connection per
smtpd process, and dropping it would turn every later login on it into a 454.

Both generations of Dovecot's auth clients are understood: 2.3 (``VERSION 1 2``, ``service=``)
and 2.4 (``VERSION 1 3``, ``protocol=`` instead of ``service=``, ``final-resp-ok``,
``secured=tls``), as Dovecot 2.4's own server does (``auth-request-fields.c``).

:class:`AuthServerSession` holds one connection's state. The Twisted protocol feeds it bytes and
carries out what it returns: :class:`Send` a line, :class:`Verify` credentials (the answer comes
back through :meth:`AuthServerSession.verified`), or :class:`Drop` the connection.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from enum import Enum

#: Mechanisms offered, in handshake order. Both need the plain password (hashed storage).
MECHANISMS = ("PLAIN", "LOGIN")
#: The version we announce: 1.2 (as Dovecot 2.3).
VERSION = (1, 2)
DEFAULT_MAX_LINE = 16384

_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n", "\0": "\x010"}
_UNESCAPES = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "0": "\0"}


def tab_escape(value: str) -> str:
    """Dovecot's ``str_tabescape``: makes a value safe inside a TAB-separated line."""
    if not any(c in value for c in _ESCAPES):
        return value
    return "".join(_ESCAPES.get(c, c) for c in value)


def tab_unescape(value: str) -> str:
    """Dovecot's ``str_tabunescape``; an unknown escape keeps the following character."""
    if "\x01" not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\x01" and i + 1 < len(value):
            out.append(_UNESCAPES.get(value[i + 1], value[i + 1]))
            i += 2
        elif c == "\x01":
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def handshake(spid: int, cuid: int, cookie: str) -> bytes:
    """The server's greeting, in the order Postfix requires (MECH before SPID, DONE last)."""
    lines = [f"VERSION\t{VERSION[0]}\t{VERSION[1]}"]
    lines += [f"MECH\t{mech}\tplaintext" for mech in MECHANISMS]
    lines += [f"SPID\t{spid}", f"CUID\t{cuid}", f"COOKIE\t{cookie}", "DONE"]
    return "".join(line + "\n" for line in lines).encode("ascii")


class ProtocolError(Exception):
    """The client broke the protocol; the connection must be dropped. Text is safe to log."""


# -- line framing ------------------------------------------------------------------------------


class LineBuffer:
    """``\\n``-terminated lines with a length limit, for any split of the input.

    An over-long line raises ProtocolError as soon as the limit is passed, so a client can never
    make us buffer more than ``max_line`` bytes.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        lines = self._buffer.split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if len(line) > self.max_line:
                raise ProtocolError("line too long")
        if len(self._buffer) > self.max_line:
            raise ProtocolError("line too long")
        return lines

    @property
    def pending(self) -> bool:
        """True while a line has started but its ``\\n`` has not arrived."""
        return bool(self._buffer)


# -- mechanisms (pure state machines) -------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What a mechanism extracted: the login, its password and the requested authorisation id."""

    authcid: str
    password: str = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True)
class Challenge:
    data: bytes


@dataclass(frozen=True)
class MechFailure:
    """The exchange cannot succeed; ``reason`` is shown to the SMTP client (never says why)."""

    reason: str
    code: str | None = None


MechResult = Credentials | Challenge | MechFailure

_INVALID_INPUT = MechFailure("Invalid input")


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class PlainMechanism:
    """RFC 4616: ``authzid NUL authcid NUL password``, exactly two NULs (as Dovecot's mech-plain)."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> MechResult:
        if initial is None:
            return Challenge(b"")
        return self.step(initial)

    def step(self, data: bytes) -> MechResult:
        parts = data.split(b"\0")
        if len(parts) != 3:
            return _INVALID_INPUT
        texts = [_text(p) for p in parts]
        authzid, authcid, password = texts
        if authzid is None or authcid is None or password is None or not authcid:
            return _INVALID_INPUT
        return Credentials(authcid, password, authzid)


class LoginMechanism:
    """The obsolete but ubiquitous LOGIN: ``Username:`` then ``Password:`` prompts."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> MechResult:
        if not initial:
            return Challenge(b"Username:")
        return self.step(initial)

    def step(self, data: bytes) -> MechResult:
        text = _text(data)
        if text is None or "\0" in text:
            return _INVALID_INPUT
        if self._username is None:
            if not text:
                return _INVALID_INPUT
            self._username = text
            return Challenge(b"Password:")
        return Credentials(self._username, text)


Mechanism = PlainMechanism | LoginMechanism


def new_mechanism(name: str) -> Mechanism | None:
    upper = name.upper()
    if upper == "PLAIN":
        return PlainMechanism()
    if upper == "LOGIN":
        return LoginMechanism()
    return None


def decode_base64(text: str) -> bytes | None:
    """Strict base64 (Postfix already refuses other characters); None if invalid."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# -- actions the session asks the transport to carry out ----------------------------------


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class Verify:
    """Check ``credentials``; answer with :meth:`AuthServerSession.verified` (``request_id``)."""

    request_id: int
    mechanism: str
    credentials: Credentials
    service: str
    remote_ip: str | None
    secured: bool
    #: Which request of that id this is: an id may be reused once its request failed (CONT
    #: while verifying, CANCEL), and the old verification's answer must not answer the new one.
    serial: int = 0


@dataclass(frozen=True)
class Drop:
    """Close the connection: the client broke the protocol, or (``temporary``) the backend
    failed and closing is the only way to make Postfix answer 454 rather than 535."""

    reason: str
    temporary: bool = False


Action = Send | Verify | Drop


class Outcome(Enum):
    OK = "ok"
    #: Wrong password or service not allowed.
    FAIL = "fail"
    #: No such login. SASL answers it exactly like FAIL; only Dovecot's Lua passdb is told.
    UNKNOWN = "unknown"
    DISABLED = "disabled"
    #: Backend trouble: the only way to make Postfix answer 4xx is closing the connection.
    TEMPFAIL = "tempfail"


@dataclass
class _Request:
    id: int
    mechanism: Mechanism
    service: str
    remote_ip: str | None
    secured: bool
    #: When the request started waiting for a CONT (None while being verified).
    waiting_since: float | None
    login: str | None = None
    serial: int = 0


def _line(*fields: str) -> Send:
    return Send(("\t".join(fields) + "\n").encode("utf-8"))


class AuthServerSession:
    """One auth-client connection: handshake state, in-flight requests, limits."""

    def __init__(
        self,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_requests: int = 32,
        continue_timeout: float = 150.0,
    ) -> None:
        self._lines = LineBuffer(max_line)
        self.max_requests = max_requests
        self.continue_timeout = continue_timeout
        self.client_minor: int | None = None
        self.client_pid: int | None = None
        self.requests: dict[int, _Request] = {}
        self._serial = 0
        self.closed = False

    @property
    def pending(self) -> bool:
        """True while a line has started but is not complete (the transport times it)."""
        return not self.closed and self._lines.pending

    # -- input -------------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Action]:
        """Bytes from the client -> actions; after a Drop nothing more is processed."""
        if self.closed:
            return []
        actions: list[Action] = []
        try:
            for raw in self._lines.feed(data):
                actions.extend(self._line(raw, now))
        except ProtocolError as exc:
            self.closed = True
            actions.append(Drop(str(exc)))
        return actions

    def _line(self, raw: bytes, now: float) -> list[Action]:
        if b"\0" in raw:
            # Dovecot reads lines as C strings: a NUL would silently cut a field there.
            raise ProtocolError("NUL byte in line")
        # Bytes that are not UTF-8 survive as lone surrogates: the framing is intact, so only the
        # field holding them is judged (an unknown command or mechanism still drops, a bad
        # service= fails its request, an unused parameter is ignored), as Dovecot does.
        line = raw.decode("utf-8", "surrogateescape")
        if line.endswith("\r"):
            line = line[:-1]
        fields = line.split("\t")
        command = fields[0]
        if self.client_minor is None:
            if command != "VERSION":
                raise ProtocolError(f"expected VERSION first, got {_printable(command)!r}")
            return self._version(fields)
        if command == "CPID":
            return self._cpid(fields)
        if self.client_pid is None:
            raise ProtocolError("client did not send CPID before requests")
        if command == "AUTH":
            return self._auth(fields, now)
        if command == "CONT":
            return self._cont(fields, now)
        if command == "CANCEL":
            request_id = _request_id(fields)
            self.requests.pop(request_id, None)
            return []
        raise ProtocolError(f"unknown command {_printable(command)!r}")

    def _version(self, fields: list[str]) -> list[Action]:
        if len(fields) < 3 or not _is_number(fields[1]) or not _is_number(fields[2]):
            raise ProtocolError("malformed VERSION")
        if int(fields[1]) != VERSION[0]:
            raise ProtocolError(f"incompatible client version {_printable(fields[1], 10)}")
        self.client_minor = int(fields[2])
        return []

    def _cpid(self, fields: list[str]) -> list[Action]:
        if len(fields) != 2 or not _is_number(fields[1]) or self.client_pid is not None:
            raise ProtocolError("malformed or repeated CPID")
        self.client_pid = int(fields[1])
        return []

    def _auth(self, fields: list[str], now: float) -> list[Action]:
        if len(fields) < 3:
            raise ProtocolError("malformed AUTH")
        request_id = _request_id(fields)
        if request_id == 0:
            raise ProtocolError("request id 0")
        if request_id in self.requests:
            raise ProtocolError(f"duplicate request id {request_id}")
        mechanism = new_mechanism(fields[2])
        if mechanism is None:
            raise ProtocolError(f"unsupported mechanism {_printable(fields[2])!r}")
        service: str | None = None
        remote_ip: str | None = None
        secured = False
        initial: str | None = None
        for index, arg in enumerate(fields[3:], start=3):
            key, eq, value = arg.partition("=")
            if key == "resp" and eq:
                if index != len(fields) - 1:
                    raise ProtocolError("parameters after resp=")
                initial = value
            elif key in ("service", "protocol"):
                # Dovecot 2.4's clients say protocol=, 2.3's and Postfix say service=; Dovecot
                # 2.4 takes either, the last one winning.
                service = tab_unescape(value)
            elif key == "rip":
                remote_ip = _valid_text(tab_unescape(value)) or None
            elif key == "secured":
                secured = True  # "secured" (2.3, Postfix) or "secured=tls" (2.4)
            # Anything else (final-resp-ok, lip, lport, session, no-penalty, cert_username...)
            # changes nothing for PLAIN and LOGIN with hashed passwords: ignored, as unknown
            # parameters are by Dovecot.
        if service is None:
            raise ProtocolError("AUTH without service= or protocol=")
        self._serial += 1
        request = _Request(request_id, mechanism, service, remote_ip, secured, None,
                           serial=self._serial)
        if len(self.requests) >= self.max_requests:
            # One request too many: that request fails, the ones in flight go on.
            return self._fail(request, MechFailure("Too many pending requests", "temp_fail"))
        if not _valid_text(service) or not service.isprintable() or len(service) > 64:
            # A service decides which flags apply: an empty one, "smtp" + a control character or
            # a byte that is not UTF-8 must not pass for an unknown service (those follow the
            # IMAP flag). The request fails; the connection is fine.
            return self._fail(request, MechFailure("Invalid service"))
        self.requests[request_id] = request
        if initial == "" and (self.client_minor or 0) < 2:
            initial = None  # old clients send an empty resp= to mean "none" (Dovecot does this)
        decoded: bytes | None = None
        if initial is not None:
            decoded = b"" if initial == "=" else decode_base64(initial)
            if decoded is None:
                return self._fail(request, MechFailure("Invalid base64 data in initial response",
                                                       "invalid_base64"))
        return self._result(request, mechanism.start(decoded), now)

    def _cont(self, fields: list[str], now: float) -> list[Action]:
        if len(fields) != 3:
            raise ProtocolError("malformed CONT")
        request_id = _request_id(fields)
        request = self.requests.get(request_id)
        if request is None:
            return [_line("FAIL", str(request_id), "reason=Authentication request timed out")]
        if request.waiting_since is None:
            # Dovecot: "Unexpected continuation" fails that request (the answer of the
            # verification still running is then thrown away); the connection stays.
            return self._fail(request, MechFailure("Unexpected continuation"))
        # "*" (a client's abort, which Postfix never forwards) is invalid base64 to Dovecot too.
        decoded = decode_base64(fields[2])
        if decoded is None:
            return self._fail(request, MechFailure("Invalid base64 data in continued response",
                                                   "invalid_base64"))
        return self._result(request, request.mechanism.step(decoded), now)

    def _result(self, request: _Request, result: MechResult, now: float) -> list[Action]:
        if isinstance(result, Challenge):
            request.waiting_since = now
            return [_line("CONT", str(request.id), base64.b64encode(result.data).decode("ascii"))]
        if isinstance(result, MechFailure):
            return self._fail(request, result)
        request.waiting_since = None
        request.login = result.authcid
        # An authzid other than the login is a master-user login: the verifier decides (the
        # user= we return is what Postfix trusts, so only a real master user gets through).
        return [
            Verify(request.id, request.mechanism.name, result, request.service,
                   request.remote_ip, request.secured, request.serial)
        ]

    def _fail(self, request: _Request, failure: MechFailure) -> list[Action]:
        self.requests.pop(request.id, None)
        fields = ["FAIL", str(request.id)]
        if request.login:
            fields.append("user=" + tab_escape(request.login))
        if failure.code:
            fields.append("code=" + failure.code)
        fields.append("reason=" + tab_escape(failure.reason))
        return [_line(*fields)]

    # -- answers from verification ---------------------------------------------------------

    def verified(
        self, request_id: int, outcome: Outcome, user: str | None = None, serial: int | None = None
    ) -> list[Action]:
        """The verification of ``request_id`` finished; ``user`` is the canonical login on OK.

        ``serial`` (from the Verify) makes sure the answer goes to the request that asked: when
        that one has failed meanwhile and its id was reused, the late answer is dropped."""
        request = self.requests.get(request_id)
        if request is None or self.closed or (serial is not None and request.serial != serial):
            return []
        del self.requests[request_id]
        if outcome is Outcome.OK:
            assert user is not None
            return [_line("OK", str(request_id), "user=" + tab_escape(user))]
        if outcome is Outcome.TEMPFAIL:
            self.closed = True
            return [Drop("temporary failure verifying credentials", temporary=True)]
        fields = ["FAIL", str(request_id)]
        if request.login:
            fields.append("user=" + tab_escape(request.login))
        if outcome is Outcome.DISABLED:
            fields.append("code=user_disabled")
        return [_line(*fields)]

    def expire(self, now: float) -> int:
        """Forget requests abandoned mid-exchange (Postfix never sends CANCEL); returns how many."""
        stale = [
            r.id for r in self.requests.values()
            if r.waiting_since is not None and now - r.waiting_since >= self.continue_timeout
        ]
        for request_id in stale:
            del self.requests[request_id]
        return len(stale)


def _valid_text(text: str) -> str | None:
    """``text`` unless it holds bytes that were not UTF-8 (decoded as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def _printable(text: str, limit: int = 20) -> str:
    """A client's field cut and cleaned for a log line."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _request_id(fields: list[str]) -> int:
    if len(fields) < 2 or not _is_number(fields[1]) or len(fields[1]) > 10:
        raise ProtocolError("malformed request id")
    value = int(fields[1])
    if value > 0xFFFFFFFF:
        raise ProtocolError("malformed request id")
    return value


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 20
