"""mailplugins.dns against a stub DNS server on loopback (real UDP/TCP exchanges, no network)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailplugins.dns import DnsTempError, mx_records, name_exists, parse_nameserver, txt_records
from tests.support.stubdns import StubDNS, stub_dns


@pytest.fixture
def stub() -> Iterator[StubDNS]:
    with stub_dns() as server:
        yield server


def test_txt_record_strings_are_joined(stub: StubDNS) -> None:
    stub.add("sel._domainkey.example.com", "TXT", [b"v=DKIM1; k=rsa; ", b"p=ABC"])
    stub.add("sel._domainkey.example.com", "TXT", b"second")
    found = txt_records("sel._domainkey.example.com", nameservers=[stub.nameserver], timeout=2)
    assert sorted(found or []) == [b"second", b"v=DKIM1; k=rsa; p=ABC"]


def test_name_is_absolute_and_case_insensitive(stub: StubDNS) -> None:
    stub.add("example.com", "TXT", b"v=spf1 -all")
    assert txt_records("EXAMPLE.com.", nameservers=[stub.nameserver], timeout=2) == [b"v=spf1 -all"]
    assert stub.queries[-1][:2] == ("example.com", "TXT")


def test_nxdomain_and_nodata_are_none(stub: StubDNS) -> None:
    stub.add("example.com", "MX", (10, "mx.example.com"))
    assert txt_records("missing.example.com", nameservers=[stub.nameserver], timeout=2) is None
    assert txt_records("example.com", nameservers=[stub.nameserver], timeout=2) is None


def test_servfail_is_a_temperror(stub: StubDNS) -> None:
    stub.servfail.add("broken.example.com")
    with pytest.raises(DnsTempError, match="broken.example.com"):
        txt_records("broken.example.com", nameservers=[stub.nameserver], timeout=2)


def test_timeout_is_a_temperror(stub: StubDNS) -> None:
    stub.silent.add("slow.example.com")
    with pytest.raises(DnsTempError, match="timed out"):
        txt_records("slow.example.com", nameservers=[stub.nameserver], timeout=0.3)


def test_long_record_comes_over_tcp(stub: StubDNS) -> None:
    """A 4096-bit RSA key record does not fit in 512 bytes of UDP: TC, then TCP."""
    strings = [b"v=DKIM1; k=rsa; p="] + [b"A" * 255] * 3
    stub.add("big._domainkey.example.com", "TXT", strings)
    found = txt_records("big._domainkey.example.com", nameservers=[stub.nameserver], timeout=2)
    assert found == [b"".join(strings)]
    assert [q[2] for q in stub.queries] == ["udp", "tcp"]


def test_mx_records_sorted(stub: StubDNS) -> None:
    stub.add("example.com", "MX", (20, "backup.example.com"), (10, "MX.example.com"))
    assert mx_records("example.com", nameservers=[stub.nameserver], timeout=2) == [
        (10, "mx.example.com"), (20, "backup.example.com")]
    assert mx_records("none.example.com", nameservers=[stub.nameserver], timeout=2) is None


def test_nameservers_as_tuples(stub: StubDNS) -> None:
    stub.add("example.com", "TXT", b"x")
    assert txt_records("example.com", nameservers=[("127.0.0.1", stub.port)], timeout=2) == [b"x"]


def test_second_nameserver_used_when_first_fails(stub: StubDNS) -> None:
    with stub_dns() as bad:
        bad.servfail.add("example.com")
        stub.add("example.com", "TXT", b"ok")
        found = txt_records("example.com", nameservers=[bad.nameserver, stub.nameserver], timeout=2)
    assert found == [b"ok"]


def test_not_a_dns_name() -> None:
    with pytest.raises(ValueError, match="not a DNS name"):
        txt_records("a" * 64 + ".example.com", nameservers=["127.0.0.1:9"], timeout=0.1)


@pytest.mark.parametrize(("text", "parsed"), [
    ("192.0.2.53", ("192.0.2.53", 53)),
    ("192.0.2.53:5353", ("192.0.2.53", 5353)),
    ("2001:db8::53", ("2001:db8::53", 53)),
    ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
])
def test_parse_nameserver(text: str, parsed: tuple[str, int]) -> None:
    assert parse_nameserver(text) == parsed


@pytest.mark.parametrize("text", ["ns.example.com", "192.0.2.1:0", "192.0.2.1:x", "[::1", "[::1]x"])
def test_parse_nameserver_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_nameserver(text)


def test_name_exists(stub: StubDNS) -> None:
    stub.add("mail.example.com", "MX", (10, "mx.example.com"))
    assert name_exists("mail.example.com", nameservers=[stub.nameserver], timeout=2)
    assert not name_exists("nothing.example.com", nameservers=[stub.nameserver], timeout=2)
    stub.servfail.add("broken.example.com")
    with pytest.raises(DnsTempError):
        name_exists("broken.example.com", nameservers=[stub.nameserver], timeout=2)


def test_no_resolver_configuration_is_a_temperror(monkeypatch: pytest.MonkeyPatch) -> None:
    import dns.resolver

    from mailplugins import dns as core_dns

    def broken(servers: object) -> dns.resolver.Resolver:
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(core_dns, "_resolver", broken)
    with pytest.raises(DnsTempError, match="NoResolverConfiguration"):
        txt_records("example.com", timeout=0.5)
