# -*- test-case-name: tests.unit.test_config -*-
"""The ``policyd:`` section."""

from __future__ import annotations

from dataclasses import dataclass

from mailplugins.config.fields import Fields, IPNetwork


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
    max_line_length: int
    max_attributes: int
    max_connections: int
    cache_ttl: float


def parse_policyd(f: Fields) -> PolicydConfig:
    config = PolicydConfig(
        listen=f.endpoints("listen"),
        metrics=f.endpoint("metrics", None),
        mynetworks=f.networks("mynetworks", ()),
        fallback_action=f.string("fallback_action", "DEFER_IF_PERMIT Service temporarily unavailable"),
        budget=f.duration("budget", 2.0, minimum=0.05, maximum=90),
        idle_timeout=f.duration("idle_timeout", 1100.0, minimum=1),
        max_line_length=f.integer("max_line_length", 8192, minimum=256),
        max_attributes=f.integer("max_attributes", 128, minimum=8),
        max_connections=f.integer("max_connections", 2000, minimum=1),
        cache_ttl=f.duration("cache_ttl", 30.0),
    )
    f.done()
    return config
