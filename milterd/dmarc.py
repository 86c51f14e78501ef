# -*- test-case-name: tests.unit.test_dmarc -*-
"""DMARC (RFC 9989) evaluation for incoming mail: policy discovery, alignment, the result.

Pure logic with DNS injected: ``lookup(name)`` returns the TXT records at a name (``None`` for
none, raises :class:`~mailplugins.dns.DnsTempError` when DNS fails for now) and, optionally,
``exists(name)`` says whether a domain exists (for ``np=``). Both block; milterd runs
:func:`evaluate` in its DNS thread pool with :mod:`mailplugins.dns` behind them. Each name is
asked at most once per evaluation.

What RFC 9989 changed from RFC 7489, and what this follows:

- No Public Suffix List. The Organizational Domain comes from a DNS Tree Walk (at most five
  queries: the domain itself, then at most four labels, then one label less each time) reading
  ``_dmarc`` records: the first with ``psd=n`` is it; a ``psd=y`` record above the start makes
  the domain one label below it the Organizational Domain; otherwise the domain with the fewest
  labels that has a record; with no record at all, the domain itself.
- The policy comes from the record at the From domain (``p=``), else from the Organizational
  Domain's or the Public Suffix Domain's record (``sp=``, or ``np=`` when the From domain does not
  exist; each falling back to ``p=``). A record without a valid ``p=`` counts as ``p=none`` if it
  names a report address (``rua=``), else DMARC does not apply.
- ``pct``, ``rf``, ``ri`` are gone (ignored like any unknown tag); ``t=y`` (testing) asks that the
  policy not be applied: the disposition is ``none``.
- SPF aligns through the MAIL FROM domain only (never the HELO name).

From headers (RFC 9989 §5.7.1 leaves messages that break RFC 5322 out of scope; the choices here,
which milterd documents): no From header, several From headers, or a From with no usable domain
is ``permerror`` (nothing to evaluate: no policy applies, the caller decides); one From naming
several domains is exempt from DMARC, as the RFC requires (``none``); several addresses in one
domain are evaluated once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailplugins.addresses import AddressError, normalise_domain
from mailplugins.dns import DnsTempError
from milterd import fromheader
from milterd.dkim import DkimResult

__all__ = ["DmarcRecord", "DmarcResult", "evaluate", "from_domains", "organizational_domain",
           "parse_record"]

Lookup = Callable[[str], "list[bytes] | None"]
Exists = Callable[[str], bool]

POLICIES = ("none", "quarantine", "reject")
MAX_QUERIES = 5


@dataclass(frozen=True)
class DmarcRecord:
    p: str | None          # None: absent or invalid
    sp: str | None
    np: str | None
    adkim: str             # r | s
    aspf: str              # r | s
    psd: str               # y | n | u
    testing: bool          # t=y
    rua: bool              # names at least one report URI


@dataclass(frozen=True)
class DmarcResult:
    result: str                 # pass | fail | none | temperror | permerror
    header_from: str            # the From domain (A-label), "" when there is none
    policy: str                 # none | quarantine | reject: the published policy that applies
    reason: str                 # short text for the A-R comment
    #: What the receiver is asked to do: the policy on ``fail`` (``none`` under ``t=y``),
    #: else ``none``.
    disposition: str = "none"
    policy_domain: str = ""     # where the record that applies was found
    testing: bool = False


def parse_record(text: bytes | str) -> DmarcRecord | None:
    """A DMARC record, or None when it is not one (does not start with ``v=DMARC1``)."""
    return _parse_record(text)


@functools.lru_cache(maxsize=1024)
def _parse_record(text: bytes | str) -> DmarcRecord | None:
    """parse_record, once per record text: the same few records (the senders' domains and
    their parents, mostly absent) come back message after message, and a record is immutable."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    tags: dict[str, str] = {}
    for index, part in enumerate(text.split(";")):
        name, sep, value = part.partition("=")
        name, value = name.strip(" \t"), value.strip(" \t")
        if index == 0:
            if (name, sep, value) != ("v", "=", "DMARC1"):
                return None
            continue
        if sep and name.isalpha():
            tags.setdefault(name.lower(), value)

    def choice(tag: str, allowed: Sequence[str], default: str | None) -> str | None:
        value = tags.get(tag, "").lower()
        return value if value in allowed else default

    return DmarcRecord(
        p=choice("p", POLICIES, None),
        sp=choice("sp", POLICIES, None),
        np=choice("np", POLICIES, None),
        adkim=choice("adkim", ("r", "s"), "r") or "r",
        aspf=choice("aspf", ("r", "s"), "r") or "r",
        psd=choice("psd", ("y", "n", "u"), "u") or "u",
        testing=choice("t", ("y", "n"), "n") == "y",
        rua=any(":" in uri for uri in tags.get("rua", "").split(",")),
    )


@dataclass
class _Walker:
    """One evaluation's DNS: each ``_dmarc`` name asked once."""

    lookup: Lookup
    cache: dict[str, DmarcRecord | None] = field(default_factory=dict)

    def record(self, domain: str) -> DmarcRecord | None:
        """The one valid DMARC record at ``domain`` (none, or several: None)."""
        if domain not in self.cache:
            found = self.lookup(f"_dmarc.{domain}") or []
            records = [r for r in (parse_record(t) for t in found) if r is not None]
            self.cache[domain] = records[0] if len(records) == 1 else None
        return self.cache[domain]

    def walk(self, domain: str) -> list[tuple[str, DmarcRecord]]:
        """RFC 9989 DNS Tree Walk from ``domain``: the records found, longest domain first,
        up to the stop (psd=n anywhere, psd=y above the start)."""
        found: list[tuple[str, DmarcRecord]] = []
        labels = domain.split(".")
        target = labels
        first = True
        while target:
            name = ".".join(target)
            record = self.record(name)
            if record is not None:
                found.append((name, record))
                if record.psd == "n" or (record.psd == "y" and not first):
                    break
            # Five labels or more: straight to the last four (at most five queries in all).
            target = target[-(MAX_QUERIES - 1):] if len(target) >= MAX_QUERIES else target[1:]
            first = False
        return found


def organizational_domain(domain: str, walk: Sequence[tuple[str, DmarcRecord]]) -> str:
    """RFC 9989 Organizational Domain of ``domain`` from its tree walk's records."""
    for name, record in walk:
        if record.psd == "n":
            return name
        if record.psd == "y" and name != domain:
            labels = domain.split(".")
            return ".".join(labels[-(name.count(".") + 2):])
    if walk:
        return min(walk, key=lambda item: item[0].count("."))[0]
    return domain


def from_domains(values: Sequence[str]) -> tuple[list[str], str]:
    """The From header values' domains (A-labels, lower case, each once) and an error text
    ("" when fine)."""
    if not values:
        return [], "no From header"
    if len(values) > 1:
        return [], "several From headers"
    domains: list[str] = []
    for _display, address in fromheader.addresses(values[0]):
        domain = _domain(address)
        if not domain:
            return [], "From has no usable domain"
        if domain not in domains:
            domains.append(domain)
    if not domains:
        return [], "From has no usable domain"
    return domains, ""


def _domain(address: str) -> str:
    """The address's domain as an A-label (mailplugins.addresses' rules), "" if unusable:
    no domain, an address literal, a single label."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return ""
    try:
        domain = normalise_domain(domain)
    except AddressError:
        return ""
    return domain if "." in domain and not domain.startswith("[") else ""


def evaluate(from_values: Sequence[str], dkim: Sequence[DkimResult], spf_result: str,
             spf_domain: str, lookup: Lookup, exists: Exists | None = None) -> DmarcResult:
    """The DMARC result for a message (blocking: asks ``lookup``/``exists``).

    ``from_values`` are the values of every From header; ``dkim`` the message's DKIM results;
    ``spf_result``/``spf_domain`` the SPF result for the MAIL FROM identity and its domain
    (``spf_domain`` empty for the null sender: SPF then cannot align).
    """
    domains, error = from_domains(from_values)
    if error:
        return DmarcResult("permerror", "", "none", error)
    if len(domains) > 1:
        return DmarcResult("none", domains[0], "none",
                           "From names several domains: exempt from DMARC")
    author = domains[0]
    walker = _Walker(lookup)
    try:
        return _evaluate(author, dkim, spf_result, spf_domain.rstrip(".").lower(), walker, exists)
    except DnsTempError:
        return DmarcResult("temperror", author, "none", "DMARC record lookup failed")


def _evaluate(author: str, dkim: Sequence[DkimResult], spf_result: str, spf_domain: str,
              walker: _Walker, exists: Exists | None) -> DmarcResult:
    walk = walker.walk(author)
    if not walk:
        return DmarcResult("none", author, "none", "no DMARC record")
    org = organizational_domain(author, walk)
    records = dict(walk)
    if author in records:
        source, record, policy = author, records[author], records[author].p
    else:
        if org in records:
            source, record = org, records[org]
        else:  # the Public Suffix Domain's record (psd=y)
            source, record = next((n, r) for n, r in walk if r.psd == "y")
        policy = record.sp or record.p
        if record.np is not None and exists is not None and not exists(author):
            policy = record.np
    if policy is None:
        if not record.rua:
            return DmarcResult("none", author, "none", f"no valid p= at {source}")
        policy = "none"

    def aligned(domain: str, mode: str) -> bool:
        domain = domain.rstrip(".").lower()
        if domain == author:
            return True
        if mode == "s" or not domain:
            return False
        return organizational_domain(domain, walker.walk(domain)) == org

    temporary = False
    for result in dkim:
        if result.result == "pass":
            try:
                if aligned(result.domain, record.adkim):
                    return DmarcResult("pass", author, policy, f"aligned DKIM d={result.domain}",
                                       policy_domain=source, testing=record.testing)
            except DnsTempError:
                temporary = True
        elif result.result == "temperror":
            temporary = True
    if spf_result == "pass":
        try:
            if aligned(spf_domain, record.aspf):
                return DmarcResult("pass", author, policy, f"aligned SPF {spf_domain}",
                                   policy_domain=source, testing=record.testing)
        except DnsTempError:
            temporary = True
    elif spf_result == "temperror":
        temporary = True
    if temporary:
        return DmarcResult("temperror", author, policy, "no aligned pass, a check failed for now",
                           policy_domain=source, testing=record.testing)
    disposition = "none" if record.testing else policy
    return DmarcResult("fail", author, policy, "no aligned DKIM or SPF pass",
                       disposition=disposition, policy_domain=source, testing=record.testing)
