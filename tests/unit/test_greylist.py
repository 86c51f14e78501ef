"""Greylisting with postgrey's semantics, on a fake clock and a real (in-memory) database."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock

from mailplugins.config.fields import ConfigError, Fields
from mailplugins.config.policy_state import (
    GreylistConfig,
    RateLimitConfig,
    RateRule,
    SPFConfig,
    Window,
    parse_greylist,
)
from mailplugins.db.policy_models import GreylistClient, GreylistEntry
from mailplugins.timers import Timers
from policyd.codec import PolicyRequest
from policyd.greylist import (
    Greylister,
    greylist_header,
    normalise_sender,
    triplet_key,
    whitelisted,
)
from policyd.message_checks import StatefulChecks
from policyd.spf import SPFResult
from policyd.sql.greylist import GreylistTiming, greylist_check
from policyd.sql.purge import purge
from tests.support.sync import result_of, sync_run

T0 = 1_800_000_000.0
DAY = 86400


def request(**attrs: str) -> PolicyRequest:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
            "client_address": "192.0.2.10", "client_name": "mx.sender.example",
            "helo_name": "mx.sender.example", "sender": "alice@sender.example",
            "recipient": "bob@example.org", "sasl_username": "", "instance": "i.1"}
    base.update(attrs)
    return PolicyRequest(base)


# -- keys and lists ----------------------------------------------------------------------------


@pytest.mark.parametrize(("sender", "normal"), [
    ("Alice@Example.org", "alice@example.org"),
    ("alice+list-123@example.org", "alice@example.org"),
    ("prvs=1234abcdef=alice@example.org", "alice@example.org"),
    ("prvs=alice=1234abcdef@example.org", "alice@example.org"),
    ("bounce-12345-678@lists.example.org", "bounce-#-#@lists.example.org"),
    ("", ""),
])
def test_sender_normalisation(sender: str, normal: str) -> None:
    assert normalise_sender(sender) == normal


def test_triplet_groups_networks() -> None:
    config = GreylistConfig()
    same = triplet_key("192.0.2.10", "a@x.org", "Bob@example.org", config)
    assert same == triplet_key("192.0.2.200", "A+1@x.org", "bob@example.org", config)
    assert same != triplet_key("192.0.3.10", "a@x.org", "bob@example.org", config)
    v6 = triplet_key("2001:db8:0:1::1", "a@x.org", "b@y.org", config)
    assert v6 == triplet_key("2001:db8:0:1:ffff::2", "a@x.org", "b@y.org", config)
    assert v6 != triplet_key("2001:db8:0:2::1", "a@x.org", "b@y.org", config)
    assert triplet_key("bogus", "a@x.org", "b@y.org", config) is None
    assert same is not None and len(same) == 64 and "example" not in same


def test_whitelists() -> None:
    config = GreylistConfig(
        whitelist_networks=(__import__("ipaddress").ip_network("198.51.100.0/24"),),
        whitelist_hostnames=(".outbound.protection.example", "mail.friend.example"),
        whitelist_recipients=("postmaster@", "abuse@example.org", "open.example"),
    )
    assert whitelisted(request(client_address="198.51.100.7"), config)
    assert whitelisted(request(client_address="::ffff:198.51.100.7"), config)
    assert whitelisted(request(client_name="a.b.outbound.protection.example"), config)
    assert whitelisted(request(client_name="mail.friend.example"), config)
    assert not whitelisted(request(client_name="evilmail.friend.example.attacker"), config)
    assert not whitelisted(request(client_name="unknown"), config)
    assert whitelisted(request(recipient="PostMaster@anything.example"), config)
    assert whitelisted(request(recipient="abuse@example.org"), config)
    assert whitelisted(request(recipient="x@open.example"), config)
    assert not whitelisted(request(), config)


def test_config_parsing() -> None:
    config = parse_greylist(Fields({"delay": "1m", "whitelist_networks": ["10.0.0.0/8"],
                                    "hostname": "mx.example.org"}, "policyd.greylist"))
    assert config is not None and config.delay == 60 and config.retry_window == 2 * DAY
    assert config.expiry == 35 * DAY and config.auto_whitelist_passes == 5
    with pytest.raises(ConfigError, match="policyd.greylist.whitelist_recipients"):
        parse_greylist(Fields({"whitelist_recipients": ["a@b@c"]}, "policyd.greylist"))
    with pytest.raises(ConfigError, match="policyd.greylist.header"):
        parse_greylist(Fields({"header": "no colon"}, "policyd.greylist"))
    with pytest.raises(ConfigError, match="policyd.greylist.delay"):
        parse_greylist(Fields({"delay": "soon"}, "policyd.greylist"))


def test_header_template() -> None:
    config = GreylistConfig(hostname="mx.example.org")
    assert greylist_header(config, 301, 0) == (
        "X-Greylist: delayed 301 seconds by mailplugins-policyd at mx.example.org; "
        "Thu, 01 Jan 1970 00:00:00 -0000")


# -- postgrey timing in SQL ----------------------------------------------------------------------


def test_delay_then_pass_then_remembered(any_engine: Engine) -> None:
    timing = GreylistTiming(awl_passes=0)
    check = greylist_check
    assert check(any_engine, "k", "192.0.2.1", T0, timing).status == "greylisted"
    early = check(any_engine, "k", "192.0.2.1", T0 + 100, timing)
    assert (early.status, early.seconds) == ("greylisted", 200)
    passed = check(any_engine, "k", "192.0.2.1", T0 + 300, timing)
    assert (passed.status, passed.seconds, passed.first_pass) == ("passed", 300, True)
    again = check(any_engine, "k", "192.0.2.1", T0 + 400, timing)
    assert (again.status, again.first_pass) == ("passed", False)
    # Passed triplets are not reset by long pauses (until they expire).
    assert check(any_engine, "k", "192.0.2.1", T0 + 10 * DAY, timing).status == "passed"


def test_late_first_retry_starts_over(engine: Engine) -> None:
    timing = GreylistTiming(awl_passes=0)
    assert greylist_check(engine, "k", "c", T0, timing).status == "greylisted"
    late = greylist_check(engine, "k", "c", T0 + 2 * DAY + 1, timing)
    assert (late.status, late.seconds) == ("greylisted", 300)
    assert greylist_check(engine, "k", "c", T0 + 2 * DAY + 301, timing).status == "passed"


def test_client_auto_whitelist_counts_one_pass_per_hour(engine: Engine) -> None:
    timing = GreylistTiming(delay=300, awl_passes=3)
    client = "192.0.2.1"

    def deliver(key: str, at: float) -> str:
        greylist_check(engine, key, client, at, timing)
        return greylist_check(engine, key, client, at + 300, timing).status

    assert deliver("t1", T0) == "passed"            # pass 1 counts at once
    assert deliver("t2", T0 + 600) == "passed"      # same hour: not counted
    assert deliver("t3", T0 + 3600) == "passed"     # pass 2 (an hour after pass 1)
    assert deliver("t4", T0 + 7300) == "passed"     # pass 3: now whitelisted
    fresh = greylist_check(engine, "new-triplet", client, T0 + 8000, timing)
    assert fresh.status == "whitelisted"
    assert greylist_check(engine, "other", "192.0.2.2", T0 + 8000, timing).status == "greylisted"


def test_purge_expires_old_and_unpassed(any_engine: Engine) -> None:
    engine = any_engine
    timing = GreylistTiming()
    greylist_check(engine, "passed", "c1", T0, timing)
    greylist_check(engine, "passed", "c1", T0 + 300, timing)
    greylist_check(engine, "never", "c2", T0, timing)
    counts = purge(engine, T0 + 3 * DAY, timing, longest_window=0)
    assert (counts.triplets, counts.clients) == (1, 0)
    counts = purge(engine, T0 + 36 * DAY, timing, longest_window=0)
    assert (counts.triplets, counts.clients) == (1, 1)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(GreylistEntry)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(GreylistClient)).scalar() == 0


# -- on the reactor ------------------------------------------------------------------------------


def test_greylister_with_fake_clock(engine: Engine) -> None:
    clock = Clock()
    clock.advance(T0)
    grey = Greylister(GreylistConfig(hostname="mx.example.org"), engine, sync_run, clock)
    action, header = result_of(Deferred.fromCoroutine(grey.check(request())))
    assert action == "DEFER_IF_PERMIT 4.7.1 Greylisted, please try again later"
    assert header is None
    clock.advance(299)
    assert result_of(Deferred.fromCoroutine(grey.check(request())))[0] is not None
    clock.advance(1)
    action, header = result_of(Deferred.fromCoroutine(grey.check(request())))
    assert action is None
    assert header is not None and header.startswith("X-Greylist: delayed 300 seconds by ")
    assert result_of(Deferred.fromCoroutine(grey.check(request()))) == (None, None)


def test_greylister_fails_open_and_within_timeout(engine: Engine) -> None:
    clock = Clock()
    grey = Greylister(GreylistConfig(), engine,
                      lambda fn, *a, **k: fail(RuntimeError("down")), clock)
    assert result_of(Deferred.fromCoroutine(grey.check(request()))) == (None, None)
    hung = Greylister(GreylistConfig(timeout=0.5, fallback_action="DEFER_IF_PERMIT 4.3.0 later"),
                      engine, lambda fn, *a, **k: Deferred(), clock)
    pending = Deferred.fromCoroutine(hung.check(request()))
    assert not pending.called
    clock.advance(0.5)
    assert result_of(pending) == ("DEFER_IF_PERMIT 4.3.0 later", None)


# -- the joined flow -------------------------------------------------------------------------------


def checks(engine: Engine, clock: Clock, spf_result: str | None = None,
           **grey: Any) -> StatefulChecks:
    def spf_run(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        assert spf_result is not None
        return maybeDeferred(lambda: SPFResult(spf_result, f"{spf_result.title()} (test)"))

    return StatefulChecks(
        engine=engine, db_run=sync_run, spf_run=spf_run, clock=clock, budget=2.0,
        greylist=GreylistConfig(hostname="mx.example.org", **grey),
        spf=SPFConfig(receiver="mx.example.org") if spf_result else None,
        ratelimit=RateLimitConfig(rules=(RateRule("out", ("sasl_username",),
                                                   (Window(3600, messages=1),)),)),
    )


def rcpt(c: StatefulChecks, req: PolicyRequest, trusted: bool = False) -> Any:
    return result_of(Deferred.fromCoroutine(c.at_rcpt(req, trusted)))


def test_flow_skips_trusted_clients(engine: Engine) -> None:
    clock = Clock()
    c = checks(engine, clock)
    assert rcpt(c, request(sasl_username="bob"), trusted=True) is None


def test_flow_headers_once_per_message(engine: Engine) -> None:
    clock = Clock()
    clock.advance(T0)
    c = checks(engine, clock, spf_result="neutral")
    assert rcpt(c, request()).startswith("DEFER_IF_PERMIT")
    clock.advance(300)
    # Retry (a new message): the Received-SPF header goes first, X-Greylist on the next reply.
    first = rcpt(c, request(instance="i.2"))
    assert first == "PREPEND Received-SPF: Neutral (test)"
    second = rcpt(c, request(instance="i.2", recipient="carol@example.org"))
    assert second.startswith("DEFER_IF_PERMIT")  # carol's triplet is new
    data = result_of(Deferred.fromCoroutine(c.at_data(PolicyRequest(
        {"protocol_state": "DATA", "instance": "i.2", "client_address": "192.0.2.10"}))))
    assert data is not None and data.startswith("PREPEND X-Greylist: delayed 300 seconds")
    assert result_of(Deferred.fromCoroutine(c.at_data(PolicyRequest(
        {"protocol_state": "DATA", "instance": "i.2"})))) is None


def test_flow_spf_fail_rejects_every_recipient_and_pass_can_skip(engine: Engine) -> None:
    clock = Clock()
    clock.advance(T0)
    failing = checks(engine, clock, spf_result="fail")
    assert rcpt(failing, request()) == "550 5.7.23 SPF validation failed"
    assert rcpt(failing, request(recipient="x@example.org")) == "550 5.7.23 SPF validation failed"
    passing = checks(engine, clock, spf_result="pass", skip_on_spf_pass=True)
    assert rcpt(passing, request(instance="p.1")).startswith("PREPEND Received-SPF: Pass")
    assert rcpt(passing, request(instance="p.1", recipient="y@example.org")) is None


def test_flow_rate_limit_at_data(engine: Engine) -> None:
    clock = Clock()
    c = checks(engine, clock)
    data = PolicyRequest({"protocol_state": "DATA", "sasl_username": "bob@example.org",
                          "recipient_count": "1", "instance": "d.1"})
    assert result_of(Deferred.fromCoroutine(c.at_data(data))) is None
    assert result_of(Deferred.fromCoroutine(c.at_data(data))) == (
        "DEFER_IF_PERMIT 4.7.1 Rate limit exceeded")


def test_flow_memory_is_bounded(engine: Engine) -> None:
    clock = Clock()
    c = checks(engine, clock, spf_result="none")
    c.memory_size = 3
    for n in range(10):
        rcpt(c, request(instance=f"m.{n}", client_address="203.0.113.5"))
    assert len(c._messages) == 3


def test_flow_remembers_only_messages_with_something_to_remember(engine: Engine) -> None:
    # Without SPF a deferred recipient leaves nothing for later replies: no memory is kept
    # (one per request filled the memory with objects the garbage collector kept walking).
    clock = Clock()
    clock.advance(T0)
    c = checks(engine, clock)
    for n in range(5):
        assert rcpt(c, request(instance=f"g.{n}", sender=f"s{n}@x.example")).startswith(
            "DEFER_IF_PERMIT")
    assert len(c._messages) == 0
    clock.advance(300)
    # A first pass sends its X-Greylist header: that is remembered, so the message's next
    # recipient does not send it again.
    assert rcpt(c, request(instance="p.1", sender="s1@x.example")).startswith(
        "PREPEND X-Greylist: delayed 300 seconds")
    assert list(c._messages) == ["p.1"]
    clock.advance(300)
    assert rcpt(c, request(instance="p.1", sender="s2@x.example")) is None


def test_purge_timer_runs_in_the_pool(engine: Engine) -> None:
    clock = Clock()
    calls: list[Any] = []

    def run(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        calls.append(fn.__name__)
        return maybeDeferred(fn, *args, **kwargs)

    c = StatefulChecks(engine=engine, db_run=run, spf_run=None, clock=clock, budget=2.0,
                       greylist=GreylistConfig(purge_interval=60))
    timers = Timers(clock)
    timers.startService()
    timers.want(c.periodic())
    assert calls == []
    clock.advance(60)
    assert calls == ["purge"]
    timers.stopService()
    clock.advance(120)
    assert calls == ["purge"]


def test_greylister_answers_known_triplets_from_memory(engine: Engine) -> None:
    clock = Clock()
    clock.advance(T0)
    calls: list[str] = []

    def run(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        calls.append("db")
        return maybeDeferred(fn, *args, **kwargs)

    grey = Greylister(GreylistConfig(hostname="mx"), engine, run, clock, cache_size=10)
    for _ in range(3):
        assert result_of(Deferred.fromCoroutine(grey.check(request())))[0] is not None
    assert len(calls) == 1
    clock.advance(300)
    assert result_of(Deferred.fromCoroutine(grey.check(request())))[1] is not None
    for _ in range(3):
        assert result_of(Deferred.fromCoroutine(grey.check(request()))) == (None, None)
    assert len(calls) == 2
    clock.advance(3600)  # passed triplets are confirmed (and their expiry refreshed) hourly
    assert result_of(Deferred.fromCoroutine(grey.check(request()))) == (None, None)
    assert len(calls) == 3
    for n in range(20):
        result_of(Deferred.fromCoroutine(grey.check(request(sender=f"s{n}@x.example"))))
    assert len(grey._known) <= 10
