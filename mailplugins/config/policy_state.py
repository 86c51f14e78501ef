# -*- test-case-name: tests.unit.test_ratelimit -*-
"""The ``policyd.ratelimit``, ``policyd.greylist`` and ``policyd.spf`` sections.

Each section switches its check on by being present. Each check has its own ``timeout``
(seconds for its database or DNS work; it is kept below ``policyd.budget``) and its own
``fallback_action`` answered when that work fails or is late, so Postfix never waits. The
optional ``contexts`` list names the ``policy_context`` values the check runs for (``""`` is
the empty context); absent means every context.

Example::

    policyd:
      ratelimit:
        rules:
          outbound:
            key: [sasl_username, sender, client_address]
            windows:
              - {period: 1h, messages: 100, recipients: 500}
              - {period: 1d, messages: 1000, bytes: 1G}
      greylist: {delay: 5m}
      spf: {reject: fail, temperror: defer}
"""

from __future__ import annotations

import importlib.util
import math
import socket
from dataclasses import dataclass

from mailplugins.config.actions import check_action
from mailplugins.config.fields import ConfigError, Fields, IPNetwork, describe
from mailplugins.dns import parse_nameserver

#: Sub-buckets per window: a window slides in steps of a tenth of its length.
BUCKETS_PER_WINDOW = 10
RATE_KEYS = ("sasl_username", "sender", "client_address")
CLIENT_CLASSES = ("all", "authenticated", "unauthenticated")


@dataclass(frozen=True)
class Window:
    """Limits over one sliding window of ``period`` seconds; None means no limit."""

    period: int
    messages: int | None = None
    recipients: int | None = None
    bytes: int | None = None

    @property
    def step(self) -> int:
        return max(1, self.period // BUCKETS_PER_WINDOW)

    @property
    def buckets(self) -> int:
        return math.ceil(self.period / self.step)

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.messages, self.recipients, self.bytes))


@dataclass(frozen=True)
class RateRule:
    name: str
    #: Request attributes tried in order; the first non-empty one is the subject.
    key: tuple[str, ...]
    windows: tuple[Window, ...]
    clients: str = "all"
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64

    @property
    def counts_bytes(self) -> bool:
        return any(w.bytes is not None for w in self.windows)

    @property
    def longest(self) -> int:
        return max((w.period for w in self.windows), default=0)


@dataclass(frozen=True)
class RateLimitConfig:
    rules: tuple[RateRule, ...]
    action: str = "DEFER_IF_PERMIT 4.7.1 Rate limit exceeded"
    fallback_action: str = "DUNNO"
    timeout: float = 1.0
    contexts: tuple[str, ...] | None = None
    purge_interval: float = 3600.0
    #: Overrides may add windows up to this long (purge keeps their buckets that long).
    max_override_period: int = 31 * 86400


@dataclass(frozen=True)
class GreylistConfig:
    delay: int = 300
    retry_window: int = 2 * 86400
    expiry: int = 35 * 86400
    auto_whitelist_passes: int = 5
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    whitelist_networks: tuple[IPNetwork, ...] = ()
    #: Client hostname suffixes (``.example.net`` or ``mx.example.net``); verified names only.
    whitelist_hostnames: tuple[str, ...] = ()
    #: ``user@domain``, ``user@`` (any domain) or ``domain`` entries.
    whitelist_recipients: tuple[str, ...] = ()
    skip_on_spf_pass: bool = False
    action: str = "DEFER_IF_PERMIT 4.7.1 Greylisted, please try again later"
    #: ``%t`` seconds delayed, ``%h`` hostname, ``%d`` date (RFC 2822).
    header: str = "X-Greylist: delayed %t seconds by mailplugins-policyd at %h; %d"
    hostname: str = ""
    fallback_action: str = "DUNNO"
    timeout: float = 1.0
    contexts: tuple[str, ...] | None = None
    purge_interval: float = 3600.0


@dataclass(frozen=True)
class SPFConfig:
    #: ``fail`` rejects on fail, ``softfail`` on fail and softfail, ``never`` only records.
    reject: str = "fail"
    reject_action: str = "550 5.7.23 SPF validation failed"
    #: ``defer`` answers ``temperror_action`` on a DNS temperror; ``dunno`` lets mail through.
    temperror: str = "dunno"
    temperror_action: str = "451 4.4.3 SPF temporary DNS error, try again later"
    header: bool = True
    receiver: str = ""
    timeout: float = 1.5
    threads: int = 8
    contexts: tuple[str, ...] | None = None
    fallback_action: str = "DUNNO"
    #: DNS servers for the SPF lookups as (address, port); empty: the system's resolv.conf.
    nameservers: tuple[tuple[str, int], ...] = ()


def _contexts(f: Fields) -> tuple[str, ...] | None:
    if not f.has("contexts"):
        f.strings("contexts", ())
        return None
    return f.strings("contexts")


def _limit(f: Fields, key: str, size: bool = False) -> int | None:
    if not f.has(key):
        f.string(key, "")
        return None
    return f.size(key) if size else f.integer(key, minimum=0)


def _window(raw: object, path: str) -> Window:
    f = Fields(raw, path)
    period = f.duration("period", minimum=1, maximum=366 * 86400)
    window = Window(
        period=int(period),
        messages=_limit(f, "messages"),
        recipients=_limit(f, "recipients"),
        bytes=_limit(f, "bytes", size=True),
    )
    f.done()
    if not window.limited:
        raise ConfigError(path, "a window needs messages, recipients or bytes")
    return window


def _rule(name: str, f: Fields) -> RateRule:
    if not name or len(name) > 64 or any(c.isspace() for c in name):
        raise ConfigError(f.where, "a rule name must be a word of at most 64 characters")
    key = f.strings("key", RATE_KEYS)
    for index, item in enumerate(key):
        if item not in RATE_KEYS:
            raise ConfigError(f.key_path(f"key[{index}]"),
                              f"unknown key {describe(item)} (known: {', '.join(RATE_KEYS)})")
    if not key:
        raise ConfigError(f.key_path("key"), "needs at least one attribute")
    raw_windows = f.items("windows", (), lambda v: v)
    if not raw_windows:
        raise ConfigError(f.key_path("windows"), "needs at least one window")
    windows = tuple(_window(raw, f.key_path(f"windows[{i}]")) for i, raw in enumerate(raw_windows))
    periods = [w.period for w in windows]
    if len(set(periods)) != len(periods):
        raise ConfigError(f.key_path("windows"), "two windows with the same period")
    rule = RateRule(
        name=name,
        key=tuple(key),
        windows=windows,
        clients=f.string("clients", "all", choices=CLIENT_CLASSES),
        ipv4_prefix=f.integer("ipv4_prefix", 32, minimum=8, maximum=32),
        ipv6_prefix=f.integer("ipv6_prefix", 64, minimum=16, maximum=128),
    )
    f.done()
    return rule


def parse_ratelimit(f: Fields | None) -> RateLimitConfig | None:
    if f is None:
        return None
    rules = tuple(_rule(name, sub) for name, sub in f.sections("rules").items())
    if not rules:
        raise ConfigError(f.key_path("rules"), "needs at least one rule")
    config = RateLimitConfig(
        rules=rules,
        action=f.convert("action", RateLimitConfig.action, check_action),
        fallback_action=f.convert("fallback_action", "DUNNO", check_action),
        timeout=f.duration("timeout", 1.0, minimum=0.01, maximum=60),
        contexts=_contexts(f),
        purge_interval=f.duration("purge_interval", 3600.0, minimum=1),
        max_override_period=int(f.duration("max_override_period", 31 * 86400, minimum=1)),
    )
    f.done()
    return config


def _hostname(value: object) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"expected a host name, got {describe(value)}")
    return value


def parse_greylist(f: Fields | None) -> GreylistConfig | None:
    if f is None:
        return None
    recipients = f.strings("whitelist_recipients", ())
    for index, item in enumerate(recipients):
        if not item.strip() or item.count("@") > 1 or any(c.isspace() for c in item):
            raise ConfigError(f.key_path(f"whitelist_recipients[{index}]"),
                              f"expected user@domain, user@ or domain, got {describe(item)}")
    hostnames = f.strings("whitelist_hostnames", ())
    for index, item in enumerate(hostnames):
        if not item.strip(".") or any(c.isspace() or c in "@/" for c in item):
            raise ConfigError(f.key_path(f"whitelist_hostnames[{index}]"),
                              f"expected a host name suffix, got {describe(item)}")
    config = GreylistConfig(
        delay=int(f.duration("delay", 300, minimum=0, maximum=86400)),
        retry_window=int(f.duration("retry_window", 2 * 86400, minimum=60)),
        expiry=int(f.duration("expiry", 35 * 86400, minimum=3600)),
        auto_whitelist_passes=f.integer("auto_whitelist_passes", 5, minimum=0, maximum=1000),
        ipv4_prefix=f.integer("ipv4_prefix", 24, minimum=8, maximum=32),
        ipv6_prefix=f.integer("ipv6_prefix", 64, minimum=16, maximum=128),
        whitelist_networks=f.networks("whitelist_networks", ()),
        whitelist_hostnames=tuple(h.lower().rstrip(".") for h in hostnames),
        whitelist_recipients=tuple(r.lower() for r in recipients),
        skip_on_spf_pass=f.boolean("skip_on_spf_pass", False),
        action=f.convert("action", GreylistConfig.action, check_action),
        header=f.string("header", GreylistConfig.header),
        hostname=f.convert("hostname", socket.getfqdn(), _hostname),
        fallback_action=f.convert("fallback_action", "DUNNO", check_action),
        timeout=f.duration("timeout", 1.0, minimum=0.01, maximum=60),
        contexts=_contexts(f),
        purge_interval=f.duration("purge_interval", 3600.0, minimum=1),
    )
    if ":" not in config.header or any(c in config.header for c in "\r\n\0"):
        raise ConfigError(f.key_path("header"), "expected one 'Name: value' header line")
    f.done()
    return config


def parse_spf(f: Fields | None) -> SPFConfig | None:
    if f is None:
        return None
    if importlib.util.find_spec("spf") is None or importlib.util.find_spec("dns") is None:
        raise ConfigError(f.where, "needs the pyspf and dnspython packages "
                                   "(pip install 'mailplugins[spf]')")
    config = SPFConfig(
        reject=f.string("reject", "fail", choices=("fail", "softfail", "never")),
        reject_action=f.convert("reject_action", SPFConfig.reject_action, check_action),
        temperror=f.string("temperror", "dunno", choices=("defer", "dunno")),
        temperror_action=f.convert("temperror_action", SPFConfig.temperror_action, check_action),
        header=f.boolean("header", True),
        receiver=f.convert("receiver", socket.getfqdn(), _hostname),
        timeout=f.duration("timeout", 1.5, minimum=0.05, maximum=60),
        threads=f.integer("threads", 8, minimum=1, maximum=200),
        contexts=_contexts(f),
        fallback_action=f.convert("fallback_action", "DUNNO", check_action),
        nameservers=tuple(_nameservers(f)),
    )
    f.done()
    return config


def _nameservers(f: Fields) -> list[tuple[str, int]]:
    found = []
    for index, item in enumerate(f.strings("nameservers", ())):
        try:
            found.append(parse_nameserver(item))
        except ValueError as exc:
            raise ConfigError(f.key_path(f"nameservers[{index}]"), str(exc)) from None
    return found
