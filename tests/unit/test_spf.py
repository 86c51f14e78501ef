"""SPF through pyspf with DNS stubbed (this machine has no network)."""

from __future__ import annotations

from typing import Any

import pytest
import spf as pyspf
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mailplugins.config.fields import ConfigError, Fields
from mailplugins.config.policy_state import SPFConfig, parse_spf
from policyd.codec import PolicyRequest
from policyd.spf import SPFChecker, spf_lookup
from tests.support.sync import result_of, sync_run

RECORDS = {
    "sender.example": "v=spf1 ip4:192.0.2.0/24 -all",
    "soft.example": "v=spf1 ip4:192.0.2.0/24 ~all",
    "neutral.example": "v=spf1 ?all",
    "broken.example": "v=spf1 ip4:192.0.2.0/24 bogus -all",
    "helo.sender.example": "v=spf1 a -all",
}
A_RECORDS = {"helo.sender.example": ["198.51.100.9"]}


@pytest.fixture(autouse=True)
def stub_dns(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Answer pyspf's lookups from RECORDS; ``temp.example`` times out."""
    asked: list[tuple[str, str]] = []

    def lookup(name: str, qtype: str, strict: Any = True, timeout: Any = 20) -> list[Any]:
        asked.append((name, qtype))
        if name.endswith("temp.example"):
            raise pyspf.TempError("DNS timed out (stub)")
        if qtype == "TXT" and name in RECORDS:
            return [((name, "TXT"), [RECORDS[name].encode()])]
        if qtype == "A" and name in A_RECORDS:
            return [((name, "A"), address) for address in A_RECORDS[name]]
        return []

    monkeypatch.setattr(pyspf, "DNSLookup", lookup)
    return asked


def request(**attrs: str) -> PolicyRequest:
    base = {"protocol_state": "RCPT", "client_address": "192.0.2.10",
            "helo_name": "helo.sender.example", "sender": "alice@sender.example",
            "recipient": "bob@example.org", "instance": "i.1"}
    base.update(attrs)
    return PolicyRequest(base)


@pytest.mark.parametrize(("sender", "client", "result"), [
    ("alice@sender.example", "192.0.2.10", "pass"),
    ("alice@sender.example", "203.0.113.1", "fail"),
    ("alice@soft.example", "203.0.113.1", "softfail"),
    ("alice@neutral.example", "203.0.113.1", "neutral"),
    ("alice@nothing.example", "203.0.113.1", "none"),
    ("alice@broken.example", "203.0.113.1", "permerror"),
    ("alice@temp.example", "203.0.113.1", "temperror"),
    ("", "198.51.100.9", "pass"),       # null sender: the HELO identity
    ("", "203.0.113.1", "fail"),
])
def test_results(sender: str, client: str, result: str) -> None:
    found = spf_lookup(client, sender, "helo.sender.example", "mx.example.org", 1.0)
    assert found.result == result
    assert "\n" not in found.header and found.header.lower().startswith(result[:4])
    if sender:
        assert "identity=mailfrom" in found.header
    else:
        assert "identity=helo" in found.header


def test_odd_client_address_is_a_permerror() -> None:
    assert spf_lookup("not-an-ip", "a@sender.example", "h", "mx", 1.0).result == "permerror"


def checker(**config: Any) -> SPFChecker:
    return SPFChecker(SPFConfig(receiver="mx.example.org", **config), sync_run, Clock())


def check(c: SPFChecker, **attrs: str) -> Any:
    return result_of(Deferred.fromCoroutine(c.check(request(**attrs))))


def test_actions_per_config() -> None:
    default = checker()
    passed = check(default)
    assert passed.action is None and passed.header.startswith("Received-SPF: Pass (mx.example.org:")
    assert check(default, client_address="203.0.113.1").action == "550 5.7.23 SPF validation failed"
    assert check(default, client_address="203.0.113.1", sender="a@soft.example").action is None
    assert check(default, sender="a@temp.example").action is None
    soft = checker(reject="softfail")
    assert check(soft, client_address="203.0.113.1", sender="a@soft.example").action == (
        "550 5.7.23 SPF validation failed")
    never = checker(reject="never", header=False)
    outcome = check(never, client_address="203.0.113.1")
    assert (outcome.result, outcome.action, outcome.header) == ("fail", None, None)
    defer = checker(temperror="defer")
    assert check(defer, sender="a@temp.example").action == (
        "451 4.4.3 SPF temporary DNS error, try again later")


def test_late_lookup_is_a_temperror_within_the_timeout() -> None:
    clock = Clock()
    c = SPFChecker(SPFConfig(receiver="mx", timeout=1.0, temperror="defer"),
                   lambda fn, *a, **k: Deferred(), clock)
    pending = Deferred.fromCoroutine(c.check(request()))
    assert not pending.called
    clock.advance(1.2)
    outcome = result_of(pending)
    assert outcome.result == "temperror" and outcome.action is not None


def test_config() -> None:
    config = parse_spf(Fields({"reject": "softfail", "temperror": "defer", "receiver": "mx"},
                              "policyd.spf"))
    assert config is not None and config.reject == "softfail" and config.temperror == "defer"
    with pytest.raises(ConfigError, match="policyd.spf.reject"):
        parse_spf(Fields({"reject": "always"}, "policyd.spf"))
    with pytest.raises(ConfigError, match="policyd.spf.reject_action"):
        parse_spf(Fields({"reject_action": "NOPE"}, "policyd.spf"))


def test_through_the_joined_checks_with_real_pyspf() -> None:
    from policyd.message_checks import StatefulChecks

    clock = Clock()
    checks = StatefulChecks(engine=None, db_run=sync_run, spf_run=sync_run,
                            clock=clock, budget=2.0, spf=SPFConfig(receiver="mx.example.org"))

    def rcpt(**attrs: str) -> Any:
        return result_of(Deferred.fromCoroutine(checks.at_rcpt(request(**attrs), False)))

    first = rcpt()
    assert first.startswith("PREPEND Received-SPF: Pass (mx.example.org: domain of "
                            "sender.example designates 192.0.2.10 as permitted sender)")
    assert rcpt(recipient="carol@example.org") is None  # once per message
    assert rcpt(instance="i.2", client_address="203.0.113.9") == "550 5.7.23 SPF validation failed"
    assert rcpt(instance="i.2", client_address="203.0.113.9", recipient="x@example.org") == (
        "550 5.7.23 SPF validation failed")
    # Authenticated or mynetworks clients are not checked at all.
    assert result_of(Deferred.fromCoroutine(checks.at_rcpt(
        request(instance="i.3", client_address="203.0.113.9"), True))) is None


def test_nameservers_parse_with_optional_ports() -> None:
    config = parse_spf(Fields({"nameservers": ["192.0.2.53", "127.0.0.1:5353", "2001:db8::53",
                                               "[2001:db8::54]:5300"]}, "policyd.spf"))
    assert config is not None
    assert config.nameservers == (("192.0.2.53", 53), ("127.0.0.1", 5353), ("2001:db8::53", 53),
                                  ("2001:db8::54", 5300))


@pytest.mark.parametrize(
    ("item", "message"),
    [("dns.example", "expected an IP address"), ("127.0.0.1:0", "expected a port"),
     ("127.0.0.1:x", "expected a port"), ("[2001:db8::1", "expected [address]:port")],
)
def test_bad_nameservers_name_the_item(item: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_spf(Fields({"nameservers": ["192.0.2.1", item]}, "policyd.spf"))
    assert "policyd.spf.nameservers[1]" in str(caught.value) and message in str(caught.value)


def test_configured_nameservers_become_the_resolver_pyspf_asks() -> None:
    import dns.resolver

    from policyd.spf import use_nameservers

    try:
        use_nameservers((("127.0.0.1", 5353),))
        servers = dns.resolver.get_default_resolver().nameservers
        assert [(s.address, s.port) for s in servers] == [("127.0.0.1", 5353)]
    finally:
        use_nameservers(())
    assert dns.resolver.get_default_resolver().nameservers != servers
