"""mailplugins.spf (shared by policyd and milterd) asking a stub DNS server over the wire.

tests/unit/test_spf.py stubs pyspf's lookup function; here the DNS path is real: the configured
nameservers become the resolver pyspf asks, and a SERVFAIL comes back as ``temperror``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailplugins.spf import clean, spf_lookup, use_nameservers
from tests.support.stubdns import StubDNS, stub_dns


@pytest.fixture
def stub() -> Iterator[StubDNS]:
    with stub_dns() as server:
        server.add("sender.example", "TXT", b"v=spf1 ip4:192.0.2.0/24 include:inc.example -all")
        server.add("inc.example", "TXT", b"v=spf1 ip6:2001:db8::/32 -all")
        server.add("broken.example", "TXT", b"v=spf1 include:fail.example -all")
        server.servfail.add("fail.example")
        use_nameservers([server.nameserver])
        try:
            yield server
        finally:
            use_nameservers(())


@pytest.mark.parametrize(("client", "sender", "result"), [
    ("192.0.2.7", "a@sender.example", "pass"),
    ("2001:db8::7", "a@sender.example", "pass"),
    ("203.0.113.1", "a@sender.example", "fail"),
    ("203.0.113.1", "a@nowhere.example", "none"),
    ("203.0.113.1", "a@broken.example", "temperror"),
])
def test_results_over_dns(stub: StubDNS, client: str, sender: str, result: str) -> None:
    found = spf_lookup(client, sender, "helo.example", "mx.example.org", 2.0)
    assert found.result == result
    assert ("sender.example", "TXT") in {q[:2] for q in stub.queries} or sender != "a@sender.example"


def test_answers_cached_when_asked(stub: StubDNS) -> None:
    """With ``cache_size`` (milterd), a second check asks DNS nothing; without (policyd), the
    same check asks again."""
    use_nameservers([f"127.0.0.1:{stub.port}"], cache_size=100)
    first = spf_lookup("192.0.2.7", "a@sender.example", "helo.example", "mx.example.org", 2.0)
    asked = len(stub.queries)
    assert first.result == "pass" and asked >= 1
    again = spf_lookup("192.0.2.8", "b@sender.example", "helo.example", "mx.example.org", 2.0)
    assert again.result == "pass" and len(stub.queries) == asked
    use_nameservers([f"127.0.0.1:{stub.port}"])
    spf_lookup("192.0.2.7", "a@sender.example", "helo.example", "mx.example.org", 2.0)
    assert len(stub.queries) > asked


def test_clean_bounds_and_flattens() -> None:
    assert clean("a\r\nb\x00") == "a??b?"
    assert len(clean("x" * 5000)) == 900
