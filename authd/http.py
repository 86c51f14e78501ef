# -*- test-case-name: tests.unit.test_authd_http -*-
"""``POST /verify`` for Dovecot's Lua passdb (authd/lua/mailplugins-auth.lua).

Form fields ``user``, ``password``, ``service``, ``rip``, ``secured``; the status says it all:
200 good, 403 bad password (or service not allowed), 404 unknown user, 423 disabled, 503 backend
trouble (Dovecot answers the client with a temporary failure). The body is never needed.

Twisted Web answers ``Expect: 100-continue`` on HTTP/1.1 by itself (``HTTPChannel``
``_send100Continue``), which matters: Dovecot's HTTP client waits 2 s for it otherwise. The
end-to-end test checks this against the real Dovecot Lua client.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from authd.sasl_codec import Outcome
from authd.verify import Verdict, Verifier, VerifyRequest

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
        verify = VerifyRequest(
            user=user,
            password=password,
            service=service,
            remote_ip=_field(request, "rip") or None,
            mechanism="http",
            secured=(_field(request, "secured") or "").lower() in ("1", "yes", "true", "tls", "secured"),
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


class VerifySite(Site):
    requestFactory = LimitedRequest

    def __init__(self, verifier: Verifier, failure_delay: float, max_body: int) -> None:
        root = Resource()
        verify: Any = VerifyResource(verifier, failure_delay)
        root.putChild(b"verify", verify)
        # Dovecot's HTTP client keeps idle connections only briefly; do not hold ours for hours.
        super().__init__(root, timeout=IDLE_TIMEOUT)
        self.max_body = max_body
        self.displayTracebacks = False
        self.noisy = False

    def log(self, request: Any) -> None:
        """No access log: the verify endpoint is called for every login."""
