"""The service around the rules: budget, fallback, caching, metrics."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import OperationalError
from twisted.internet.defer import Deferred, fail

from policyd.service import _finish
from tests.support.sync import sync_run
from tests.unit.test_policyd_fixtures import Harness

FALLBACK = "DEFER_IF_PERMIT Service temporarily unavailable"


class ManualRun:
    """A database pool whose calls complete only when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((fn, args, d))
        return d

    def complete_all(self) -> None:
        while self.calls:
            fn, args, d = self.calls.pop(0)
            d.callback(fn(*args))


def test_budget_exceeded_gives_the_fallback() -> None:
    run = ManualRun()
    h = Harness(run=run, budget="2s")
    results: list[str] = []
    h.handle(recipient="nobody@example.org").addCallback(results.append)
    h.clock.advance(1.9)
    assert results == []
    h.clock.advance(0.2)
    assert results == [FALLBACK]
    assert h.sample("fallback_total", reason="timeout") == 1
    assert h.sample("requests_total", protocol_state="RCPT", action="DEFER_IF_PERMIT") == 1
    # The late database answer is harmless and still fills the cache.
    run.complete_all()
    assert results == [FALLBACK]
    assert h.decide(recipient="nobody@example.org").startswith("550 ")


def test_database_error_gives_the_fallback() -> None:
    def broken(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return fail(OperationalError("SELECT", {}, Exception("database is locked")))

    h = Harness(run=broken, fallback_action="DUNNO")
    assert h.decide(recipient="nobody@example.org") == "DUNNO"
    assert h.sample("fallback_total", reason="database") == 1
    # Failures are not cached: once the database is back, decisions are real again.
    h.lookups._run = sync_run
    assert h.decide(recipient="nobody@example.org").startswith("550 ")


def test_bug_gives_the_fallback() -> None:
    def buggy(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return fail(ZeroDivisionError())

    h = Harness(run=buggy)
    assert h.decide(recipient="x@other.example") == FALLBACK
    assert h.sample("fallback_total", reason="error") == 1


def test_cached_decision_does_not_touch_the_database() -> None:
    h = Harness(cache_ttl="30s")
    attrs = {"recipient": "alice@example.org", "sender": "alice@example.org",
             "sasl_username": "alice@example.org"}
    assert h.decide(**attrs) == "DUNNO"
    queries = h.lookups.queries
    assert queries > 0
    for _ in range(5):
        assert h.decide(**attrs) == "DUNNO"
    assert h.lookups.queries == queries
    h.clock.advance(31)
    assert h.decide(**attrs) == "DUNNO"
    assert h.lookups.queries == 2 * queries


def test_cache_sees_changes_after_ttl_or_clear() -> None:
    h = Harness(cache_ttl="30s")
    assert h.decide(recipient="new@example.org").startswith("550 ")
    h.store.add_mailbox("new@example.org", "{PLAIN}x")
    assert h.decide(recipient="new@example.org").startswith("550 ")  # negative answer cached
    h.lookups.clear()
    assert h.decide(recipient="new@example.org") == "DUNNO"


def test_zero_ttl_caches_nothing() -> None:
    h = Harness(cache_ttl=0)
    h.decide(recipient="alice@example.org")
    first = h.lookups.queries
    h.decide(recipient="alice@example.org")
    assert h.lookups.queries == 2 * first


def test_concurrent_misses_share_one_query() -> None:
    run = ManualRun()
    h = Harness(run=run)
    results: list[str] = []
    for _ in range(3):
        h.handle(recipient="nobody@example.org").addCallback(results.append)
    assert len(run.calls) == 1
    run.complete_all()
    assert results == [results[0]] * 3 and results[0].startswith("550 ")


def test_a_timed_out_waiter_does_not_disturb_the_others() -> None:
    run = ManualRun()
    h = Harness(run=run, budget="1s")
    results: list[str] = []
    h.handle(recipient="nobody@example.org").addCallback(results.append)
    h.clock.advance(0.5)
    h.handle(recipient="nobody@example.org").addCallback(results.append)
    h.clock.advance(0.6)
    assert results == [FALLBACK]
    run.complete_all()
    assert results[1].startswith("550 ")


def test_reload_drops_in_flight_results() -> None:
    run = ManualRun()
    h = Harness(run=run, spoof_protection=False)
    h.handle(recipient="alice@example.org")
    h.lookups.clear()
    run.complete_all()
    assert len(h.lookups.cache) == 0


def test_non_rcpt_states_need_no_lookup() -> None:
    h = Harness()
    for state in ("CONNECT", "EHLO", "MAIL", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN", "BOGUS"):
        assert h.decide(protocol_state=state, recipient="nobody@example.org") == "DUNNO"
    assert h.lookups.queries == 0
    assert h.sample("requests_total", protocol_state="DATA", action="DUNNO") == 1
    assert h.sample("requests_total", protocol_state="OTHER", action="DUNNO") == 1


def test_duration_is_observed() -> None:
    run = ManualRun()
    h = Harness(run=run)
    h.handle(recipient="alice@example.org")
    h.clock.advance(0.25)
    run.complete_all()
    assert h.sample("request_duration_seconds_count") == 1
    assert h.sample("request_duration_seconds_sum") == 0.25


def test_several_slow_lookups_in_a_row() -> None:
    run = ManualRun()
    h = Harness(run=run)
    results: list[str] = []
    h.handle(recipient="x@other.example", sasl_username="alice@example.org",
             sender="carol@example.net").addCallback(results.append)
    assert results == []
    run.complete_all()  # recipient, login mailbox, grants, sender resolution: one after another
    assert results == ["553 5.7.1 not owned by user alice@example.org"]
    assert h.lookups.queries >= 3


def test_a_failure_after_a_slow_lookup_gives_the_fallback() -> None:
    run = ManualRun()
    h = Harness(run=run)
    results: list[str] = []
    h.handle(recipient="x@other.example", sasl_username="alice@example.org",
             sender="carol@example.net").addCallback(results.append)
    fn, args, d = run.calls.pop(0)
    d.callback(fn(*args))
    fn, args, d = run.calls.pop(0)
    d.errback(OperationalError("SELECT", {}, Exception("server closed the connection")))
    assert results == [FALLBACK]
    assert h.sample("fallback_total", reason="database") == 1


def test_cached_decisions_are_plain_values() -> None:
    h = Harness()
    from tests.unit.test_policyd_fixtures import rcpt

    assert isinstance(h.service.handle(rcpt(recipient="alice@example.org")), Deferred) is False
    assert h.service.handle(rcpt(protocol_state="DATA")) == "DUNNO"


def test_overloaded_database_queue_gives_the_fallback_at_once() -> None:
    run = ManualRun()
    h = Harness(run=run)
    h.lookups.max_pending = 2
    results: list[str] = []
    for name in ("a", "b", "c"):
        h.handle(recipient=f"{name}@example.org").addCallback(results.append)
    assert results == [FALLBACK]  # the third distinct lookup did not even queue
    assert h.sample("fallback_total", reason="overload") == 1
    assert h.lookups.queries == 2
    run.complete_all()
    assert results[1:] == ["550 5.1.1 User unknown"] * 2


def test_unknown_context_is_reported_once() -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness(contexts={"submission": {"checks": []}})
        for _ in range(3):
            h.decide(policy_context="submision", recipient="alice@example.org")
        h.decide(policy_context="submission", recipient="alice@example.org")
    finally:
        globalLogPublisher.removeObserver(events.append)
    noted = [e for e in events if e.get("context") == "submision"]
    assert len(noted) == 1
    assert not [e for e in events if e.get("context") == "submission"]


def test_a_request_racing_a_reload_finishes_on_its_snapshot() -> None:
    """The reload swaps settings and lookups while a RCPT waits for the database: that request
    ends with its own snapshot's settings and lookups; the next one uses the new ones."""
    from policyd.lookups import Lookups
    from policyd.service import Snapshot
    from tests.unit.test_policyd_fixtures import policyd_config

    run = ManualRun()
    h = Harness(run=run)
    results: list[str] = []
    h.handle(recipient="nobody@example.org").addCallback(results.append)
    assert results == [] and run.calls
    new_run = ManualRun()
    new_lookups = Lookups(h.store, new_run, h.clock.seconds, ttl=30)
    h.service.swap(Snapshot(policyd_config(recipient_validation=False), new_lookups))
    run.complete_all()
    assert len(results) == 1 and results[0].startswith("550 ")  # its validation, its lookups
    assert new_run.calls == []
    after: list[str] = []
    h.handle(recipient="nobody@example.org").addCallback(after.append)
    new_run.complete_all()
    assert after == ["DUNNO"]  # the new snapshot: validation off, the new lookups asked


def test_a_deferred_decision_leaves_no_reference_cycle() -> None:
    # A request that waited (on the database, say) must be freed as soon as it is answered,
    # not kept by a cycle until the garbage collector's next full pass: on a stream where
    # every request waits, those passes were what made the tail latency.
    async def decision(waited_on: Deferred[str]) -> str:
        return "DUNNO " + await waited_on

    gc.disable()
    try:
        fired: Deferred[str] = Deferred()
        coroutine = decision(fired)
        awaited = coroutine.send(None)
        alive = weakref.ref(coroutine)
        result = _finish(coroutine, awaited)
        del coroutine, awaited
        answers: list[str] = []
        result.addCallback(answers.append)
        fired.callback("x")
        assert answers == ["DUNNO x"]
        del result, fired
        assert alive() is None
    finally:
        gc.enable()
