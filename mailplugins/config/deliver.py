# -*- test-case-name: tests.unit.test_config -*-
"""The ``deliver:`` section."""

from __future__ import annotations

from dataclasses import dataclass

from mailplugins.config.fields import Fields


@dataclass(frozen=True)
class DeliverConfig:
    listen: tuple[str, ...]
    metrics: str | None
    max_connections: int


def parse_deliver(f: Fields) -> DeliverConfig:
    config = DeliverConfig(
        listen=f.endpoints("listen"),
        metrics=f.endpoint("metrics", None),
        max_connections=f.integer("max_connections", 1000, minimum=1),
    )
    f.done()
    return config
