"""Rate limits: config, subjects, atomic counting on every backend, overrides, fallbacks."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock

from mailplugins.clients import client_network
from mailplugins.config.fields import ConfigError, Fields
from mailplugins.config.policy_state import RateLimitConfig, RateRule, Window, parse_ratelimit
from mailplugins.db.policy_models import RateBucket, RateSubject
from policyd.codec import PolicyRequest
from policyd.ratelimit import RateLimiter, rate_keys, subject_for
from policyd.sql.greylist import GreylistTiming
from policyd.sql.overrides import (
    OverrideError,
    list_rate_overrides,
    rate_usage,
    remove_rate_override,
    reset_rate_counters,
    set_rate_override,
)
from policyd.sql.purge import purge
from policyd.sql.ratelimit import RateKey, rate_check
from tests.support.sync import result_of, sync_run

T0 = 1_800_000_000.0


def request(**attrs: str) -> PolicyRequest:
    base = {"request": "smtpd_access_policy", "protocol_state": "DATA",
            "client_address": "192.0.2.10", "sender": "", "sasl_username": "",
            "recipient_count": "1", "instance": "a.1"}
    base.update(attrs)
    return PolicyRequest(base)


def key(windows: tuple[Window, ...], subject: str = "bob@example.org",
        overrides: tuple[str, ...] = ()) -> RateKey:
    return RateKey("out", subject, windows, overrides)


# -- config ------------------------------------------------------------------------------------


def parse(raw: object) -> RateLimitConfig | None:
    return parse_ratelimit(Fields(raw, "policyd.ratelimit"))


def test_config_defaults_and_windows() -> None:
    config = parse({"rules": {"out": {"windows": [
        {"period": "1h", "messages": 100, "recipients": 500},
        {"period": "1d", "messages": 1000, "bytes": "1G"},
    ]}}})
    assert config is not None
    rule = config.rules[0]
    assert rule.key == ("sasl_username", "sender", "client_address")
    assert rule.windows == (Window(3600, 100, 500, None), Window(86400, 1000, None, 1024**3))
    assert rule.counts_bytes and rule.longest == 86400
    assert config.action == "DEFER_IF_PERMIT 4.7.1 Rate limit exceeded"
    assert config.fallback_action == "DUNNO"
    assert parse_ratelimit(None) is None


@pytest.mark.parametrize(("raw", "path"), [
    ({"rules": {}}, "policyd.ratelimit.rules"),
    ({"rules": {"out": {"windows": []}}}, "policyd.ratelimit.rules.out.windows"),
    ({"rules": {"out": {"windows": [{"period": "1h"}]}}}, "policyd.ratelimit.rules.out.windows[0]"),
    ({"rules": {"out": {"windows": [{"period": "1h", "messages": -1}]}}},
     "policyd.ratelimit.rules.out.windows[0].messages"),
    ({"rules": {"out": {"key": ["recipient"], "windows": [{"period": 60, "messages": 1}]}}},
     "policyd.ratelimit.rules.out.key[0]"),
    ({"rules": {"out": {"windows": [{"period": 60, "messages": 1, "typo": 1}]}}},
     "policyd.ratelimit.rules.out.windows[0].typo"),
    ({"rules": {"out": {"windows": [{"period": 60, "messages": 1}]}}, "action": "BLAH x"},
     "policyd.ratelimit.action"),
])
def test_config_errors_name_the_key(raw: object, path: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(raw)
    assert error.value.path == path


# -- subjects ----------------------------------------------------------------------------------


def test_subject_order_and_normalisation() -> None:
    rule = RateRule("out", ("sasl_username", "sender", "client_address"), (Window(60, 1),))
    assert subject_for(rule, request(sasl_username="Bob@Example.ORG", sender="x@y.org"), "+") == (
        "bob@example.org", ("@example.org", "bob@example.org"))
    assert subject_for(rule, request(sasl_username="bob"), "+") == ("bob", ())
    assert subject_for(rule, request(sender="Alice+News@Example.org"), "+") == (
        "alice@example.org", ("@example.org", "alice@example.org"))
    assert subject_for(rule, request(), "+") == ("192.0.2.10/32", ())
    assert subject_for(rule, request(client_address="2001:db8:1:2:3:4:5:6"), "+") == (
        "2001:db8:1:2::/64", ())
    assert subject_for(rule, request(client_address="::ffff:192.0.2.7"), "+") == (
        "192.0.2.7/32", ())
    assert subject_for(rule, request(client_address="garbage"), "+") is None
    only_auth = RateRule("auth", ("sasl_username",), (Window(60, 1),), clients="authenticated")
    assert subject_for(only_auth, request(sender="a@b.org"), "+") is None
    assert client_network("192.0.2.200", 24, 64) == "192.0.2.0/24"


# -- atomic counting ---------------------------------------------------------------------------


def test_limit_admits_exactly_the_limit_then_slides(any_engine: Engine) -> None:
    windows = (Window(60, messages=3),)
    admitted = [rate_check(any_engine, [key(windows)], T0 + i, messages=1, recipients=1).admitted
                for i in range(5)]
    assert admitted == [True, True, True, False, False]
    # Refusals were not counted.
    assert rate_usage(any_engine, key(windows), T0 + 5)[0].messages == 3
    # A window later the old buckets no longer count.
    assert rate_check(any_engine, [key(windows)], T0 + 61, messages=1).admitted


def test_several_windows_and_recipients(engine: Engine) -> None:
    windows = (Window(60, messages=2), Window(3600, messages=3, recipients=10))
    k = [key(windows)]
    assert rate_check(engine, k, T0, messages=1, recipients=4).admitted
    assert rate_check(engine, k, T0 + 1, messages=1, recipients=4).admitted
    refused = rate_check(engine, k, T0 + 2, messages=1, recipients=1)
    assert not refused.admitted and refused.window == windows[0] and refused.rule == "out"
    # The minute passed; the hour's recipient limit now refuses a message with 3 recipients.
    refused = rate_check(engine, k, T0 + 70, messages=1, recipients=3)
    assert not refused.admitted and refused.window == windows[1]
    assert rate_check(engine, k, T0 + 71, messages=1, recipients=2).admitted
    assert not rate_check(engine, k, T0 + 200, messages=1, recipients=1).admitted


def test_one_rule_refusing_counts_nothing_anywhere(engine: Engine) -> None:
    tight = RateKey("tight", "bob@example.org", (Window(60, messages=1),))
    loose = RateKey("loose", "192.0.2.0/24", (Window(60, messages=100),))
    assert rate_check(engine, [tight, loose], T0, messages=1).admitted
    assert not rate_check(engine, [tight, loose], T0 + 1, messages=1).admitted
    assert rate_usage(engine, loose, T0 + 2)[0].messages == 1


def test_bytes_counted_at_end_and_checked_at_data(engine: Engine) -> None:
    windows = (Window(3600, messages=100, bytes=1000),)
    k = [key(windows)]
    assert rate_check(engine, k, T0, messages=1).admitted
    assert rate_check(engine, k, T0 + 1, size=600).admitted
    assert not rate_check(engine, k, T0 + 2, size=600).admitted  # would be 1200
    assert rate_check(engine, k, T0 + 3, size=400).admitted       # exactly 1000
    # At DATA a reached byte limit refuses the next message (and counts nothing).
    assert not rate_check(engine, k, T0 + 4, messages=1, recipients=1).admitted
    assert rate_usage(engine, k[0], T0 + 4)[0].messages == 1
    # At END-OF-MESSAGE only bytes are checked: a reached message limit does not refuse.
    limited = [key((Window(3600, messages=1, bytes=10_000),), subject="carol@example.org")]
    assert rate_check(engine, limited, T0, messages=1).admitted
    assert rate_check(engine, limited, T0 + 1, size=100).admitted


def test_several_rules_and_windows_count_together(any_engine: Engine) -> None:
    # Two rules, three windows: one multi-row bucket upsert per message, on every backend.
    login = RateKey("login", "bob@example.org",
                    (Window(3600, messages=3), Window(60, messages=2, recipients=5)))
    network = RateKey("net", "192.0.2.0/24", (Window(60, recipients=6),))
    outcomes = [rate_check(any_engine, [login, network], T0 + i, messages=1, recipients=2)
                for i in range(3)]
    assert [o.admitted for o in outcomes] == [True, True, False]
    # The 60 s window is reported first (windows in period order), and refused first.
    assert (outcomes[2].rule, outcomes[2].window) == ("login", login.windows[1])
    assert [(rule, u.period, u.messages, u.recipients) for rule, u in outcomes[1].usage] == [
        ("login", 60, 2, 4), ("login", 3600, 2, 4), ("net", 60, 2, 4)]
    assert [u.recipients for u in rate_usage(any_engine, network, T0 + 3)] == [4]
    assert [u.messages for u in rate_usage(any_engine, login, T0 + 3)] == [2, 2]
    # A minute on, the hour window still holds the two: one more fits, then it refuses.
    assert rate_check(any_engine, [login, network], T0 + 61, messages=1).admitted
    refused = rate_check(any_engine, [login, network], T0 + 62, messages=1)
    assert not refused.admitted and refused.window == login.windows[0]


def test_overrides_domain_then_mailbox(any_engine: Engine) -> None:
    windows = (Window(60, messages=1),)
    subjects = ("@example.org", "bob@example.org")
    set_rate_override(any_engine, "out", "@Example.ORG", 60, messages=3)
    set_rate_override(any_engine, "out", "Bob@example.org", 60, messages=2)
    set_rate_override(any_engine, "out", "bob@example.org", 60, messages=2)  # idempotent
    bob = key(windows, overrides=subjects)
    eve = RateKey("out", "eve@example.org", windows, ("@example.org", "eve@example.org"))
    assert [rate_check(any_engine, [bob], T0 + i, messages=1).admitted for i in range(3)] == [
        True, True, False]
    assert [rate_check(any_engine, [eve], T0 + i, messages=1).admitted for i in range(4)] == [
        True, True, True, False]
    set_rate_override(any_engine, "out", "eve@example.org", 60, messages=-1)
    assert rate_check(any_engine, [eve], T0 + 5, messages=1).admitted
    # An override with a new period adds a window.
    set_rate_override(any_engine, "out", "carol@example.org", 3600, recipients=2)
    carol = RateKey("out", "carol@example.org", windows, ("@example.org", "carol@example.org"))
    assert not rate_check(any_engine, [carol], T0, messages=1, recipients=4).admitted
    listed = list_rate_overrides(any_engine, "out")
    assert [(o.subject, o.period, o.messages) for o in listed] == [
        ("@example.org", 60, 3), ("bob@example.org", 60, 2), ("carol@example.org", 3600, None),
        ("eve@example.org", 60, -1)]
    assert remove_rate_override(any_engine, "out", "bob@example.org") == 1
    assert remove_rate_override(any_engine, "out", "bob@example.org") == 0
    with pytest.raises(OverrideError):
        set_rate_override(any_engine, "out", "not an address", 60, messages=1)
    with pytest.raises(OverrideError):
        set_rate_override(any_engine, "out", "@example.org", 0, messages=1)


def test_subject_last_seen_is_rewritten_once_a_minute(any_engine: Engine) -> None:
    def last_seen() -> int:
        with any_engine.connect() as conn:
            return int(conn.execute(select(RateSubject.last_seen)).scalar_one())

    windows = (Window(3600, messages=100),)
    assert rate_check(any_engine, [key(windows)], T0, messages=1).admitted
    assert last_seen() == T0
    # A check within the minute locks the row without rewriting it ...
    assert rate_check(any_engine, [key(windows)], T0 + 59, messages=1).admitted
    assert last_seen() == T0
    # ... and one a minute later moves it on.
    assert rate_check(any_engine, [key(windows)], T0 + 60, messages=1).admitted
    assert last_seen() == T0 + 60
    assert rate_usage(any_engine, key(windows), T0 + 60)[0].messages == 3


def test_reset_and_purge(any_engine: Engine) -> None:
    engine = any_engine
    windows = (Window(60, messages=1),)
    assert rate_check(engine, [key(windows)], T0, messages=1).admitted
    assert not rate_check(engine, [key(windows)], T0 + 1, messages=1).admitted
    assert reset_rate_counters(engine, "out", "bob@example.org") == 1
    assert rate_check(engine, [key(windows)], T0 + 2, messages=1).admitted
    counts = purge(engine, T0 + 30, GreylistTiming(), longest_window=60)
    assert counts.buckets == 0 and counts.subjects == 0
    counts = purge(engine, T0 + 200, GreylistTiming(), longest_window=60, batch=1)
    assert counts.buckets == 1 and counts.subjects == 1
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(RateBucket)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(RateSubject)).scalar() == 0


# -- the limiter on the reactor ------------------------------------------------------------------


def limiter(engine: Engine, clock: Clock, run: Any = sync_run, **config: Any) -> RateLimiter:
    rules = (RateRule("out", ("sasl_username", "sender", "client_address"),
                      (Window(3600, messages=2, recipients=5, bytes=10_000),)),)
    return RateLimiter(RateLimitConfig(rules=rules, **config), engine, run, clock)


def test_limiter_defers_at_data_and_counts_accepted_recipients(engine: Engine) -> None:
    clock = Clock()
    clock.advance(T0)
    rl = limiter(engine, clock)
    data = request(sasl_username="bob@example.org", recipient_count="2")
    assert result_of(Deferred.fromCoroutine(rl.at_data(data))) is None
    assert result_of(Deferred.fromCoroutine(rl.at_data(request(
        sasl_username="bob@example.org", recipient_count="4")))) == (
        "DEFER_IF_PERMIT 4.7.1 Rate limit exceeded")
    assert result_of(Deferred.fromCoroutine(rl.at_data(data))) is None
    assert result_of(Deferred.fromCoroutine(rl.at_data(data))) is not None
    assert (rl.stats.admitted, rl.stats.refused) == (2, 2)
    # Another login has its own count.
    other = request(sasl_username="alice@example.org")
    assert result_of(Deferred.fromCoroutine(rl.at_data(other))) is None


def test_limiter_bytes_at_end_of_message(engine: Engine) -> None:
    clock = Clock()
    clock.advance(T0)
    rl = limiter(engine, clock)
    eom = request(protocol_state="END-OF-MESSAGE", sender="a@example.org", size="6000")
    assert result_of(Deferred.fromCoroutine(rl.at_end_of_message(eom))) is None
    assert result_of(Deferred.fromCoroutine(rl.at_end_of_message(eom))) is not None
    assert result_of(Deferred.fromCoroutine(rl.at_end_of_message(
        request(protocol_state="END-OF-MESSAGE", sender="a@example.org", size="0")))) is None


def test_limiter_falls_back_when_the_database_fails(engine: Engine) -> None:
    clock = Clock()

    def broken(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return fail(RuntimeError("database down"))

    rl = limiter(engine, clock, broken)
    assert result_of(Deferred.fromCoroutine(rl.at_data(request(sender="a@b.org")))) is None
    assert rl.stats.failed == 1
    strict = limiter(engine, clock, broken, fallback_action="DEFER_IF_PERMIT 4.3.0 try later")
    assert result_of(Deferred.fromCoroutine(strict.at_data(request(sender="a@b.org")))) == (
        "DEFER_IF_PERMIT 4.3.0 try later")


def test_limiter_answers_within_its_timeout_and_recovers(engine: Engine) -> None:
    clock = Clock()
    hung: list[Deferred[Any]] = []
    healthy = [False]

    def run(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if healthy[0]:
            return maybeDeferred(fn, *args, **kwargs)
        d: Deferred[Any] = Deferred()
        hung.append(d)
        return d

    rl = limiter(engine, clock, run, timeout=0.5)
    pending = Deferred.fromCoroutine(rl.at_data(request(sender="a@b.org")))
    assert not pending.called
    clock.advance(0.5)
    assert result_of(pending) is None and rl.stats.failed == 1
    healthy[0] = True
    assert result_of(Deferred.fromCoroutine(rl.at_data(request(sender="a@b.org")))) is None
    assert rl.stats.admitted == 1


def test_limiter_refuses_to_queue_without_bound(engine: Engine) -> None:
    clock = Clock()
    rl = limiter(engine, clock, lambda fn, *a, **k: Deferred())
    rl.max_pending = 0
    assert result_of(Deferred.fromCoroutine(rl.at_data(request(sender="a@b.org")))) is None
    assert rl.stats.failed == 1


def test_rate_keys_skip_requests_without_subject_and_bound_long_ones() -> None:
    config = RateLimitConfig(rules=(RateRule("s", ("sender",), (Window(60, 1),)),))
    assert rate_keys(config, request(sender=""), "+") == []
    (long,) = rate_keys(config, request(sender="x" * 400 + "@example.org"), "+")
    assert long.subject.startswith("sha256:") and len(long.subject) < 80
    assert long.override_subjects == ()


def test_saturated_subjects_are_refused_without_the_database(engine: Engine) -> None:
    clock = Clock()
    clock.advance(T0)  # T0 is a multiple of 360, the hour window's step
    calls: list[str] = []

    def run(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        calls.append("db")
        return maybeDeferred(fn, *args, **kwargs)

    rl = limiter(engine, clock, run)  # 2 messages, 5 recipients per hour
    big = request(sender="a@b.org", recipient_count="4")
    assert result_of(Deferred.fromCoroutine(rl.at_data(big))) is None
    # Too many recipients: refused, but a smaller message could still pass.
    assert result_of(Deferred.fromCoroutine(rl.at_data(big))) is not None
    small = request(sender="a@b.org", recipient_count="1")
    assert result_of(Deferred.fromCoroutine(rl.at_data(small))) is None
    assert len(calls) == 3
    # Now the message limit is reached: refused once through the database, then from memory.
    for _ in range(5):
        assert result_of(Deferred.fromCoroutine(rl.at_data(small))) is not None
    assert len(calls) == 4
    # At the window's next step the database is asked again.
    clock.advance(360)
    assert result_of(Deferred.fromCoroutine(rl.at_data(small))) is not None
    assert len(calls) == 5
