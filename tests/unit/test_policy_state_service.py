"""SPF, greylisting and rate limits inside the policyd service and its config."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred

from mailplugins.config import parse_config
from mailplugins.config.policy_state import GreylistConfig, RateLimitConfig, RateRule, SPFConfig, Window
from policyd.message_checks import StatefulChecks
from policyd.service import Snapshot
from policyd.spf import SPFResult
from tests.unit.test_policyd_fixtures import Harness, rcpt

T0 = 1_800_000_000.0


def harness(db_run: Any = None, **grey: Any) -> Harness:
    h = Harness()
    h.clock.advance(T0)
    h.service.stateful = StatefulChecks(
        engine=h.store.engine,
        db_run=db_run or (lambda fn, *a, **k: maybeDeferred(fn, *a, **k)),
        spf_run=None,
        clock=h.clock,
        budget=2.0,
        greylist=GreylistConfig(hostname="mx.example.org", **grey),
        ratelimit=RateLimitConfig(rules=(
            RateRule("logins", ("sasl_username",), (Window(3600, messages=1),)),)),
    )
    return h


def decide(h: Harness, **attrs: str) -> str:
    results: list[str] = []
    h.service.decide(rcpt(**attrs)).addCallback(results.append)
    assert results
    return results[0]


def test_rules_first_then_greylisting() -> None:
    h = harness()
    # An unknown recipient is refused by recipient validation, not greylisted.
    assert decide(h, recipient="nobody@example.org").startswith("550 ")
    assert decide(h).startswith("DEFER_IF_PERMIT 4.7.1 Greylisted")
    h.clock.advance(300)
    assert decide(h).startswith("PREPEND X-Greylist: delayed 300 seconds by mailplugins-policyd")
    assert decide(h) == "DUNNO"
    # Authenticated clients are never greylisted.
    assert decide(h, sasl_username="alice@example.org", sender="alice@example.org",
                  recipient="bob@example.net") == "DUNNO"


def test_rate_limit_at_data_and_nothing_at_other_states() -> None:
    h = harness()
    data = {"protocol_state": "DATA", "sasl_username": "alice@example.org",
            "sender": "alice@example.org", "recipient_count": "1"}
    assert decide(h, **data) == "DUNNO"
    assert decide(h, **data) == "DEFER_IF_PERMIT 4.7.1 Rate limit exceeded"
    assert decide(h, protocol_state="MAIL") == "DUNNO"
    assert decide(h, protocol_state="END-OF-MESSAGE", size="100") == "DUNNO"


def test_greylist_database_failure_is_its_own_fallback() -> None:
    h = harness(db_run=lambda fn, *a, **k: fail(RuntimeError("down")))
    assert decide(h) == "DUNNO"
    hung = harness(db_run=lambda fn, *a, **k: Deferred(), timeout=0.5)
    results: list[str] = []
    hung.service.decide(rcpt()).addCallback(results.append)
    hung.clock.advance(0.5)
    assert results == ["DUNNO"]


def test_config_sections_reach_the_policyd_config() -> None:
    config = parse_config({
        "database": {"url": "sqlite://"},
        "policyd": {
            "listen": "tcp:0:interface=127.0.0.1",
            "greylist": {"delay": "1m", "hostname": "mx"},
            "ratelimit": {"rules": {"r": {"windows": [{"period": "1h", "messages": 5}]}}},
            "spf": {"reject": "never", "receiver": "mx"},
        },
    })
    section = config.policyd
    assert section is not None
    assert section.greylist is not None and section.greylist.delay == 60
    assert section.ratelimit is not None and section.ratelimit.rules[0].windows[0].messages == 5
    assert section.spf is not None and section.spf.reject == "never"
    bare = parse_config({"database": {"url": "sqlite://"},
                         "policyd": {"listen": "tcp:0:interface=127.0.0.1"}}).policyd
    assert bare is not None and (bare.greylist, bare.ratelimit, bare.spf) == (None, None, None)


def test_a_request_racing_a_reload_decides_with_the_snapshot_it_started_with() -> None:
    """Greylisting is switched off while a request waits for SPF: it is still greylisted (its
    snapshot had greylisting), and the next request, on the new snapshot, is not."""
    h = Harness()
    h.clock.advance(T0)
    pending: list[Deferred[Any]] = []

    def spf_run(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d

    stateful = StatefulChecks(
        engine=h.store.engine, db_run=lambda fn, *a, **k: maybeDeferred(fn, *a, **k),
        spf_run=spf_run, clock=h.clock, budget=2.0,
        greylist=GreylistConfig(hostname="mx.example.org"), spf=SPFConfig(receiver="mx.example.org"),
    )
    h.service.stateful = stateful
    before: list[str] = []
    h.service.decide(rcpt(instance="a.1")).addCallback(before.append)
    assert before == [] and len(pending) == 1

    checks = stateful.configure(None, None, SPFConfig(receiver="mx.example.org"), 2.0, "+")
    h.service.swap(Snapshot(h.config, h.lookups, checks))
    pending.pop().callback(SPFResult("neutral", "Neutral (test)"))
    assert len(before) == 1 and before[0].startswith("DEFER_IF_PERMIT 4.7.1 Greylisted")

    after: list[str] = []
    h.service.decide(rcpt(instance="b.1")).addCallback(after.append)
    pending.pop().callback(SPFResult("neutral", "Neutral (test)"))
    assert after == ["PREPEND Received-SPF: Neutral (test)"]
