# -*- test-case-name: tests.unit.test_ratelimit -*-
"""Rate limits: who a request counts against, and the decision at DATA and END-OF-MESSAGE.

Counting happens at ``protocol_state=DATA`` (one message, ``recipient_count`` recipients: the
recipients Postfix accepted, so rejected ones never count) and, for rules with byte limits, at
``END-OF-MESSAGE`` (the real ``size``). The check and the increment are one database
transaction (:func:`policyd.sql.ratelimit.rate_check`), so several policyd processes on several MX
hosts sharing one database together admit exactly the limit.

Each rule's subject is the first non-empty attribute of its ``key`` list: ``sasl_username``
(case-folded), ``sender`` (case-folded, ``+detail`` removed so that detail variants share one
count) or ``client_address`` (grouped by ``ipv4_prefix``/``ipv6_prefix``, /64 for IPv6 by
default). Addresses also look up per-domain (``@domain``) and per-mailbox overrides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

from sqlalchemy import Engine
from twisted.logger import Logger

from mailplugins.addresses import AddressError, parse_address
from mailplugins.clients import client_network
from mailplugins.config.policy_state import RateLimitConfig, RateRule
from mailplugins.threads import RunInPool
from mailplugins.ttlcache import TTLCache
from policyd.codec import PolicyRequest
from policyd.pooled import Clock, PooledCheck, fallback
from policyd.sql.ratelimit import RateDecision, RateKey, rate_check

log = Logger(namespace="policyd.ratelimit")

T = TypeVar("T")



@lru_cache(maxsize=65536)
def address_subject(text: str, delimiters: str) -> tuple[str, tuple[str, ...]] | None:
    """The case-folded ``local@domain`` without ``+detail``, and its override subjects."""
    try:
        address = parse_address(text)
    except AddressError:
        lowered = text.strip().lower()
        return (lowered, ()) if lowered else None
    base, _detail = address.split_detail(delimiters)
    return base.key, (f"@{base.domain}", base.key)


def subject_for(
    rule: RateRule, request: PolicyRequest, delimiters: str
) -> tuple[str, tuple[str, ...]] | None:
    """The subject ``request`` counts against under ``rule``, or None (rule does not apply)."""
    login = request.get("sasl_username")
    if rule.clients == "authenticated" and not login:
        return None
    if rule.clients == "unauthenticated" and login:
        return None
    for attribute in rule.key:
        value = request.get(attribute).strip()
        if not value:
            continue
        if attribute == "client_address":
            network = client_network(value, rule.ipv4_prefix, rule.ipv6_prefix)
            if network is not None:
                return network, ()
            continue
        if attribute == "sasl_username" and "@" not in value:
            return value.casefold(), ()
        found = address_subject(value, delimiters)
        if found is not None:
            return found
    return None


#: Longest subject stored as is (the column holds 320 characters); longer ones are hashed.
MAX_SUBJECT = 255


def _bounded(subject: str) -> str:
    if len(subject) <= MAX_SUBJECT:
        return subject
    return "sha256:" + hashlib.sha256(subject.encode("utf-8", "replace")).hexdigest()


def rate_keys(config: RateLimitConfig, request: PolicyRequest, delimiters: str) -> list[RateKey]:
    keys = []
    for rule in config.rules:
        found = subject_for(rule, request, delimiters)
        if found is not None:
            subject, overrides = found
            bounded = _bounded(subject)
            keys.append(RateKey(rule.name, bounded, rule.windows,
                                overrides if bounded == subject else ()))
    return keys


def _count(request: PolicyRequest, name: str) -> int:
    try:
        return max(0, int(request.get(name) or 0))
    except ValueError:
        return 0


@dataclass
class RateLimitStats:
    admitted: int = 0
    refused: int = 0
    failed: int = 0


class RateLimiter(PooledCheck):
    """Decides DATA and END-OF-MESSAGE requests; never fails, always within ``timeout``."""

    def __init__(
        self,
        config: RateLimitConfig,
        engine: Engine,
        run: RunInPool,
        clock: Clock,
        *,
        delimiters: str = "+",
        max_pending: int = 1000,
        saturated_size: int = 100_000,
    ) -> None:
        super().__init__(run, clock, max_pending)
        self.config = config
        self._engine = engine
        self.delimiters = delimiters
        self.stats = RateLimitStats()
        #: (rule, subject) -> epoch second until which every message is refused anyway
        #: (see RateDecision.saturated_until): a sender hammering past its limit costs no
        #: database work until its window moves. Bounded; oldest entries go first.
        self._saturated: TTLCache[tuple[str, str], None] = TTLCache(saturated_size)
        #: Called with ("admitted" | "refused" | "failed") for metrics.
        self.observe: Callable[[str], None] = lambda outcome: None

    async def at_data(self, request: PolicyRequest) -> str | None:
        """Count one message and its accepted recipients; None when within every limit."""
        keys = rate_keys(self.config, request, self.delimiters)
        if not keys:
            return None
        now = self._clock.seconds()
        for key in keys:
            if self._saturated.entry((key.rule, key.subject), now) is not None:
                self._outcome("refused")
                return self.config.action
        recipients = max(_count(request, "recipient_count"), 1)
        return await self._decide(keys, messages=1, recipients=recipients, size=0)

    async def at_end_of_message(self, request: PolicyRequest) -> str | None:
        """Count the message's real size against byte limits."""
        keys = [
            key for key in rate_keys(self.config, request, self.delimiters)
            if self._rule(key.rule).counts_bytes or key.override_subjects
        ]
        size = _count(request, "size")
        if not keys or not size:
            return None
        return await self._decide(keys, messages=0, recipients=0, size=size)

    def _rule(self, name: str) -> RateRule:
        return next(rule for rule in self.config.rules if rule.name == name)

    async def _decide(
        self, keys: list[RateKey], *, messages: int, recipients: int, size: int
    ) -> str | None:
        config = self.config
        if self.overloaded:
            # The database is not keeping up: answer at once instead of queueing without end.
            self._outcome("failed")
            return fallback(config.fallback_action)
        try:
            work = self.submit(config.timeout, rate_check, self._engine, keys, self._clock.seconds(),
                               messages=messages, recipients=recipients, size=size)
            decision: RateDecision = await work
        except Exception as exc:
            log.warn("rate limit check failed ({error}); answering {action}",
                     error=type(exc).__name__, action=config.fallback_action)
            self._outcome("failed")
            return fallback(config.fallback_action)
        if decision.admitted:
            self._outcome("admitted")
            return None
        self._outcome("refused")
        if decision.saturated_until and decision.rule is not None:
            subject = next(k.subject for k in keys if k.rule == decision.rule)
            self._saturated.put((decision.rule, subject), None, expires=decision.saturated_until)
        window = decision.window
        log.info("rate limit {rule} exceeded (window {period}s)", rule=decision.rule,
                 period=window.period if window else 0)
        return config.action

    def _outcome(self, outcome: str) -> None:
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        self.observe(outcome)
