# -*- test-case-name: tests.unit.test_spf -*-
"""SPF (RFC 7208) for unauthenticated mail, through pyspf in a worker thread pool.

pyspf resolves with dnspython, which blocks; so each check runs in a dedicated pool, bounded by
pyspf's total query time (``querytime``, our ``timeout``), never on the reactor. The identity is
the MAIL FROM address, or ``postmaster@<HELO name>`` for the null sender (pyspf's HELO
identity). The result is computed once per message (Postfix's ``instance``) by the caller and
recorded with ``PREPEND Received-SPF: ...``.

Decisions: ``fail`` (and ``softfail`` when ``reject: softfail``) answer ``reject_action``
(``550 5.7.23`` by default, the RFC 7372 code); ``temperror`` answers ``temperror_action`` when
``temperror: defer``, else nothing; everything else (pass, neutral, none, permerror) only
records the header.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailplugins.config.policy_state import SPFConfig
from policyd.codec import PolicyRequest
from policyd.ratelimit import Clock, Pending

try:  # an optional dependency: pip install 'mailplugins[spf]' (pyspf, dnspython)
    import dns.nameserver
    import dns.resolver
    import spf as pyspf
except ImportError:  # pragma: no cover - the config refuses policyd.spf without it
    pyspf = None

log = Logger(namespace="policyd.spf")

Runner = Callable[..., "Deferred[Any]"]

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\U0010ffff]")
MAX_HEADER = 900


@dataclass(frozen=True)
class SPFResult:
    """One check: the RFC 7208 result and the ``Received-SPF`` header value (no name)."""

    result: str
    header: str


def spf_lookup(client: str, sender: str, helo: str, receiver: str, timeout: float) -> SPFResult:
    """Blocking: evaluate SPF for ``client`` (runs in the SPF pool)."""
    if pyspf is None:  # pragma: no cover
        return SPFResult("temperror", f"TempError ({receiver}: pyspf is not installed)")
    try:
        query = pyspf.query(i=client, s=sender, h=helo, receiver=receiver,
                            timeout=timeout, querytime=timeout)
        result, _code, _explanation = query.check()
        header = query.get_header(result)
    except Exception as exc:  # pyspf raises on odd input (e.g. a bad client address)
        return SPFResult("permerror", f"PermError ({receiver}: {type(exc).__name__}) "
                                      f"client-ip={client}; identity=mailfrom")
    result = str(result).lower()
    if result not in RESULTS:
        result = "permerror"
    return SPFResult(result, _clean(str(header)))


def _clean(text: str) -> str:
    """One printable line of bounded length (DNS data ends up in the header)."""
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= MAX_HEADER else text[: MAX_HEADER - 3] + "..."


@dataclass(frozen=True)
class SPFOutcome:
    result: str
    #: The reply for this message's recipients (reject or defer), or None.
    action: str | None
    #: ``Received-SPF: ...`` to prepend once, or None.
    header: str | None


_custom_resolver = False


def use_nameservers(servers: tuple[tuple[str, int], ...]) -> None:
    """Point dnspython's default resolver, which pyspf asks, at ``servers`` (empty: back to
    resolv.conf). Process-wide, which is fine: SPF is policyd's only DNS user."""
    global _custom_resolver
    if pyspf is None:  # pragma: no cover
        return
    if servers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
        dns.resolver.default_resolver = resolver
        _custom_resolver = True
    elif _custom_resolver:
        dns.resolver.reset_default_resolver()
        _custom_resolver = False


class SPFChecker:
    def __init__(self, config: SPFConfig, run: Runner, clock: Clock,
                 *, max_pending: int = 1000) -> None:
        use_nameservers(config.nameservers)
        self.config = config
        self._run = run
        self._clock = clock
        self.max_pending = max_pending
        self.pending = Pending()
        #: Called with the result for metrics.
        self.observe: Callable[[str], None] = lambda result: None

    async def check(self, request: PolicyRequest, timeout: float | None = None) -> SPFOutcome:
        """Never fails: a lookup that breaks or runs late counts as ``temperror``."""
        config = self.config
        limit = config.timeout if timeout is None else min(config.timeout, timeout)
        client = request.get("client_address")
        sender = request.get("sender")
        helo = request.get("helo_name")
        if self.pending.count >= self.max_pending:
            found = SPFResult("temperror", f"TempError ({config.receiver}: SPF check overloaded) "
                                           f"client-ip={_clean(client)}")
        else:
            try:
                work = self._run(self.pending.track(spf_lookup), client, sender, helo,
                                 config.receiver, max(limit, 0.05))
                work.addTimeout(limit + 0.2, cast(IReactorTime, self._clock))
                found = await work
            except Exception as exc:
                log.warn("SPF check failed ({error})", error=type(exc).__name__)
                found = SPFResult("temperror", f"TempError ({config.receiver}: SPF check timed "
                                               f"out) client-ip={_clean(client)}")
        self.observe(found.result)
        return SPFOutcome(found.result, self._action(found.result),
                          f"Received-SPF: {found.header}" if config.header else None)

    def _action(self, result: str) -> str | None:
        config = self.config
        if result == "fail" and config.reject in ("fail", "softfail"):
            return config.reject_action
        if result == "softfail" and config.reject == "softfail":
            return config.reject_action
        if result == "temperror" and config.temperror == "defer":
            return config.temperror_action
        return None
