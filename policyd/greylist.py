# -*- test-case-name: tests.unit.test_greylist -*-
"""Greylisting with postgrey's semantics, on state shared through the database.

The triplet is ``client network / normalised sender / recipient``, lower-cased and stored as
its SHA-256 (as postgrey's ``--privacy``): /24 for IPv4 and /64 for IPv6 by default; the
sender loses its BATV tag (``prvs=``) and ``+extension``, and digit runs become ``#`` so that
VERP senders of one list share a triplet. A triplet is deferred until ``delay`` seconds after
it was first seen; a first retry later than ``retry_window`` starts over. Clients that passed
``auto_whitelist_passes`` times (at most one pass counted per hour) skip greylisting.

Never greylisted: authenticated clients, mynetworks, whitelisted client networks or verified
host name suffixes, whitelisted recipients, and (optionally) mail whose SPF check passed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from email.utils import formatdate
from functools import lru_cache

from sqlalchemy import Engine
from twisted.logger import Logger

from mailplugins.clients import client_in, client_network
from mailplugins.config.policy_state import GreylistConfig
from mailplugins.threads import RunInPool
from mailplugins.ttlcache import TTLCache
from policyd.codec import PolicyRequest
from policyd.pooled import Clock, PooledCheck, fallback
from policyd.sql.greylist import GreylistResult, GreylistTiming, greylist_check

log = Logger(namespace="policyd.greylist")


#: BATV: ``prvs=KDDDSSSSSS=user@`` (RFC draft order) and ``prvs=user=KDDDSSSSSS@`` (older).
_BATV_TAG_FIRST = re.compile(r"^prvs=\d{4}[0-9a-f]{6}=", re.IGNORECASE)
_BATV_TAG_LAST = re.compile(r"^prvs=(.*)=\d{4}[0-9a-f]{6}@", re.IGNORECASE)
_DIGITS = re.compile(r"\b\d+\b")
#: Seconds a passed triplet or a whitelisted client is answered from memory.
REMEMBER_PASSED = 3600


@lru_cache(maxsize=65536)
def normalise_sender(sender: str, delimiters: str = "+") -> str:
    """postgrey's sender normalisation: lower case, BATV removed, extension stripped,
    numbers replaced by ``#``."""
    text = sender.strip().lower()
    text = _BATV_TAG_FIRST.sub("", text)
    text = _BATV_TAG_LAST.sub(r"\1@", text)
    local, at, domain = text.rpartition("@")
    if at and delimiters:
        cut = min((i for i in (local.find(c) for c in delimiters) if i > 0), default=-1)
        if cut > 0:
            local = local[:cut]
        text = f"{local}@{domain}"
    return _DIGITS.sub("#", text)


def triplet_key(
    client: str, sender: str, recipient: str, config: GreylistConfig, delimiters: str = "+"
) -> str | None:
    """The SHA-256 of ``net/sender/recipient``; None for a client address that does not parse."""
    network = client_network(client, config.ipv4_prefix, config.ipv6_prefix)
    if network is None:
        return None
    text = f"{network}/{normalise_sender(sender, delimiters)}/{recipient.strip().lower()}"
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


def exact_client(client: str) -> str | None:
    """The client address for the auto-whitelist (IPv4-mapped IPv6 as IPv4)."""
    network = client_network(client, 32, 128)
    return network.split("/", 1)[0] if network is not None else None


def whitelisted(request: PolicyRequest, config: GreylistConfig) -> bool:
    """Client network, verified client host name suffix, or recipient domain/address."""
    if client_in(request.get("client_address"), config.whitelist_networks):
        return True
    name = request.get("client_name").lower().rstrip(".")
    if name and name != "unknown":
        for suffix in config.whitelist_hostnames:
            if name == suffix.lstrip(".") or name.endswith("." + suffix.lstrip(".")):
                return True
    recipient = request.get("recipient").strip().lower()
    if recipient and config.whitelist_recipients:
        local, _at, domain = recipient.rpartition("@")
        for entry in config.whitelist_recipients:
            if entry in (recipient, domain) or entry == f"{local}@":
                return True
    return False


def greylist_header(config: GreylistConfig, seconds: int, now: float) -> str:
    """``X-Greylist: delayed N seconds by ... at HOST; DATE`` from the configured template."""
    values = {"t": str(seconds), "h": config.hostname, "d": _date(int(now))}
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), "%"), config.header)


_PLACEHOLDER = re.compile(r"%([thd%])")


@lru_cache(maxsize=4)
def _date(second: int) -> str:
    """The header's date, formatted once a second (formatdate took a few µs per first pass)."""
    return formatdate(second, localtime=False)


class Greylister(PooledCheck):
    """Decides one RCPT request; never fails, always within the configured ``timeout``."""

    def __init__(
        self,
        config: GreylistConfig,
        engine: Engine,
        run: RunInPool,
        clock: Clock,
        *,
        delimiters: str = "+",
        max_pending: int = 1000,
        cache_size: int = 100_000,
    ) -> None:
        super().__init__(run, clock, max_pending)
        self.config = config
        self._engine = engine
        self.delimiters = delimiters
        #: Decisions the database need not be asked again about, with their end of validity:
        #: a triplet still inside its delay (greylisted until first seen + delay, which every
        #: MX agrees on), a passed triplet and an auto-whitelisted client (for
        #: ``REMEMBER_PASSED`` seconds, then the database is asked again, which also refreshes
        #: their expiry). Bounded: the oldest entries go first.
        self._known: TTLCache[str, str] = TTLCache(cache_size)
        #: Called with the outcome ("greylisted", "passed", "whitelisted", "skipped", "failed").
        self.observe: Callable[[str], None] = lambda outcome: None

    @property
    def timing(self) -> GreylistTiming:
        c = self.config
        return GreylistTiming(c.delay, c.retry_window, c.expiry, c.auto_whitelist_passes)

    async def check(
        self, request: PolicyRequest, timeout: float | None = None
    ) -> tuple[str | None, str | None]:
        """``(action, header)``: the deferral action or None, and the X-Greylist header to
        prepend on a triplet's first pass (else None)."""
        config = self.config
        if whitelisted(request, config):
            self.observe("skipped")
            return None, None
        key = triplet_key(request.get("client_address"), request.get("sender"),
                          request.get("recipient"), config, self.delimiters)
        client = exact_client(request.get("client_address"))
        if key is None or client is None:
            self.observe("skipped")
            return None, None
        now = self._clock.seconds()
        for known_key in (f"c:{client}", key):
            known = self._known.entry(known_key, now)
            if known is not None:
                until, status = known
                self.observe(status)
                if status == "greylisted":
                    return config.action.replace("%s", str(int(until - now))), None
                return None, None
        if self.overloaded:
            self.observe("failed")
            return fallback(config.fallback_action), None
        try:
            limit = config.timeout if timeout is None else min(config.timeout, timeout)
            work = self.submit(limit, greylist_check, self._engine, key, client, now, self.timing)
            result: GreylistResult = await work
        except Exception as exc:
            log.warn("greylist check failed ({error}); answering {action}",
                     error=type(exc).__name__, action=config.fallback_action)
            self.observe("failed")
            return fallback(config.fallback_action), None
        self.observe(result.status)
        if result.status == "greylisted":
            self._remember(key, now + result.seconds, "greylisted")
            return config.action.replace("%s", str(result.seconds)), None
        if result.status == "whitelisted":
            self._remember(f"c:{client}", now + REMEMBER_PASSED, "whitelisted")
        else:
            self._remember(key, now + REMEMBER_PASSED, "passed")
        if result.first_pass:
            return None, greylist_header(config, result.seconds, now)
        return None, None


    def _remember(self, key: str, until: float, status: str) -> None:
        self._known.put(key, status, expires=until)

    def forget(self) -> None:
        """Drop remembered decisions (reload: the timing may have changed)."""
        self._known.clear()
