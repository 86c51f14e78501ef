# -*- test-case-name: tests.unit.test_authd_http -*-
"""authd's HTTP listener for Dovecot's Lua passdb and userdb (authd/lua/mailplugins-auth.lua).

``POST /verify``: form fields ``user``, ``password``, ``service``, ``rip``, ``secured`` and, from
a master passdb (Dovecot's ``login_user``), ``authzid``: the mailbox a master user logs in as.
The status says it all: 200 good, 403 bad password (or service not allowed), 404 unknown user, 423 disabled,
503 backend trouble (Dovecot answers the client with a temporary failure). The body is never
needed.

``POST /userdb`` (fields ``user``, ``dovecot`` = ``2.3`` or ``2.4``): 200 with one
``field=value`` line per userdb field (the dict userdb's answer, in that release's names), 404
for an unknown or disabled user, 503 when the database does not answer. ``POST /users``: 200
with every enabled mailbox's login, one per line. These replace the dict userdb on Dovecot 2.4,
which has no dict driver. The same limits apply to all three (body size, request deadline).

Twisted Web answers ``Expect: 100-continue`` on HTTP/1.1 by itself (``HTTPChannel``
``_send100Continue``), which matters: Dovecot's HTTP client waits 2 s for it otherwise. The
end-to-end test checks this against the real Dovecot Lua client.

Twisted's idle timeout restarts on every read, so alone it never ends a peer that trickles a
request one byte a second. :class:`VerifyChannel` adds a deadline per request: from its first
byte to the end of its body it must take at most ``line_timeout`` (Dovecot writes a request
whole), else the peer gets ``408 Request Timeout`` and the connection is closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, HTTPFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from authd.dict import DictBackend
from authd.logins import Verdict, VerifyRequest
from authd.sasl_codec import Outcome
from authd.verify import Verifier
from mailplugins.deadline import Deadline

log = Logger(namespace="authd.http")

STATUS = {
    Outcome.OK: 200,
    Outcome.FAIL: 403,
    Outcome.UNKNOWN: 404,
    Outcome.DISABLED: 423,
    Outcome.TEMPFAIL: 503,
}
MAX_FIELD = 1024
IDLE_TIMEOUT = 120
#: Default seconds from a request's first byte to the end of its body (authd.line_timeout).
REQUEST_DEADLINE = 5.0
#: What a peer too slow to send its request gets before the close.
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
)


class LimitedRequest(Request):
    """A Request whose body may not exceed the site's ``max_body`` (memory stays bounded)."""

    _received = 0
    _refused = False

    def _too_big(self) -> None:
        if not self._refused:
            self._refused = True
            log.warn("verify request body too large: dropping the connection")
            channel: Any = self.channel
            channel.transport.abortConnection()

    def _max_body(self) -> int:
        channel: Any = self.channel
        return int(channel.site.max_body)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._max_body():
            self._too_big()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._max_body():
            self._too_big()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """A refused request is never processed, even if the parser reaches its end."""
        if self._refused:
            return
        super().requestReceived(command, path, version)


def _field(request: Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode("ascii"))
    if not values:
        return None
    raw: bytes = values[0]
    if len(raw) > MAX_FIELD:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class VerifyChannel(HTTPChannel):
    """An HTTPChannel that times each request from its first byte to the end of its body.

    Time spent answering is not counted (the verifier has its own ``request_timeout``), nor is
    the wait between requests (Twisted's idle timeout covers that).
    """

    site: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = Deadline(self._too_slow)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._time_request()

    def allContentReceived(self) -> None:
        self._deadline.stop()  # complete: from here on it is ours to answer
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        self._time_request()  # a pipelined request may have started behind the answered one

    def _receiving(self) -> bool:
        """A request has started (a byte of it is buffered or parsed) but is not complete."""
        if self._handlingRequest or self.transport is None or self.transport.disconnecting:
            return False
        return bool(self._buffer) or bool(self.requests)

    def _time_request(self) -> None:
        if not self._receiving():
            self._deadline.stop()
        else:
            self._deadline.start(self, self.site.line_timeout)  # the channel's (site's) callLater

    def _too_slow(self) -> None:
        transport: Any = self.transport
        log.warn("verify request from {peer} not complete {seconds}s after its first byte: closing",
                 peer=transport.getPeer(), seconds=self.site.line_timeout)
        transport.write(REQUEST_TIMEOUT_RESPONSE)
        # As Twisted's own timeout does: a peer that does not read either is reset later.
        self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._deadline.stop()
        super().connectionLost(reason)


class VerifyResource(Resource):
    isLeaf = True

    def __init__(self, verifier: Verifier, failure_delay: float) -> None:
        super().__init__()
        self.verifier = verifier
        self.failure_delay = failure_delay

    def render_POST(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        user = _field(request, "user")
        password = _field(request, "password")
        service = _field(request, "service") or "imap"
        if not user or password is None:
            request.setResponseCode(400)
            return b"user and password are required\n"
        if (request.args or {}).get(b"service") and (
            _field(request, "service") is None or not service.isprintable()
        ):
            # Not "imap" by default: a service decides which flags apply.
            request.setResponseCode(400)
            return b"invalid service\n"
        verify = VerifyRequest(
            user=user,
            password=password,
            service=service,
            remote_ip=_field(request, "rip") or None,
            mechanism="http",
            secured=(_field(request, "secured") or "").lower() in ("1", "yes", "true", "tls", "secured"),
            authzid=_field(request, "authzid") or "",
        )
        finished = [False]

        def gone(_: object) -> None:
            finished[0] = True

        request.notifyFinish().addBoth(gone)

        def answer(verdict: Verdict) -> None:
            if finished[0]:
                return
            request.setResponseCode(STATUS[verdict.outcome])
            request.write(verdict.outcome.value.encode("ascii") + b"\n")
            request.finish()

        self.verifier.verify(verify, self.failure_delay).addCallback(answer)
        return NOT_DONE_YET

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"Allow", b"POST")
        return b"use POST\n"


class LookupResource(Resource):
    """``POST /userdb`` and ``POST /users``: the Lua userdb's lookups, run in the DB pool."""

    isLeaf = True

    def __init__(self, kind: str, backend: DictBackend, db_run: Callable[..., Deferred[Any]],
                 timeout: float, clock: IReactorTime) -> None:
        super().__init__()
        self.kind = kind
        self.backend = backend
        self.db_run = db_run
        self.timeout = timeout
        self.clock = clock

    def render_POST(self, request: Request) -> bytes | int:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        release = _field(request, "dovecot") or "2.4"
        if release not in ("2.3", "2.4"):
            request.setResponseCode(400)
            return b"dovecot must be 2.3 or 2.4\n"
        work: Deferred[Any]
        if self.kind == "userdb":
            user = _field(request, "user")
            if not user:
                request.setResponseCode(400)
                return b"user is required\n"
            work = self.db_run(self.backend.userdb, user, release)
        else:
            work = self.db_run(self.backend.users)
        work.addTimeout(self.timeout, self.clock)
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))

        def reply(code: int, body: bytes) -> None:
            if finished[0]:
                return
            request.setResponseCode(code)
            request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
            request.write(body)
            request.finish()

        def answer(found: Any) -> None:
            if found is None:
                reply(404, b"unknown\n")
                return
            body = _lines(found)
            if body is None:
                log.warn("{kind} lookup: a value holds a line break; answering tempfail", kind=self.kind)
                reply(503, b"unsafe value\n")
            else:
                reply(200, body)

        def failed(failure: Failure) -> None:
            log.warn("{kind} lookup failed: {error}", kind=self.kind,
                     error=failure.type.__name__ if failure.type else "error")
            reply(503, b"tempfail\n")

        work.addCallbacks(answer, failed)
        return NOT_DONE_YET

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"Allow", b"POST")
        return b"use POST\n"


def _lines(found: dict[str, Any] | list[str]) -> bytes | None:
    """``field=value`` lines (a dict) or one item per line (a list); None if a value has a newline."""
    items = ([f"{key}={value}" for key, value in found.items()] if isinstance(found, dict)
             else list(found))
    if any("\n" in item or "\r" in item or "\0" in item for item in items):
        return None
    return "".join(item + "\n" for item in items).encode("utf-8")


def _verify_channel(factory: HTTPFactory) -> Any:
    """The site's protocol factory (HTTP/1.1 only: no h2 negotiation wrapper needed)."""
    return VerifyChannel()


class VerifySite(Site):
    requestFactory = LimitedRequest
    protocol = _verify_channel

    def __init__(
        self,
        verifier: Verifier,
        failure_delay: float,
        max_body: int,
        *,
        line_timeout: float = REQUEST_DEADLINE,
        reactor: IReactorTime | None = None,
        backend: DictBackend | None = None,
        db_run: Callable[..., Deferred[Any]] | None = None,
        db_timeout: float = 10.0,
    ) -> None:
        root = Resource()
        verify: Any = VerifyResource(verifier, failure_delay)
        root.putChild(b"verify", verify)
        if backend is not None and db_run is not None:
            clock: Any = reactor
            if clock is None:
                from twisted.internet import reactor as clock
            for kind, path in (("userdb", b"userdb"), ("users", b"users")):
                lookup: Any = LookupResource(kind, backend, db_run, db_timeout, clock)
                root.putChild(path, lookup)
        # Dovecot's HTTP client keeps idle connections only briefly; do not hold ours for hours.
        super().__init__(root, timeout=IDLE_TIMEOUT, reactor=reactor)
        self.max_body = max_body
        self.line_timeout = line_timeout
        self.displayTracebacks = False
        self.noisy = False

    def log(self, request: Any) -> None:
        """No access log: the verify endpoint is called for every login."""
