# -*- test-case-name: tests.unit.test_spf -*-
"""policyd's SPF (RFC 7208) check for unauthenticated mail, in a worker thread pool.

The evaluation itself is :func:`mailplugins.spf.spf_lookup` (shared with milterd); it blocks, so
each check runs in a dedicated pool, bounded by the configured ``timeout``, never on the reactor.
The result is computed once per message (Postfix's ``instance``) by the caller and recorded with
``PREPEND Received-SPF: ...``.

Decisions: ``fail`` (and ``softfail`` when ``reject: softfail``) answer ``reject_action``
(``550 5.7.23`` by default, the RFC 7372 code); ``temperror`` answers ``temperror_action`` when
``temperror: defer``, else nothing; everything else (pass, neutral, none, permerror) only
records the header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.logger import Logger

from mailplugins.config.policy_state import SPFConfig
from mailplugins.spf import SPFResult, clean, spf_lookup, use_nameservers
from mailplugins.threads import RunInPool
from policyd.codec import PolicyRequest
from policyd.pooled import Clock, PooledCheck

__all__ = ["SPFChecker", "SPFOutcome", "SPFResult", "spf_lookup", "use_nameservers"]

log = Logger(namespace="policyd.spf")



@dataclass(frozen=True)
class SPFOutcome:
    result: str
    #: The reply for this message's recipients (reject or defer), or None.
    action: str | None
    #: ``Received-SPF: ...`` to prepend once, or None.
    header: str | None


class SPFChecker(PooledCheck):
    def __init__(self, config: SPFConfig, run: RunInPool, clock: Clock,
                 *, max_pending: int = 1000) -> None:
        super().__init__(run, clock, max_pending)
        use_nameservers(config.nameservers)
        self.config = config
        #: Called with the result for metrics.
        self.observe: Callable[[str], None] = lambda result: None

    async def check(self, request: PolicyRequest, timeout: float | None = None) -> SPFOutcome:
        """Never fails: a lookup that breaks or runs late counts as ``temperror``."""
        config = self.config
        limit = config.timeout if timeout is None else min(config.timeout, timeout)
        client = request.get("client_address")
        sender = request.get("sender")
        helo = request.get("helo_name")
        if self.overloaded:
            found = SPFResult("temperror", f"TempError ({config.receiver}: SPF check overloaded) "
                                           f"client-ip={clean(client)}")
        else:
            try:
                work = self.submit(limit + 0.2, spf_lookup, client, sender, helo, config.receiver,
                                   max(limit, 0.05))
                found = await work
            except Exception as exc:
                log.warn("SPF check failed ({error})", error=type(exc).__name__)
                found = SPFResult("temperror", f"TempError ({config.receiver}: SPF check timed "
                                               f"out) client-ip={clean(client)}")
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
