"""The records a domain publishes (mailplugins.dns_records) and the ``dns:`` config section."""

from __future__ import annotations

from datetime import datetime

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.zone
import pytest

from mailplugins.config import ConfigError, parse_config
from mailplugins.config.dnsrecords import DnsConfig, default_mx
from mailplugins.dkim_keys import DkimKeyRecord, generate_key
from mailplugins.dns import DnsTempError
from mailplugins.dns_records import (
    check_domain,
    dmarc_value,
    expected_records,
    quote_txt,
    render_zone,
    split_txt,
)

CONFIG = DnsConfig(mx=("mail.example.org", "backup.example.net"), dmarc_rua=("dmarc@example.org",))
WHEN = datetime(2026, 12, 4, 12, 0)


def _key(key_id: int, selector: str, state: str, key_type: str = "rsa", bits: int = 2048,
         public: str | None = None) -> DkimKeyRecord:
    if public is None:
        public = generate_key(key_type, bits if key_type == "rsa" else None)[1]
    return DkimKeyRecord(key_id, "example.org", selector, key_type, bits, public, state, WHEN,
                         WHEN if state != "pending" else None, WHEN if state == "retired" else None)


def test_split_txt_edges() -> None:
    assert split_txt("") == [""]
    assert split_txt("a" * 255) == ["a" * 255]
    assert split_txt("a" * 256) == ["a" * 255, "a"]
    assert split_txt("ab" * 300) == ["ab" * 127 + "a", "b" + "ab" * 127, "ab" * 45]
    assert quote_txt(['say "hi"', "back\\slash"]) == '"say \\"hi\\"" "back\\\\slash"'


def test_4096_bit_key_record_is_split_and_reassembles_exactly() -> None:
    key = _key(1, "big", "pending", bits=4096)
    [record] = [r for r in expected_records("example.org", CONFIG, [key]) if r.purpose == "DKIM"]
    value = key.txt_value()
    assert 2 * 255 < len(value) <= 3 * 255  # a 4096-bit key needs three strings
    strings = record.strings()
    assert len(strings) == 3 and all(len(s) == 255 for s in strings[:-1]) and 0 < len(strings[-1]) <= 255
    assert "".join(strings) == value
    line = record.zone_line(3600)
    assert line.startswith("big._domainkey.example.org. 3600 IN TXT \"v=DKIM1; k=rsa; p=")
    # What a name server loads from the line is one record whose strings join to the value.
    zone = dns.zone.from_text(f"$ORIGIN example.org.\n@ 3600 IN SOA ns hostmaster 1 2 3 4 5\n"
                              f"@ 3600 IN NS ns\n{line}\n", relativize=False)
    rdataset = zone.find_rdataset("big._domainkey.example.org.", dns.rdatatype.TXT)
    [rdata] = list(rdataset)
    assert [len(s) for s in rdata.strings] == [len(s) for s in strings]
    assert b"".join(rdata.strings).decode() == value
    # And it survives a wire round trip (what a verifier receives).
    wire = rdata.to_digestable()
    again = dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.TXT, wire, 0, len(wire))
    assert b"".join(again.strings).decode() == value  # type: ignore[attr-defined]


def test_expected_records_and_zone_text() -> None:
    pending = _key(1, "mp202612r", "pending")
    active = _key(2, "mp202611e", "active", "ed25519", 256)
    retired = _key(3, "mp202601r", "retired")
    other = DkimKeyRecord(4, "example.net", "x", "ed25519", 256, "AAAA", "active", WHEN, WHEN, None)
    records = expected_records("example.org", CONFIG, [pending, active, retired, other], signing=[2])
    assert [(r.name, r.rtype, r.purpose) for r in records] == [
        ("example.org", "MX", "MX"),
        ("example.org", "MX", "MX"),
        ("example.org", "TXT", "SPF"),
        ("mp202612r._domainkey.example.org", "TXT", "DKIM"),
        ("mp202611e._domainkey.example.org", "TXT", "DKIM"),
        ("_dmarc.example.org", "TXT", "DMARC"),
    ]
    text = render_zone(records, 600)
    lines = text.splitlines()
    assert lines[:3] == ["example.org. 600 IN MX 10 mail.example.org.",
                         "example.org. 600 IN MX 20 backup.example.net.",
                         'example.org. 600 IN TXT "v=spf1 mx -all"']
    assert "; DKIM mp202612r (rsa 2048) pending: publish this, then 'mailplugins dkim activate " \
           "example.org mp202612r'" in lines
    assert "; DKIM mp202611e (ed25519) signing, active since 2026-12-04" in lines
    assert lines[-1] == ('_dmarc.example.org. 600 IN TXT '
                         '"v=DMARC1; p=quarantine; rua=mailto:dmarc@example.org"')
    assert "mp202601r" not in text and "example.net." not in text.replace("backup.example.net.", "")
    # The whole output loads as a zone (comments included).
    zone = dns.zone.from_text("$ORIGIN example.org.\n@ 600 IN SOA ns hostmaster 1 2 3 4 5\n"
                              "@ 600 IN NS ns\n" + text, relativize=False)
    assert len(list(zone.iterate_rdatas(dns.rdatatype.TXT))) == 4
    assert records[3].as_dict(600)["strings"] == split_txt(pending.txt_value())


def test_dmarc_is_rfc9989_form() -> None:
    assert dmarc_value(DnsConfig(mx=("m.example",))) == "v=DMARC1; p=quarantine"
    assert dmarc_value(DnsConfig(mx=("m.example",), dmarc_policy="reject",
                                 dmarc_rua=("a@example.org", "b@example.net"))) == (
        "v=DMARC1; p=reject; rua=mailto:a@example.org,mailto:b@example.net")


class FakeDns:
    def __init__(self) -> None:
        self.txt: dict[str, list[bytes] | Exception | None] = {}
        self.mx: dict[str, list[tuple[int, str]] | None] = {}

    def lookup_txt(self, name: str) -> list[bytes] | None:
        found = self.txt.get(name)
        if isinstance(found, Exception):
            raise found
        return found

    def lookup_mx(self, name: str) -> list[tuple[int, str]] | None:
        return self.mx.get(name)

    def check(self, keys: list[DkimKeyRecord], retired: list[DkimKeyRecord] = ()) -> list[str]:  # type: ignore[assignment]
        expected = expected_records("example.org", CONFIG, keys)
        return check_domain("example.org", expected, list(retired), self.lookup_txt, self.lookup_mx)


def test_check_domain_reports_each_missing_or_different_record() -> None:
    active = _key(1, "act", "active", "ed25519", 256)
    pending = _key(2, "pend", "pending", "ed25519", 256)
    retired = _key(3, "old", "retired", "ed25519", 256)
    fake = FakeDns()
    assert fake.check([active, pending], [retired]) == [
        "example.org MX: mail.example.org is not among the MX records (there are none)",
        "example.org MX: backup.example.net is not among the MX records (there are none)",
        'example.org TXT: no SPF record (want "v=spf1 mx -all")',
        "act._domainkey.example.org TXT: active DKIM key act is not published: mail signed with it "
        "fails DKIM",
        "pend._domainkey.example.org TXT: pending DKIM key pend is not published yet",
        '_dmarc.example.org TXT: no DMARC record (want "v=DMARC1; p=quarantine; '
        'rua=mailto:dmarc@example.org")',
    ]
    fake.mx["example.org"] = [(5, "Mail.Example.org."), (20, "backup.example.net.")]
    fake.txt["example.org"] = [b"google-site-verification=x", b"v=spf1  MX -all"]
    fake.txt["act._domainkey.example.org"] = [active.txt_value().encode()]
    fake.txt["pend._domainkey.example.org"] = [
        f"v=DKIM1; k=ed25519; p={pending.public_key[:10]} {pending.public_key[10:]}".encode()]
    fake.txt["_dmarc.example.org"] = [b"v=DMARC1; p=quarantine; rua=mailto:dmarc@example.org; fo=1"]
    assert fake.check([active, pending], [retired]) == []
    fake.mx["example.org"] = [(10, "mx.elsewhere.example")]
    fake.txt["example.org"] = [b"v=spf1 mx -all", b"v=spf1 a -all"]
    fake.txt["act._domainkey.example.org"] = [pending.txt_value().encode()]
    fake.txt["_dmarc.example.org"] = [b"v=DMARC1; p=none"]
    fake.txt["old._domainkey.example.org"] = [retired.txt_value().encode()]
    assert fake.check([active, pending], [retired]) == [
        "example.org MX: mail.example.org is not among mx.elsewhere.example",
        "example.org MX: backup.example.net is not among mx.elsewhere.example",
        "example.org TXT: 2 SPF records (a permerror for receivers)",
        "act._domainkey.example.org TXT: active DKIM key act differs from the published record: "
        "its p= is another key",
        "_dmarc.example.org TXT: DMARC record has p=none, want p=quarantine; rua=(none), "
        "want rua=mailto:dmarc@example.org",
        "old._domainkey.example.org TXT: key old is retired but still published (remove the record)",
    ]
    fake.txt["example.org"] = [b"v=spf1 a -all"]
    fake.txt["_dmarc.example.org"] = DnsTempError("_dmarc.example.org: DNS timed out after 5s")
    problems = fake.check([], [])
    assert 'example.org TXT: SPF is "v=spf1 a -all", want "v=spf1 mx -all"' in problems
    assert "_dmarc.example.org TXT: lookup failed: _dmarc.example.org: DNS timed out after 5s" in problems
    fake.txt["_dmarc.example.org"] = [b"v=DMARC1; p=quarantine", b"v=DMARC1; p=reject"]
    assert "_dmarc.example.org TXT: 2 DMARC records (receivers ignore them all)" in fake.check([], [])


def _with(dns_section: dict[str, object]) -> dict[str, object]:
    raw: dict[str, object] = {"database": {"url": "sqlite://"}}
    if dns_section:
        raw["dns"] = dns_section
    return raw


def test_dns_section() -> None:
    assert parse_config(_with({})).dns == DnsConfig(mx=default_mx())
    config = parse_config(_with({"mx": "Mail.Example.org.", "spf": "v=spf1  ip4:192.0.2.1 -all",
                                "dmarc_policy": "reject", "dmarc_rua": "r@example.org",
                                "ttl": "1h"})).dns
    assert config == DnsConfig(mx=("mail.example.org",), spf="v=spf1 ip4:192.0.2.1 -all",
                               dmarc_policy="reject", dmarc_rua=("r@example.org",), ttl=3600)
    assert parse_config(_with({"mx": ["a.example", "b.example"]})).dns.mx == ("a.example", "b.example")
    for section, message in (
        ({"mx": []}, "dns.mx: needs at least one host"),
        ({"mx": ["ok.example", "bad host"]}, "dns.mx[1]: expected a host name"),
        ({"spf": "include:x"}, "dns.spf: expected a record starting with v=spf1"),
        ({"spf": "v=spf1 \u00e9"}, "dns.spf: must be printable ASCII"),
        ({"dmarc_policy": "block"}, "dns.dmarc_policy: must be one of none, quarantine, reject"),
        ({"dmarc_rua": ["no-at-sign"]}, "dns.dmarc_rua[0]: expected an address"),
        ({"ttl": 5}, "dns.ttl"),
        ({"mxx": "a"}, "dns.mxx"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(_with(section))
        assert str(caught.value).startswith(message), str(caught.value)
