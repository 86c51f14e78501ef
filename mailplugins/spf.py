# -*- test-case-name: tests.unit.test_spf,tests.unit.test_spf_core -*-
"""SPF (RFC 7208) evaluation through pyspf, shared by policyd and milterd. Blocking.

pyspf resolves with dnspython, which blocks; callers run :func:`spf_lookup` in a thread pool,
bounded by pyspf's total query time (``querytime``, our ``timeout``), never on the reactor. The
identity is the MAIL FROM address, or ``postmaster@<HELO name>`` for the null sender (pyspf's
HELO identity). What to do with the result (policyd's reject/defer, milterd's
Authentication-Results and DMARC) is the caller's.

pyspf asks dnspython's process-wide default resolver, so :func:`use_nameservers` is process-wide
too; each daemon has one ``nameservers`` setting, so that is enough.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import dns.resolver

from mailplugins.dns import Nameserver, resolver_for

try:  # an optional dependency: pip install 'mailplugins[spf]' (pyspf)
    import spf as pyspf
except ImportError:  # pragma: no cover - the config refuses SPF checks without it
    pyspf = None

__all__ = ["MAX_HEADER", "RESULTS", "SPFResult", "clean", "spf_lookup", "use_nameservers"]

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\U0010ffff]")
MAX_HEADER = 900


@dataclass(frozen=True)
class SPFResult:
    """One check: the RFC 7208 result and the ``Received-SPF`` header value (no name)."""

    result: str
    header: str


def spf_lookup(client: str, sender: str, helo: str, receiver: str, timeout: float) -> SPFResult:
    """Blocking: evaluate SPF for ``client`` sending as ``sender`` (runs in a pool)."""
    if pyspf is None:  # pragma: no cover
        return SPFResult("temperror", f"TempError ({receiver}: pyspf is not installed)")
    try:
        query = pyspf.query(i=client, s=sender, h=helo, receiver=receiver,
                            timeout=timeout, querytime=timeout)
        result, _code, _explanation = query.check()
        header = query.get_header(result)
    except Exception as exc:  # pyspf raises on odd input (e.g. a bad client address)
        return SPFResult("permerror", f"PermError ({receiver}: {type(exc).__name__}) "
                                      f"client-ip={client}; identity=mailfrom")
    result = str(result).lower()
    if result not in RESULTS:
        result = "permerror"
    return SPFResult(result, clean(str(header)))


def clean(text: str) -> str:
    """One printable line of bounded length (DNS data ends up in a header)."""
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= MAX_HEADER else text[: MAX_HEADER - 3] + "..."


_custom_resolver = False


def use_nameservers(servers: Sequence[Nameserver], *, cache_size: int = 0) -> None:
    """Point dnspython's default resolver, which pyspf asks, at ``servers`` (the config's
    ``nameservers``: strings or (address, port); empty: back to resolv.conf). Process-wide.

    ``cache_size`` above 0 keeps up to that many DNS answers for their TTL (dnspython's
    thread-safe LRU cache): pyspf has no cache of its own and asks the same TXT and A records
    message after message (milterd checks SPF for every incoming message, a round trip through
    the resolver for each name a record mentions). 0: no cache (policyd's choice).
    """
    global _custom_resolver
    if servers:
        dns.resolver.default_resolver = resolver_for(servers)
        _custom_resolver = True
    elif _custom_resolver:
        dns.resolver.reset_default_resolver()
        _custom_resolver = False
    if cache_size > 0:
        dns.resolver.get_default_resolver().cache = dns.resolver.LRUCache(cache_size)
    elif dns.resolver.default_resolver is not None:
        dns.resolver.default_resolver.cache = None
