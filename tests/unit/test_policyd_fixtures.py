"""Shared fixtures for the policyd unit tests (no tests here): in-memory store, sync service."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.pool import StaticPool
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mailplugins.config.fields import Fields
from mailplugins.config.policyd import PolicydConfig, parse_policyd
from mailplugins.db import schema
from mailplugins.metrics import DaemonMetrics
from mailplugins.store import Store
from policyd.codec import PolicyRequest
from policyd.lookups import Lookups
from policyd.service import PolicyMetrics, PolicyService
from tests.support.sync import sync_run

CAPTURE = Path(__file__).resolve().parent.parent / "data" / "postfix-3.7-policy-requests.jsonl"


def captured() -> list[list[tuple[str, str]]]:
    """The real Postfix 3.7.11 requests, as ordered (name, value) pairs."""
    requests = []
    for line in CAPTURE.read_text().splitlines():
        record = json.loads(line)
        if "attrs" in record:
            requests.append([(name, value) for name, value in record["attrs"]])
    return requests


def make_store() -> Store:
    from sqlalchemy import create_engine

    engine = create_engine(
        "sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool
    )
    schema.upgrade(engine)
    return Store(engine)


def populate(store: Store) -> None:
    """Two domains of ours with mailboxes, aliases, a catch-all and grants."""
    store.add_domain("example.org")
    store.add_domain("example.net")
    store.add_domain("bücher.example")
    store.add_mailbox("alice@example.org", "{PLAIN}x")
    store.add_mailbox("bob@example.org", "{PLAIN}x")
    store.set_enabled("bob@example.org", False)
    store.add_mailbox("carol@example.net", "{PLAIN}x")
    store.add_mailbox("dora@bücher.example", "{PLAIN}x")
    store.add_alias("sales@example.org", ["alice@example.org"])
    store.add_alias("team@example.org", ["alice@example.org", "carol@example.net"])
    store.add_alias("fwd@example.org", ["someone@elsewhere.example"])
    store.add_alias("@example.net", ["carol@example.net"])
    store.grant_sender("alice@example.org", "boss@example.org")
    store.grant_sender("alice@example.org", "@granted.example")


def policyd_config(**overrides: Any) -> PolicydConfig:
    section: dict[str, Any] = {
        "listen": "tcp:0:interface=127.0.0.1",
        "mynetworks": ["127.0.0.0/8", "2001:db8::/32"],
    }
    section.update(overrides)
    return parse_policyd(Fields(section, "policyd"))


class Harness:
    """A PolicyService on a real in-memory store, with fake time and its own metrics."""

    def __init__(self, run: Callable[..., Deferred[Any]] = sync_run, **config: Any) -> None:
        self.clock = Clock()
        self.store = make_store()
        populate(self.store)
        self.config = policyd_config(**config)
        self.lookups = Lookups(self.store, run, self.clock.seconds, ttl=self.config.cache_ttl)
        self.metrics = DaemonMetrics("policyd")
        self.service = PolicyService(
            self.config, self.lookups, self.clock, PolicyMetrics(self.metrics),
            timer=self.clock.seconds,
        )

    def handle(self, **attrs: str) -> Deferred[str]:
        return self.service.decide(rcpt(**attrs))

    def decide(self, **attrs: str) -> str:
        results: list[str] = []
        self.handle(**attrs).addCallback(results.append)
        assert results, "the decision did not complete synchronously"
        return results[0]

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"mailplugins_policyd_{name}", labels)
        return value or 0.0


def rcpt(**attrs: str) -> PolicyRequest:
    """A RCPT request like Postfix 3.7 sends, with ``attrs`` overriding the defaults."""
    values = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "203.0.113.5",
        "client_name": "unknown",
        "client_port": "53766",
        "reverse_client_name": "unknown",
        "server_address": "127.0.0.1",
        "server_port": "25",
        "helo_name": "client.example",
        "sender": "someone@elsewhere.example",
        "recipient": "alice@example.org",
        "recipient_count": "0",
        "queue_id": "",
        "instance": "4afc.6b024ffc.712",
        "size": "0",
        "sasl_method": "",
        "sasl_username": "",
        "sasl_sender": "",
        "policy_context": "",
    }
    values.update(attrs)
    return PolicyRequest(values)
