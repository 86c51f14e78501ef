"""authd.verify: decisions, cache, penalties and delays, on a real in-memory Store and a Clock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from authd.caches import SuccessCache
from authd.logins import Verdict, VerifyRequest
from authd.metrics import AuthdMetrics
from authd.sasl_codec import Outcome
from authd.verify import Verifier
from mailplugins.config import AuthdConfig, PasswordConfig, parse_config
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from mailplugins.hashing import hash_password
from mailplugins.metrics import DaemonMetrics
from mailplugins.store import Store
from tests.support.sync import sync_run

FAST = {"scheme": "SHA512-CRYPT", "sha_crypt_rounds": 5000}


def make_config(**authd: Any) -> Any:
    section = {"sasl_listen": "tcp:0:interface=127.0.0.1", **authd}
    return parse_config({"database": {"url": "sqlite://"}, "passwords": FAST, "authd": section})


class Rig:
    def __init__(self, **authd: Any) -> None:
        config = make_config(**authd)
        self.authd: AuthdConfig = config.authd
        self.passwords: PasswordConfig = config.passwords
        engine = make_engine(config.database)
        schema.upgrade(engine)
        self.now = datetime(2026, 11, 22, 4, 0, 0)
        self.store = Store(engine, clock=lambda: self.now)
        self.store.add_domain("example.org")
        self.alice = self.store.add_mailbox("alice@example.org", self.hash("s3cret"))
        self.clock = Clock()
        self.clock.advance(1000)
        self.metrics = DaemonMetrics("authd")
        self.authd_metrics = AuthdMetrics(self.metrics)
        self.cpu_calls = 0
        self.db_down = False
        self.verifier = Verifier(
            clock=self.clock, store=self.store, db_run=self.db_run, cpu_run=self.cpu_run,
            config=self.authd, passwords=self.passwords, metrics=self.authd_metrics,
            wallclock=lambda: self.now,
        )

    def hash(self, password: str) -> str:
        return hash_password(password, self.passwords)

    def db_run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.db_down:
            return fail(RuntimeError("database down"))
        return sync_run(fn, *args)

    def cpu_run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.cpu_calls += 1
        return sync_run(fn, *args)

    def verify(
        self, user: str = "alice@example.org", password: str = "s3cret", service: str = "smtp",
        rip: str | None = "192.0.2.1", advance: float = 9.0,
    ) -> tuple[Verdict, float]:
        """The verdict and how long (fake) time it took to arrive."""
        results: list[Verdict] = []
        start = self.clock.seconds()
        d = self.verifier.verify(VerifyRequest(user, password, service, rip, "plain"))
        d.addCallback(results.append)
        waited = 0.0
        while not results and waited < advance:
            self.clock.advance(0.25)
            waited += 0.25
        assert results, "no verdict"
        return results[0], self.clock.seconds() - start

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"mailplugins_authd_{name}", labels)
        return value or 0.0


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_good_password(rig: Rig) -> None:
    verdict, took = rig.verify()
    assert verdict == Verdict(Outcome.OK, "alice@example.org")
    assert took < 0.5
    assert rig.metric("auth_requests_total", mechanism="plain", result="success") == 1
    assert rig.metric("auth_duration_seconds_count", mechanism="plain", result="success") == 1


def test_login_is_case_insensitive_and_canonical(rig: Rig) -> None:
    verdict, _ = rig.verify("ALICE@Example.ORG")
    assert verdict == Verdict(Outcome.OK, "alice@example.org")


def test_bad_password_is_delayed(rig: Rig) -> None:
    verdict, took = rig.verify(password="wrong")
    assert verdict.outcome is Outcome.FAIL
    assert 2.0 <= took < 2.5
    assert rig.metric("auth_requests_total", mechanism="plain", result="failure") == 1


def test_unknown_user_and_garbage(rig: Rig) -> None:
    assert rig.verify("nobody@example.org")[0].outcome is Outcome.UNKNOWN
    assert rig.verify("not an address")[0].outcome is Outcome.UNKNOWN
    assert rig.verify("a%b@example.org")[0].outcome is Outcome.UNKNOWN


def test_disabled_only_revealed_with_the_right_password(rig: Rig) -> None:
    rig.store.set_enabled("alice@example.org", False)
    assert rig.verify()[0].outcome is Outcome.DISABLED
    assert rig.verify(password="wrong")[0].outcome is Outcome.FAIL


def test_service_flags(rig: Rig) -> None:
    rig.store.set_services("alice@example.org", ["imap"])
    assert rig.verify(service="smtp")[0].outcome is Outcome.FAIL
    assert rig.cpu_calls == 0
    assert rig.verify(service="imap")[0].outcome is Outcome.OK
    assert rig.verify(service="sieve")[0].outcome is Outcome.OK  # unknown services follow imap


def test_app_password_after_main(rig: Rig) -> None:
    rig.store.add_app_password("alice@example.org", "phone", rig.hash("app-pass"), ["imap"])
    assert rig.verify(password="app-pass", service="imap")[0] == Verdict(Outcome.OK, "alice@example.org")
    assert rig.verify(password="app-pass", service="smtp")[0].outcome is Outcome.FAIL
    rig.clock.advance(10)
    (app,) = rig.store.list_app_passwords("alice@example.org")
    assert app.last_used_at == rig.now


def test_cache_saves_the_hash_and_dies_with_a_password_change(rig: Rig) -> None:
    rig.verify()
    rig.verify()
    assert rig.cpu_calls == 1
    assert rig.metric("verify_cache_total", result="hit") == 1
    rig.store.set_password("alice@example.org", rig.hash("new"))
    rig.clock.advance(6)  # lookup_cache_ttl
    assert rig.verify()[0].outcome is Outcome.FAIL
    assert rig.verify(password="new")[0].outcome is Outcome.OK
    assert rig.cpu_calls == 3


def test_cache_expires() -> None:
    rig = Rig(cache_ttl="60s")
    rig.verify()
    rig.clock.advance(61)
    rig.verify()
    assert rig.cpu_calls == 2


def test_cache_hit_still_honours_disable_and_revoked_app_password(rig: Rig) -> None:
    rig.store.add_app_password("alice@example.org", "phone", rig.hash("app-pass"))
    rig.verify(password="app-pass")
    rig.store.revoke_app_password("alice@example.org", "phone")
    rig.clock.advance(6)
    assert rig.verify(password="app-pass")[0].outcome is Outcome.FAIL
    rig.verify()
    rig.store.set_enabled("alice@example.org", False)
    rig.clock.advance(6)
    assert rig.verify()[0].outcome is Outcome.DISABLED


def test_a_burst_reads_the_database_once() -> None:
    rig = Rig(lookup_cache_ttl="5s")
    reads: list[str] = []
    load = rig.verifier._load

    def counting(user: str) -> Any:
        reads.append(user)
        return load(user)

    rig.verifier._load = counting  # type: ignore[method-assign]
    for _ in range(5):
        assert rig.verify()[0].outcome is Outcome.OK
    assert len(reads) == 1
    # A disable applies once the record is older than lookup_cache_ttl.
    rig.store.set_enabled("alice@example.org", False)
    assert rig.verify()[0].outcome is Outcome.OK
    rig.clock.advance(5)
    assert rig.verify()[0].outcome is Outcome.DISABLED
    assert len(reads) == 2
    # Last login was written once, not at every cached login.
    mailbox = rig.store.get_mailbox("alice@example.org")
    assert mailbox is not None and mailbox.last_login_at == rig.now


def test_database_down_is_a_prompt_tempfail(rig: Rig) -> None:
    rig.db_down = True
    verdict, took = rig.verify()
    assert verdict.outcome is Outcome.TEMPFAIL
    assert took < 0.5
    assert rig.metric("auth_requests_total", mechanism="plain", result="tempfail") == 1


def test_slow_database_is_a_tempfail_after_the_db_timeout() -> None:
    rig = Rig()
    rig.verifier.db_timeout = 2.0
    rig.verifier._db_run = lambda fn, *a: Deferred()  # never answers
    verdict, took = rig.verify()
    assert verdict.outcome is Outcome.TEMPFAIL
    assert took == pytest.approx(2.0, abs=0.3)


def test_slow_backend_answers_tempfail_before_the_deadline() -> None:
    rig = Rig(request_timeout="5s")
    rig.verifier._cpu_run = lambda fn, *a: Deferred()  # never finishes
    verdict, took = rig.verify()
    assert verdict.outcome is Outcome.TEMPFAIL
    assert took == pytest.approx(5.0, abs=0.3)


def test_penalties_grow_and_stay_under_postfix_timeout() -> None:
    rig = Rig(penalty_threshold=2, penalty_initial="1s", penalty_max="5s", failure_delay="2s")
    times = [rig.verify(password=f"wrong{i}")[1] for i in range(6)]
    # 2 s failure delay, then penalties 1, 2, 4, 5 (capped) on top.
    assert [round(t) for t in times] == [2, 2, 3, 4, 6, 7]
    assert all(t < 9.5 for t in times)
    assert rig.metric("penalties_total") == 4


def test_same_wrong_password_does_not_grow_the_penalty() -> None:
    rig = Rig(penalty_threshold=2)
    times = [rig.verify(password="stale")[1] for _ in range(5)]
    assert all(round(t) == 2 for t in times)


def test_user_counter_applies_from_any_ip() -> None:
    rig = Rig(penalty_threshold=1, penalty_initial="1s")
    rig.verify(password="a", rip="192.0.2.1")
    verdict, took = rig.verify(rip="198.51.100.1")
    assert verdict.outcome is Outcome.OK
    assert round(took) == 1
    # success resets the user counter
    assert rig.verify(rip="198.51.100.1")[1] < 0.5


def test_trusted_networks_are_never_delayed() -> None:
    rig = Rig(trusted_networks=["10.0.0.0/8"], penalty_threshold=1)
    for i in range(4):
        verdict, took = rig.verify(password=f"bad{i}", rip="10.1.2.3")
        assert verdict.outcome is Outcome.FAIL
        assert took < 0.5


def test_per_request_failure_delay_for_http(rig: Rig) -> None:
    results: list[Verdict] = []
    rig.verifier.verify(VerifyRequest("alice@example.org", "x", "imap", None, "http"), 0.0).addCallback(
        results.append
    )
    assert results and results[0].outcome is Outcome.FAIL


def test_rehash_and_last_login_after_success() -> None:
    rig = Rig()
    weak = "{PLAIN}s3cret"
    rig.store.set_password("alice@example.org", weak)
    assert rig.verify()[0].outcome is Outcome.OK
    mailbox = rig.store.get_mailbox("alice@example.org")
    assert mailbox is not None
    assert mailbox.password.startswith("{SHA512-CRYPT}")
    assert mailbox.last_login_at == rig.now
    assert rig.metric("password_rehashes_total", scheme="PLAIN") == 1
    assert rig.metric("password_verify_duration_seconds_count", scheme="PLAIN") == 1


def test_unusable_stored_hash_fails_without_crashing(rig: Rig) -> None:
    rig.store.set_password("alice@example.org", "{NOPE}xyz")
    assert rig.verify()[0].outcome is Outcome.FAIL


def test_failure_timing_does_not_reveal_whether_a_hash_ran() -> None:
    rig = Rig(failure_delay="2s")

    def slow_cpu(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        rig.clock.callLater(0.5, lambda: d.callback(fn(*args)))
        return d

    rig.verifier._cpu_run = slow_cpu
    _, wrong_password = rig.verify(password="wrong", rip="192.0.2.1")
    _, unknown_user = rig.verify(user="nobody@example.org", rip="192.0.2.2")
    assert wrong_password == pytest.approx(2.0, abs=0.3)
    assert unknown_user == pytest.approx(2.0, abs=0.3)


def test_failures_are_logged_without_the_password() -> None:
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        rig = Rig()
        rig.verify(user="alice@example.org", password="hunter2-secret", rip="192.0.2.9")
        rig.verify(user="evil\n@example.org", password="x")
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "authd.verify"]
    assert any("user=alice@example.org rip=192.0.2.9" in line and "wrong password" in line for line in lines)
    assert all("hunter2" not in line and "\n" not in line for line in lines)


def test_reload_keeps_the_injected_cache_secret() -> None:
    """A reload that resizes the success cache builds it with the same injected key."""
    from types import SimpleNamespace

    rig = Rig()
    secret = b"k" * 32
    verifier = Verifier(
        clock=rig.clock, store=rig.store, db_run=rig.db_run, cpu_run=rig.cpu_run,
        config=rig.authd, passwords=rig.passwords, metrics=rig.authd_metrics, secret=secret,
    )
    mailbox: Any = SimpleNamespace(id=7, password_version=1)
    expected = SuccessCache(60, 10, secret).key(mailbox, "s3cret")
    assert verifier.cache.key(mailbox, "s3cret") == expected
    bigger = make_config(cache_size=rig.authd.cache_size + 1).authd
    verifier.reload(bigger, rig.passwords)
    assert len(verifier.cache) == 0 and verifier.cache.size == bigger.cache_size
    assert verifier.cache.key(mailbox, "s3cret") == expected


def test_a_verification_racing_a_reload_finishes_on_the_state_it_started_with() -> None:
    """penalty_shared is switched on while a failing login waits for its mailbox: that login is
    not shared (its state had sharing off); the next one, on the new state, is."""
    rig = Rig(penalty_shared=False)
    shared: list[tuple[Any, ...]] = []
    rig.verifier.shared_writes.record = lambda *args: shared.append(args)  # type: ignore[method-assign]
    pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
    ran: list[Any] = []

    def gated(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if getattr(fn, "__name__", "") == "_load":
            d: Deferred[Any] = Deferred()
            pending.append((fn, args, d))
            return d
        ran.append(fn)
        return sync_run(fn, *args)

    rig.verifier._db_run = gated
    results: list[Verdict] = []
    rig.verifier.verify(VerifyRequest("alice@example.org", "wrong1", "imap", "192.0.2.1", "plain")
                        ).addCallback(results.append)
    assert len(pending) == 1
    rig.verifier.reload(make_config(penalty_shared=True).authd, rig.passwords)
    fn, args, d = pending.pop()
    d.callback(fn(*args))
    rig.clock.advance(5)
    assert results and results[0].outcome is Outcome.FAIL
    assert shared == []

    rig.verifier.verify(VerifyRequest("alice@example.org", "wrong2", "imap", "192.0.2.1", "plain")
                        ).addCallback(results.append)
    fn, args, d = pending.pop()
    d.callback(fn(*args))
    rig.clock.advance(5)
    assert len(results) == 2 and len(shared) == 1
