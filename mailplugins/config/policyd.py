# -*- test-case-name: tests.unit.test_policyd_config -*-
"""The ``policyd:`` section.

The decisions policyd makes at ``protocol_state=RCPT`` are four checks, always run in this
order: ``recipient_validation``, ``relay_control``, ``sender_login_match``, ``spoof_protection``.
Each is switched on or off globally by a boolean key of the same name; ``contexts`` maps a
Postfix ``policy_context`` (``check_policy_service { ..., policy_context=submission }``) to the
exact list of checks run for requests carrying that context. Requests with an empty or an
unlisted context use the global switches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mailplugins.config.actions import check_action
from mailplugins.config.fields import ConfigError, Fields, IPNetwork, describe
from mailplugins.config.policy_state import (
    GreylistConfig,
    RateLimitConfig,
    SPFConfig,
    parse_greylist,
    parse_ratelimit,
    parse_spf,
)

#: Every check, in the order the rule chain runs them.
CHECKS = ("recipient_validation", "relay_control", "sender_login_match", "spoof_protection")

@dataclass(frozen=True)
class ContextConfig:
    """The rule set for one ``policy_context``."""

    checks: tuple[str, ...]


@dataclass(frozen=True)
class PolicydConfig:
    listen: tuple[str, ...]
    metrics: str | None
    mynetworks: tuple[IPNetwork, ...]
    #: Action answered when a check cannot decide (database down, bug, over budget).
    fallback_action: str
    #: Seconds a request may take before the fallback action is answered.
    budget: float
    #: Longer than Postfix's max_idle (300 s) and max_ttl (1000 s), so Postfix closes first.
    idle_timeout: float
    #: Seconds a request may take to arrive, from its first byte to its empty line; a slower
    #: peer is disconnected (Postfix writes a request whole, in one go).
    request_timeout: float
    max_line_length: int
    max_attributes: int
    max_connections: int
    #: Seconds a domain, recipient, login or grant lookup is reused without the database.
    cache_ttl: float
    #: Entries held by the lookup cache at most (a flood of random recipients stays bounded).
    cache_size: int = 100_000
    #: Checks run for requests with no (or an unlisted) ``policy_context``, in CHECKS order.
    checks: tuple[str, ...] = CHECKS
    #: Per ``policy_context`` rule sets.
    contexts: Mapping[str, ContextConfig] = field(
        default_factory=lambda: MappingProxyType({})
    )
    #: A recipient that only resolves to disabled mailboxes is answered "User unknown".
    reject_disabled_as_unknown: bool = True
    #: SPF, greylisting and rate limits (mailplugins.config.policy_state); None = off.
    ratelimit: RateLimitConfig | None = None
    greylist: GreylistConfig | None = None
    spf: SPFConfig | None = None
    #: Processes serving policyd (mailplugins.workers); 1 = today's single process.
    workers: int = 1

    def checks_for(self, context: str) -> tuple[str, ...]:
        rules = self.contexts.get(context) if context else None
        return rules.checks if rules is not None else self.checks


def _check_names(f: Fields, key: str) -> tuple[str, ...]:
    names = f.strings(key)
    for index, name in enumerate(names):
        if name not in CHECKS:
            raise ConfigError(
                f.key_path(f"{key}[{index}]"),
                f"unknown check {describe(name)} (known: {', '.join(CHECKS)})",
            )
    # Always CHECKS order: the order of decisions is part of the behaviour, not of the config.
    return tuple(name for name in CHECKS if name in names)


def parse_policyd(f: Fields) -> PolicydConfig:
    switches = {name: f.boolean(name, True) for name in CHECKS}
    contexts: dict[str, ContextConfig] = {}
    for name, sub in f.sections("contexts").items():
        if not name or any(c.isspace() or c == "=" for c in name):
            raise ConfigError(
                f.key_path(f"contexts.{name}"), "a policy_context name must be a non-empty word"
            )
        contexts[name] = ContextConfig(checks=_check_names(sub, "checks"))
        sub.done()
    config = PolicydConfig(
        listen=f.endpoints("listen"),
        metrics=f.endpoint("metrics", None),
        mynetworks=f.networks("mynetworks", ()),
        fallback_action=f.convert(
            "fallback_action", "DEFER_IF_PERMIT Service temporarily unavailable", check_action
        ),
        budget=f.duration("budget", 2.0, minimum=0.05, maximum=90),
        idle_timeout=f.duration("idle_timeout", 1100.0, minimum=1),
        request_timeout=f.duration("request_timeout", 10.0, minimum=0.1, maximum=100),
        max_line_length=f.integer("max_line_length", 8192, minimum=256, maximum=1024 * 1024),
        max_attributes=f.integer("max_attributes", 128, minimum=8, maximum=10_000),
        max_connections=f.integer("max_connections", 2000, minimum=1),
        cache_ttl=f.duration("cache_ttl", 30.0, maximum=86400),
        cache_size=f.integer("cache_size", 100_000, minimum=0, maximum=10_000_000),
        checks=tuple(name for name in CHECKS if switches[name]),
        contexts=MappingProxyType(contexts),
        reject_disabled_as_unknown=f.boolean("reject_disabled_as_unknown", True),
        ratelimit=parse_ratelimit(f.section("ratelimit")),
        greylist=parse_greylist(f.section("greylist")),
        spf=parse_spf(f.section("spf")),
        workers=f.workers(),
    )
    f.done()
    return config
