# -*- test-case-name: tests.unit.test_dns_records -*-
"""The DNS records a mail domain publishes, as zone-file lines, and the check of what is live.

``mailplugins dns-records`` prints :func:`expected_records`; ``mailplugins doctor --dns`` looks
each one up and reports, one line each, what :func:`check_domain` finds missing or different.
Pure functions of the config, the keys and the answers (lookups are passed in), so both are
tested without DNS; the CLI does the lookups through :mod:`mailplugins.dns`.

TXT records longer than 255 characters (every RSA key record) are written as several strings of
one record (RFC 1035 3.3.14, RFC 6376 3.6.2.2): resolvers hand verifiers the strings joined, so
the split can fall anywhere, and the strings are cut at 255 characters exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailplugins.config.dnsrecords import DnsConfig
from mailplugins.dkim_keys import DkimKeyRecord, key_record_problem, parse_tags
from mailplugins.dns import DnsTempError

__all__ = [
    "TXT_STRING_MAX",
    "DnsRecord",
    "check_domain",
    "dmarc_value",
    "expected_records",
    "quote_txt",
    "split_txt",
]

#: One character-string of a TXT record holds at most 255 bytes (RFC 1035 3.3).
TXT_STRING_MAX = 255

TxtLookup = Callable[[str], "list[bytes] | None"]
MxLookup = Callable[[str], "list[tuple[int, str]] | None"]


def split_txt(value: str, limit: int = TXT_STRING_MAX) -> list[str]:
    """``value`` cut into strings of at most ``limit`` bytes (ASCII: characters); [""] if empty."""
    data = value.encode("ascii")
    return [data[i:i + limit].decode("ascii") for i in range(0, len(data), limit)] or [""]


def quote_txt(strings: Sequence[str]) -> str:
    """Zone-file form of a TXT record's strings: each quoted, ``"`` and ``\\`` escaped."""
    return " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in strings)


@dataclass(frozen=True)
class DnsRecord:
    """One record to publish. ``value`` is the whole text (TXT unsplit; MX ``pref host.``)."""

    name: str
    rtype: str
    value: str
    #: What it is for: ``MX``, ``SPF``, ``DKIM``, ``DMARC``.
    purpose: str
    #: A zone-file comment (e.g. the key's state), or empty.
    comment: str = ""
    #: The DKIM key the record publishes, if any.
    key: DkimKeyRecord | None = None

    def strings(self) -> list[str]:
        return split_txt(self.value) if self.rtype == "TXT" else [self.value]

    def zone_line(self, ttl: int) -> str:
        data = quote_txt(self.strings()) if self.rtype == "TXT" else self.value
        return f"{self.name}. {ttl} IN {self.rtype} {data}"

    def as_dict(self, ttl: int) -> dict[str, object]:
        return {"name": self.name, "type": self.rtype, "ttl": ttl, "purpose": self.purpose,
                "value": self.value, "strings": self.strings(), "comment": self.comment,
                "zone_line": self.zone_line(ttl)}


def dmarc_value(config: DnsConfig) -> str:
    """The DMARC record in RFC 9989 form (no pct/rf/ri, which RFC 9989 removed)."""
    value = f"v=DMARC1; p={config.dmarc_policy}"
    if config.dmarc_rua:
        value += "; rua=" + ",".join(f"mailto:{address}" for address in config.dmarc_rua)
    return value


def _key_comment(key: DkimKeyRecord, signing: bool) -> str:
    size = f"{key.key_type} {key.bits}" if key.key_type == "rsa" else key.key_type
    if key.state == "pending":
        return (f"DKIM {key.selector} ({size}) pending: publish this, then "
                f"'mailplugins dkim activate {key.domain} {key.selector}'")
    since = f"{key.activated_at:%Y-%m-%d}" if key.activated_at else "?"
    role = "signing" if signing else "active, no longer signing: retire it once its mail is delivered"
    return f"DKIM {key.selector} ({size}) {role}, active since {since}"


def expected_records(domain: str, config: DnsConfig, keys: Sequence[DkimKeyRecord],
                     signing: Sequence[int] = ()) -> list[DnsRecord]:
    """MX, SPF, one DKIM record per pending or active key of ``domain``, DMARC."""
    records = [DnsRecord(domain, "MX", f"{10 * (i + 1)} {host}.", "MX")
               for i, host in enumerate(config.mx)]
    records.append(DnsRecord(domain, "TXT", config.spf, "SPF"))
    for key in keys:
        if key.domain == domain and key.state in ("pending", "active"):
            records.append(DnsRecord(key.dns_name, "TXT", key.txt_value(), "DKIM",
                                     _key_comment(key, key.id in signing), key))
    records.append(DnsRecord(f"_dmarc.{domain}", "TXT", dmarc_value(config), "DMARC"))
    return records


def render_zone(records: Sequence[DnsRecord], ttl: int) -> str:
    lines: list[str] = []
    for record in records:
        if record.comment:
            lines.append(f"; {record.comment}")
        lines.append(record.zone_line(ttl))
    return "\n".join(lines) + "\n"


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip()).lower()


def _starting(answers: list[bytes] | None, prefix: str) -> list[str]:
    texts = [a.decode("ascii", "replace") for a in answers or []]
    return [t for t in texts if _normal(t).startswith(prefix)]


def _check_dmarc(record: DnsRecord, published: list[str]) -> str | None:
    if not published:
        return f"{record.name} TXT: no DMARC record (want \"{record.value}\")"
    if len(published) > 1:
        return f"{record.name} TXT: {len(published)} DMARC records (receivers ignore them all)"
    want, have = parse_tags(record.value), parse_tags(published[0])
    different = [f"{tag}={have.get(tag, '(none)')}, want {tag}={value}"
                 for tag, value in want.items() if _normal(have.get(tag, "")) != _normal(value)]
    return f"{record.name} TXT: DMARC record has {'; '.join(different)}" if different else None


def check_domain(domain: str, expected: Sequence[DnsRecord], retired: Sequence[DkimKeyRecord],
                 txt: TxtLookup, mx: MxLookup) -> list[str]:
    """One line per record missing or different.

    A failed lookup (``txt``/``mx`` raise :class:`~mailplugins.dns.DnsTempError`) becomes a line
    saying so: the record may be right, it could not be read.
    """
    problems: list[str] = []
    mx_hosts = [r.value.split()[1].rstrip(".").lower() for r in expected if r.rtype == "MX"]
    if mx_hosts:
        try:
            live = mx(domain)
        except DnsTempError as exc:
            problems.append(f"{domain} MX: lookup failed: {exc}")
        else:
            have = [host.rstrip(".").lower() for _pref, host in live or []]
            for host in mx_hosts:
                if host not in have:
                    problems.append(f"{domain} MX: {host} is not among "
                                    f"{', '.join(have) if have else 'the MX records (there are none)'}")
    for record in expected:
        if record.rtype != "TXT":
            continue
        try:
            answers = txt(record.name)
        except DnsTempError as exc:
            problems.append(f"{record.name} TXT: lookup failed: {exc}")
            continue
        if record.purpose == "SPF":
            spf = _starting(answers, "v=spf1")
            if not spf:
                problems.append(f"{record.name} TXT: no SPF record (want \"{record.value}\")")
            elif len(spf) > 1:
                problems.append(f"{record.name} TXT: {len(spf)} SPF records (a permerror for receivers)")
            elif _normal(spf[0]) != _normal(record.value):
                problems.append(f"{record.name} TXT: SPF is \"{spf[0]}\", want \"{record.value}\"")
        elif record.purpose == "DMARC":
            problem = _check_dmarc(record, _starting(answers, "v=dmarc1"))
            if problem:
                problems.append(problem)
        elif record.key is not None:
            problem = _check_key(record.key, answers)
            if problem:
                problems.append(f"{record.name} TXT: {problem}")
    for key in retired:
        try:
            answers = txt(key.dns_name)
        except DnsTempError:
            continue  # a retired key's record is only tidiness
        if answers and any(key_record_problem(a, key) is None for a in answers):
            problems.append(f"{key.dns_name} TXT: key {key.selector} is retired but still published "
                            "(remove the record)")
    return problems


def _check_key(key: DkimKeyRecord, answers: list[bytes] | None) -> str | None:
    which = f"{key.state} DKIM key {key.selector}"
    if not answers:
        if key.state == "active":
            return f"{which} is not published: mail signed with it fails DKIM"
        return f"{which} is not published yet"
    reasons = [key_record_problem(a, key) for a in answers]
    if None in reasons:
        return None
    return f"{which} differs from the published record: {reasons[0]}"
