"""DMARC (RFC 9989) evaluation with tables of DNS records (DNS injected)."""

from __future__ import annotations

import pytest

from mailplugins.dns import DnsTempError
from milterd.dkim import DkimResult
from milterd.dmarc import evaluate, from_domains, organizational_domain, parse_record

RECORDS: dict[str, str | list[str] | DnsTempError] = {
    "_dmarc.example.com": "v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@example.com",
    "_dmarc.strict.example": "v=DMARC1; p=reject; adkim=s; aspf=s",
    "_dmarc.none.example": "v=DMARC1; p=none",
    "_dmarc.testing.example": "v=DMARC1; p=reject; t=y",
    "_dmarc.np.example": "v=DMARC1; p=quarantine; np=reject",
    "_dmarc.old.example": "v=DMARC1; p=reject; pct=0; rf=afrf; ri=3600",
    "_dmarc.nop.example": "v=DMARC1; rua=mailto:r@nop.example",
    "_dmarc.nop-norua.example": "v=DMARC1; adkim=s",
    "_dmarc.two.example": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
    "_dmarc.notdmarc.example": "v=spf1 -all",
    "_dmarc.psd": "v=DMARC1; p=reject; psd=y",           # a public suffix operator's record
    "_dmarc.sub.own.psd": "v=DMARC1; p=none",
    "_dmarc.mail.deep.example": "v=DMARC1; p=quarantine",
    "_dmarc.deep.example": "v=DMARC1; p=reject",
    "_dmarc.tempfail.example": DnsTempError("SERVFAIL"),
}
EXISTING = {"example.com", "mail.example.com", "np.example", "real.np.example"}


class FakeDNS:
    def __init__(self, records: dict[str, str | list[str] | DnsTempError] = RECORDS) -> None:
        self.records = records
        self.asked: list[str] = []

    def lookup(self, name: str) -> list[bytes] | None:
        self.asked.append(name)
        found = self.records.get(name)
        if isinstance(found, DnsTempError):
            raise found
        if found is None:
            return None
        return [t.encode() for t in ([found] if isinstance(found, str) else found)]

    def exists(self, name: str) -> bool:
        return name in EXISTING


def dkim(domain: str, result: str = "pass") -> DkimResult:
    return DkimResult(result, domain, "sel", "rsa-sha256", "", "abcdefgh")


def run(from_value: str | list[str], dkims: list[DkimResult] = (), spf: str = "none",  # type: ignore[assignment]
        spf_domain: str = "", dns: FakeDNS | None = None) -> tuple[str, str, str, str]:
    values = [from_value] if isinstance(from_value, str) else from_value
    dns = dns or FakeDNS()
    found = evaluate(values, list(dkims), spf, spf_domain, dns.lookup, dns.exists)
    return found.result, found.header_from, found.policy, found.disposition


@pytest.mark.parametrize(("from_value", "dkims", "spf", "spf_domain", "expected"), [
    # aligned DKIM, strict or relaxed
    (" a@example.com", [dkim("example.com")], "fail", "x.example",
     ("pass", "example.com", "reject", "none")),
    (" a@example.com", [dkim("mail.example.com")], "none", "",
     ("pass", "example.com", "reject", "none")),
    (" a@strict.example", [dkim("mail.strict.example")], "none", "",
     ("fail", "strict.example", "reject", "reject")),
    # aligned SPF (MAIL FROM domain only), relaxed and strict
    (" a@example.com", [], "pass", "bounces.example.com", ("pass", "example.com", "reject", "none")),
    (" a@strict.example", [], "pass", "bounces.strict.example",
     ("fail", "strict.example", "reject", "reject")),
    (" a@strict.example", [], "pass", "STRICT.example.", ("pass", "strict.example", "reject", "none")),
    # passes that do not align, or do not pass
    (" a@example.com", [dkim("evil.example")], "pass", "evil.example",
     ("fail", "example.com", "reject", "reject")),
    (" a@example.com", [dkim("example.com", "fail")], "softfail", "example.com",
     ("fail", "example.com", "reject", "reject")),
    # subdomain policy sp=, np= for a non-existent subdomain, t=y
    (" a@mail.example.com", [], "none", "", ("fail", "mail.example.com", "quarantine", "quarantine")),
    (" a@nosuch.np.example", [], "none", "", ("fail", "nosuch.np.example", "reject", "reject")),
    (" a@real.np.example", [], "none", "", ("fail", "real.np.example", "quarantine", "quarantine")),
    (" a@testing.example", [], "none", "", ("fail", "testing.example", "reject", "none")),
    # pct/rf/ri are gone: pct=0 no longer softens p=reject
    (" a@old.example", [], "none", "", ("fail", "old.example", "reject", "reject")),
    # no record, several records, not a DMARC record: DMARC does not apply
    (" a@nothing.example", [], "fail", "nothing.example", ("none", "nothing.example", "none", "none")),
    (" a@two.example", [], "none", "", ("none", "two.example", "none", "none")),
    (" a@notdmarc.example", [], "none", "", ("none", "notdmarc.example", "none", "none")),
    # no valid p=: p=none when rua= names a report address, else no DMARC
    (" a@nop.example", [], "none", "", ("fail", "nop.example", "none", "none")),
    (" a@nop-norua.example", [], "none", "", ("none", "nop-norua.example", "none", "none")),
    # the PSD's policy for an organization without its own record
    (" a@shop.psd", [], "none", "", ("fail", "shop.psd", "reject", "reject")),
    # ... and the PSD boundary: own.psd aligns with sub.own.psd, other.psd does not
    (" a@sub.own.psd", [dkim("own.psd")], "none", "", ("pass", "sub.own.psd", "none", "none")),
    (" a@sub.own.psd", [dkim("other.psd")], "none", "", ("fail", "sub.own.psd", "none", "none")),
    # DNS failing for now
    (" a@tempfail.example", [dkim("tempfail.example")], "pass", "tempfail.example",
     ("temperror", "tempfail.example", "none", "none")),
    (" a@example.com", [dkim("other.example", "temperror")], "none", "",
     ("temperror", "example.com", "reject", "none")),
    (" a@example.com", [], "temperror", "example.com", ("temperror", "example.com", "reject", "none")),
    # display names, comments, IDN
    (' "Bob, the (boss)" <bob@Example.COM> (work)', [dkim("example.com")], "none", "",
     ("pass", "example.com", "reject", "none")),
])
def test_results(from_value: str, dkims: list[DkimResult], spf: str, spf_domain: str,
                 expected: tuple[str, str, str, str]) -> None:
    assert run(from_value, dkims, spf, spf_domain) == expected


@pytest.mark.parametrize(("from_value", "reason"), [
    ([], "no From header"),
    ([" a@example.com", " b@example.com"], "several From headers"),
    (" undisclosed-recipients:;", "no usable domain"),
    (" Alice <alice>", "no usable domain"),
    (" a@-bad-.example", "no usable domain"),
    (" a@localhost", "no usable domain"),
])
def test_from_header_problems_are_permerror(from_value: str | list[str], reason: str) -> None:
    values = [from_value] if isinstance(from_value, str) else from_value
    dns = FakeDNS()
    found = evaluate(values, [dkim("example.com")], "pass", "example.com", dns.lookup, dns.exists)
    assert (found.result, found.policy, found.disposition) == ("permerror", "none", "none")
    assert reason in found.reason
    assert dns.asked == []


def test_one_from_with_several_domains_is_exempt() -> None:
    assert run(" a@example.com, b@evil.example")[0] == "none"
    # Several addresses in one domain are evaluated once.
    assert run(" a@example.com, b@EXAMPLE.com", [dkim("example.com")])[0] == "pass"


def test_idn_from_domain_becomes_an_a_label() -> None:
    assert from_domains([" a@bücher.example"]) == (["xn--bcher-kva.example"], "")


@pytest.mark.parametrize(("start", "records", "org"), [
    ("a.mail.example.com", {"mail.example.com": "", "example.com": ""}, "example.com"),
    ("a.mail.example.com", {"com": "psd=y"}, "example.com"),
    ("a.b.example.co.uk", {"co.uk": "psd=y", "uk": "psd=y"}, "example.co.uk"),
    ("a.mail.example.com", {"mail.example.com": "psd=n", "example.com": ""}, "mail.example.com"),
    ("a.mail.example.com", {}, "a.mail.example.com"),
    ("example.com", {"example.com": "psd=y"}, "example.com"),   # psd=y at the start is ignored
])
def test_organizational_domain(start: str, records: dict[str, str], org: str) -> None:
    dns = FakeDNS({f"_dmarc.{name}": f"v=DMARC1; p=none; {tags}" for name, tags in records.items()})
    from milterd.dmarc import _Walker

    walk = _Walker(dns.lookup).walk(start)
    assert organizational_domain(start, walk) == org


def test_tree_walk_asks_at_most_five_names() -> None:
    dns = FakeDNS({})
    assert run(" a@a.b.c.d.e.mail.example.com", dns=dns)[0] == "none"
    assert dns.asked == ["_dmarc.a.b.c.d.e.mail.example.com", "_dmarc.e.mail.example.com",
                         "_dmarc.mail.example.com", "_dmarc.example.com", "_dmarc.com"]


def test_each_name_is_asked_once_and_no_walk_when_domains_match() -> None:
    dns = FakeDNS()
    run(" a@example.com", [dkim("example.com")], "pass", "example.com", dns=dns)
    assert dns.asked == ["_dmarc.example.com", "_dmarc.com"]
    dns = FakeDNS()
    run(" a@example.com", [dkim("mail.example.com"), dkim("mail.example.com")], dns=dns)
    assert sorted(dns.asked) == sorted(set(dns.asked))


def test_record_parsing() -> None:
    record = parse_record(b"v=DMARC1;p=Quarantine; sp=bogus; adkim=s; psd=y; t=y; x=1; pct=5")
    assert record is not None
    assert (record.p, record.sp, record.np, record.adkim, record.aspf, record.psd, record.testing) == (
        "quarantine", None, None, "s", "r", "y", True)
    assert parse_record(b"p=reject; v=DMARC1") is None
    assert parse_record(b"v=dmarc1; p=reject") is None
    assert parse_record(b"v=DMARC1 p=reject") is None
    assert parse_record(b"\xff") is None


def test_parse_record_is_reused_per_text() -> None:
    """Parsed once per record text (immutable, so shared between messages), bytes or str."""
    first = parse_record(b"v=DMARC1; p=reject; sp=none")
    assert first is parse_record(b"v=DMARC1; p=reject; sp=none")
    assert first is not None and (first.p, first.sp) == ("reject", "none")
    assert parse_record("v=DMARC1; p=quarantine") == parse_record(b"v=DMARC1; p=quarantine")
    assert parse_record(b"v=DMARC1; p=none") != parse_record(b"v=DMARC1; p=reject")
    assert parse_record(b"v=spf1 -all") is None
