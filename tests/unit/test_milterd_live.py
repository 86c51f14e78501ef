"""milterd's live checks and daemon wiring: the shared sender rule, DNS cache, listeners, reload."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from mailplugins.config import Config, parse_config
from mailplugins.daemon import Runtime, load_daemon
from mailplugins.database import Database
from mailplugins.metrics import DaemonMetrics
from mailplugins.threads import WorkerPool
from milterd.daemon import DAEMON
from milterd.live import LiveChecks
from milterd.resolver import DnsTimeout, TxtResolver
from tests.support.milter_fakes import milterd_config
from tests.support.sync import result_of, sync_run
from tests.unit.test_policyd_fixtures import make_store, populate


class NoKeys:
    def signing_keys(self, domain: str) -> list[Any]:
        return []


def live(clock: Any = None, **config: Any) -> LiveChecks:
    store = make_store()
    populate(store)
    return LiveChecks(milterd_config(**config), store=store, db_run=sync_run, cpu_run=sync_run,
                      dns_run=sync_run, clock=clock or Clock(), delimiters="+", key_store=NoKeys(),
                      txt_lookup=lambda name: None)


@pytest.mark.parametrize(("login", "address", "owned"), [
    ("alice@example.org", "alice@example.org", True),
    ("alice@example.org", "Alice+news@EXAMPLE.org", True),
    ("alice@example.org", "sales@example.org", True),      # alias to her
    ("alice@example.org", "team@example.org", True),       # list alias with her in it
    ("alice@example.org", "carol@example.net", False),
    ("alice@example.org", "nobody@example.net", False),    # catch-all does not count
    ("mallory@example.org", "alice@example.org", False),
    ("alice@example.org", "alice@[192.0.2.1]", False),
])
def test_from_ownership_is_policyds_rule(login: str, address: str, owned: bool) -> None:
    assert result_of(live().may_send_as(login, address)) is owned


def test_ownership_is_cached_for_cache_ttl() -> None:
    clock = Clock()
    checks = live(clock, cache_ttl=30)
    calls: list[Any] = []
    original = checks._senders.mailbox
    checks._senders.mailbox = lambda address: calls.append(address) or original(address)  # type: ignore[method-assign, func-returns-value]
    for _ in range(3):
        assert result_of(checks.may_send_as("alice@example.org", "alice@example.org"))
    assert len(calls) == 1
    clock.advance(31)
    result_of(checks.may_send_as("alice@example.org", "alice@example.org"))
    assert len(calls) == 2


def test_no_key_means_no_signer() -> None:
    assert result_of(live().signer("example.org", [("From", " a@example.org")])) is None


def test_resolver_caches_shares_and_times_out() -> None:
    clock = Clock()
    pending: list[Deferred[Any]] = []
    answers = {"a.example": [b"v=DKIM1; p=x"], "b.example": None}

    def run(fn: Any, name: str) -> Deferred[Any]:
        if name == "slow.example":
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d
        if name == "broken.example":
            return fail(OSError("SERVFAIL"))
        return succeed(fn(name))

    resolver = TxtResolver(run, answers.__getitem__, clock, timeout=2, ttl=60, size=2)
    assert result_of(resolver.txt("A.example.")) == [b"v=DKIM1; p=x"]
    assert result_of(resolver.txt("a.example")) == [b"v=DKIM1; p=x"]
    assert resolver.queries == 1
    assert result_of(resolver.txt("b.example")) is None
    slow1, slow2 = resolver.txt("slow.example"), resolver.txt("slow.example")
    assert resolver.queries == 3  # shared
    clock.advance(2)
    assert isinstance(result_of(slow1), DnsTimeout) and isinstance(result_of(slow2), DnsTimeout)
    assert isinstance(result_of(resolver.txt("broken.example")), OSError)
    assert len(resolver) == 2  # errors are not cached; size bounds the rest
    clock.advance(61)
    result_of(resolver.txt("a.example"))
    assert resolver.queries == 5
    many = result_of(resolver.many(["a.example", "b.example", "a.example"]))
    assert many == {"a.example": [b"v=DKIM1; p=x"], "b.example": None}
    assert resolver.queries == 6  # b.example had expired: looked up again, a.example cached
    # Everything cached: answered at once under the names as asked, no lookup.
    cached = resolver.many(["A.example.", "b.example"])
    assert cached.called and result_of(cached) == {"A.example.": [b"v=DKIM1; p=x"], "b.example": None}
    assert resolver.queries == 6
    # One name missing: looked up, the cached one not again.
    answers["c.example"] = [b"v=DKIM1; p=y"]
    mixed = result_of(resolver.many(["a.example", "c.example"]))
    assert mixed == {"a.example": [b"v=DKIM1; p=x"], "c.example": [b"v=DKIM1; p=y"]}
    assert resolver.queries == 7


def config(**milterd: Any) -> Config:
    section: dict[str, Any] = {"listen": ["tcp:0:interface=127.0.0.1", "unix:/tmp/mp-m.sock"],
                               "authserv_id": "mx.example.test"}
    section.update(milterd)
    return parse_config({"database": {"url": "sqlite://"}, "milterd": section})


def test_daemon_builds_listeners_and_reloads() -> None:
    assert load_daemon("milterd") is DAEMON
    reactor = MemoryReactorClock()
    cfg = config()
    db = Database(reactor, cfg.database)
    metrics = DaemonMetrics("milterd")
    runtime = Runtime(reactor, cfg, db, metrics, WorkerPool(reactor, "cpu", 1))
    checks = LiveChecks(cfg.milterd, store=db.store, db_run=sync_run, cpu_run=sync_run,
                        dns_run=sync_run, clock=reactor, delimiters="+", key_store=NoKeys(),
                        txt_lookup=lambda name: None)
    try:
        running = DAEMON.build(runtime, checks)
        assert [(each.key, each.endpoint) for each in running.listeners] == [
            ("milterd.listen[0]", "tcp:0:interface=127.0.0.1"),
            ("milterd.listen[1]", "unix:/tmp/mp-m.sock"),
        ]
        before = running.factory.buildProtocol(None)
        old_checks = running.checks
        running.reload(config(max_connections=7, authserv_id="other.example"))
        # A connection open before the reload keeps its checks and settings; a new one gets
        # the new ones, together.
        assert before._checks is old_checks and before._config.authserv_id == "mx.example.test"
        after = running.factory.buildProtocol(None)
        assert after._checks is running.checks is not old_checks
        assert after._config.authserv_id == running.checks.authserv_id == "other.example"
        assert running.timers.names() == [] and running.services.running
        assert running.limit.maximum == 7
        assert [limited.limit for limited in running.limited] == [running.limit] * 2
        assert running.checks.authserv_id == "other.example"
        assert running.factory.config.max_connections == 7
        text = metrics.render().decode()
        assert "mailplugins_milterd_dns_cache_entries 0.0" in text
        assert running.stop() is None
        assert not running.services.running
    finally:
        db.close()


def test_config_errors_name_the_key() -> None:
    from mailplugins.config import ConfigError

    with pytest.raises(ConfigError, match=r"milterd.dmarc.reject_action: must be one of"):
        config(dmarc={"reject_action": "bounce"})
    with pytest.raises(ConfigError, match=r"milterd.authserv_id: an authserv-id"):
        config(authserv_id="a; b")
    with pytest.raises(ConfigError, match=r"milterd.nameservers\[0\]"):
        config(nameservers=["not-an-ip"])
    with pytest.raises(ConfigError, match=r"milterd.listen: required"):
        parse_config({"database": {"url": "sqlite://"}, "milterd": {}})
    assert config().milterd.nameservers == ()
    assert config(nameservers=["127.0.0.1:5353"]).milterd.nameservers == (("127.0.0.1", 5353),)


class OneKeyEach:
    """Real keys (cryptography), as milterd.keys.KeyStore hands them out."""

    def __init__(self) -> None:
        from mailplugins.dkim_keys import generate_key
        from milterd.dkim import SigningKey

        self.records: dict[str, list[bytes] | None] = {}
        self.keys = []
        for selector, kind, algorithm in (("r1", "rsa", "rsa-sha256"), ("e1", "ed25519", "ed25519-sha256")):
            pem, public, _bits = generate_key(kind)
            self.keys.append(SigningKey("example.org", selector, algorithm, pem))
            self.records[f"{selector}._domainkey.example.org"] = [
                f"v=DKIM1; k={kind}; p={public}".encode()]

    def signing_keys(self, domain: str) -> list[Any]:
        return list(self.keys) if domain == "example.org" else []


def test_signatures_made_through_live_checks_verify_through_them() -> None:
    keys = OneKeyEach()
    store = make_store()
    checks = LiveChecks(milterd_config(), store=store, db_run=sync_run, cpu_run=sync_run,
                        dns_run=sync_run, clock=Clock(), delimiters="+", key_store=keys,
                        txt_lookup=lambda name: keys.records.get(name), now=lambda: 1_800_000_000)
    headers = [("From", " Alice <alice@example.org>"), ("To", " bob@example.net"),
               ("Subject", " hello\r\n\tfolded")]
    signer = result_of(checks.signer("example.org", headers))
    body = b"Hello Bob,\r\n\r\nsee you.\r\n"
    signer.feed(body[:7])
    signer.feed(body[7:])
    signatures = result_of(checks.sign(signer))
    assert [s.split("a=", 1)[1].split(";", 1)[0] for s in signatures] == ["rsa-sha256", "ed25519-sha256"]
    signed = [("DKIM-Signature", s) for s in signatures] + headers
    verifier = checks.verifier(signed)
    verifier.feed(body)
    results = result_of(checks.verify(verifier))
    assert [(r.result, r.domain) for r in results] == [("pass", "example.org"), ("pass", "example.org")]
    altered = checks.verifier(signed)
    altered.feed(body + b"P.S.\r\n")
    assert {r.result for r in result_of(checks.verify(altered))} == {"fail"}
    assert result_of(checks.signer("example.net", headers)) is None


def test_expired_signatures_fail_through_live_checks() -> None:
    """The daemon's verifier knows the time, so x= in the past is a fail (RFC 6376 3.5)."""
    from milterd.dkim.sign import load_signing_key, sign_data
    from milterd.dkim.signature import hashed_headers, parse_signature, select_headers, strip_b_value

    keys = OneKeyEach()
    ed = keys.keys[1]
    now = 1_800_000_000
    checks = LiveChecks(milterd_config(), store=make_store(), db_run=sync_run, cpu_run=sync_run,
                        dns_run=sync_run, clock=Clock(), delimiters="+", key_store=keys,
                        txt_lookup=lambda name: keys.records.get(name), now=lambda: now)
    headers = [("From", " alice@example.org"), ("Subject", " hello")]
    body = b"Hello\r\n"

    def signed(expires: int) -> list[tuple[str, str]]:
        signer = result_of(checks.signer("example.org", headers))
        signer.feed(body)
        ours = next(s for s in result_of(checks.sign(signer)) if "ed25519" in s)
        times = f"t={expires - 3600}; x={expires};"
        value, added = re.subn(r"\bt=(\d+);", times, strip_b_value(ours), count=1)
        assert added == 1, ours
        sig = parse_signature(value + "AAAA")
        data = hashed_headers(select_headers(headers, sig.headers), "relaxed", "DKIM-Signature", value)
        b = base64.b64encode(sign_data(load_signing_key(ed), data)).decode()
        return [("DKIM-Signature", value + b), *headers]

    for expires, expected in ((now + 60, "pass"), (now - 60, "fail")):
        verifier = checks.verifier(signed(expires))
        verifier.feed(body)
        assert [r.result for r in result_of(checks.verify(verifier))] == [expected]


def test_signing_keys_are_reused_for_key_cache_ttl() -> None:
    keys = OneKeyEach()
    calls: list[str] = []

    class Counting:
        def signing_keys(self, domain: str) -> list[Any]:
            calls.append(domain)
            return keys.signing_keys(domain)

    clock = Clock()
    checks = LiveChecks(milterd_config(key_cache_ttl=10), store=make_store(), db_run=sync_run,
                        cpu_run=sync_run, dns_run=sync_run, clock=clock, delimiters="+",
                        key_store=Counting(), txt_lookup=lambda name: None)
    for _ in range(3):
        assert result_of(checks.signer("example.org", [("From", " a@example.org")])) is not None
        assert result_of(checks.signer("example.net", [("From", " a@example.net")])) is None
    assert calls == ["example.org", "example.net"]
    clock.advance(11)
    result_of(checks.signer("example.org", [("From", " a@example.org")]))
    assert calls == ["example.org", "example.net", "example.org"]


def test_spf_results_are_reused_but_not_temperrors() -> None:
    from tests.support.milter_fakes import Spf

    calls: list[tuple[Any, ...]] = []
    answers = {"a@x.example": "pass", "b@x.example": "temperror"}

    def dns_run(fn: Any, client: str, sender: str, *rest: Any) -> Deferred[Any]:
        calls.append((client, sender))
        return succeed(Spf(answers[sender]))

    clock = Clock()
    checks = LiveChecks(milterd_config(dns_cache_ttl=60), store=make_store(), db_run=sync_run,
                        cpu_run=sync_run, dns_run=dns_run, clock=clock, delimiters="+",
                        key_store=NoKeys(), txt_lookup=lambda name: None)
    for _ in range(2):
        assert result_of(checks.spf("192.0.2.1", "h", "a@x.example")).result == "pass"
        assert result_of(checks.spf("192.0.2.1", "h", "b@x.example")).result == "temperror"
    assert calls == [("192.0.2.1", "a@x.example"), ("192.0.2.1", "b@x.example"), ("192.0.2.1", "b@x.example")]
    clock.advance(61)
    result_of(checks.spf("192.0.2.1", "h", "a@x.example"))
    assert len(calls) == 4


def test_dmarc_and_authentication_results_through_live_checks() -> None:
    from tests.support.milter_fakes import Spf

    records = {"_dmarc.bank.example": [b"v=DMARC1; p=reject"]}
    checks = LiveChecks(milterd_config(), store=make_store(), db_run=sync_run, cpu_run=sync_run,
                        dns_run=sync_run, clock=Clock(), delimiters="+", key_store=NoKeys(),
                        txt_lookup=lambda name: records.get(name))
    checks._exists = lambda name: True  # type: ignore[assignment]
    verdict = result_of(checks.dmarc([" CEO <ceo@bank.example>"], [], Spf("fail"), "bank.example"))
    assert (verdict.result, verdict.policy, verdict.disposition) == ("fail", "reject", "reject")
    value = checks.authentication_results([], Spf("fail"), verdict, "quarantine",
                                          mailfrom="ceo@bank.example", helo="h.example")
    assert value.startswith(" mx.example.test;")
    assert "dmarc=fail (p=reject dis=quarantine) header.from=bank.example" in value
    assert "spf=fail smtp.mailfrom=ceo@bank.example" in value
    assert checks.claims_our_id(value) and checks.claims_our_id(" (x) MX.EXAMPLE.TEST; none")
    assert not checks.claims_our_id(" mx.example.test.evil; none")


def test_dmarc_runs_on_the_reactor_once_its_records_are_cached() -> None:
    from tests.support.milter_fakes import Spf

    records = {"_dmarc.bank.example": [b"v=DMARC1; p=reject"],
               "_dmarc.np.example": [b"v=DMARC1; p=none; np=reject"]}
    pooled: list[str] = []

    def dns_run(fn: Any, *args: Any) -> Deferred[Any]:
        pooled.append(args[0][0])
        return sync_run(fn, *args)

    checks = LiveChecks(milterd_config(), store=make_store(), db_run=sync_run, cpu_run=sync_run,
                        dns_run=dns_run, clock=Clock(), delimiters="+", key_store=NoKeys(),
                        txt_lookup=lambda name: records.get(name))
    checks._exists = lambda name: False  # type: ignore[assignment]
    for _ in range(3):
        verdict = result_of(checks.dmarc([" <ceo@bank.example>"], [], Spf("fail"), "bank.example"))
        assert (verdict.result, verdict.disposition) == ("fail", "reject")
    assert pooled == [" <ceo@bank.example>"]  # the first one filled the cache; the rest did not wait
    # np= needs "does the domain exist?", which is never cached: always in the pool.
    for _ in range(2):
        verdict = result_of(checks.dmarc([" <x@gone.np.example>"], [], Spf("fail"), "np.example"))
        assert (verdict.result, verdict.policy) == ("fail", "reject")
    assert pooled == [" <ceo@bank.example>"] + [" <x@gone.np.example>"] * 2


@pytest.mark.parametrize(("sign_in_pool", "bits", "in_pool"), [
    (False, 2048, False), (False, 3072, True), (True, 2048, True)])
def test_quick_signatures_are_made_on_the_reactor_unless_sign_in_pool(
        sign_in_pool: bool, bits: int, in_pool: bool) -> None:
    from mailplugins.dkim_keys import generate_key
    from milterd.dkim import SigningKey

    rsa_pem, _public, _bits = generate_key("rsa", bits)
    ed_pem, _public, _bits = generate_key("ed25519")

    class Keys:
        def signing_keys(self, domain: str) -> list[Any]:
            return [SigningKey(domain, "r", "rsa-sha256", rsa_pem),
                    SigningKey(domain, "e", "ed25519-sha256", ed_pem)]

    pooled: list[Any] = []

    def cpu_run(fn: Any, *args: Any) -> Deferred[Any]:
        pooled.append(fn)
        return sync_run(fn, *args)

    checks = LiveChecks(milterd_config(sign_in_pool=sign_in_pool), store=make_store(),
                        db_run=sync_run, cpu_run=cpu_run, dns_run=sync_run, clock=Clock(),
                        delimiters="+", key_store=Keys(), txt_lookup=lambda name: None)
    signer = result_of(checks.signer("example.org", [("From", " a@example.org")]))
    signer.feed(b"Hello\r\n")
    assert len(result_of(checks.sign(signer))) == 2
    assert len(pooled) == (1 if in_pool else 0)
