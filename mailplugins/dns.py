# -*- test-case-name: tests.unit.test_dns -*-
"""Blocking DNS lookups shared by the CLI, policyd's SPF and milterd (dnspython).

One way to ask DNS for the whole project: the same nameserver syntax as the config's
``nameservers`` keys (empty: the system resolver from ``/etc/resolv.conf``), a total time limit
per lookup, and one answer shape. Absent data (NXDOMAIN, or the name exists without records of
that type) is ``None``, which callers map to "no record"; anything that means "ask again later"
(timeout, SERVFAIL, REFUSED, no server answered) raises :class:`DnsTempError`, which callers map to
``temperror``. Nothing here touches the reactor: daemons call these functions in a thread pool.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

__all__ = ["DnsTempError", "Nameserver", "mx_records", "name_exists", "parse_nameserver",
           "resolver_for", "txt_records"]

#: A nameserver as the config writes it (``192.0.2.53``, ``[::1]:5353``) or (address, port).
Nameserver = str | tuple[str, int]


class DnsTempError(Exception):
    """A lookup that may succeed later: timeout, SERVFAIL, REFUSED, no usable answer."""


def parse_nameserver(text: str) -> tuple[str, int]:
    """``192.0.2.53``, ``192.0.2.53:5353``, ``2001:db8::53`` or ``[2001:db8::53]:5353``.

    Raises ValueError with a message fit for a config error (the config's ``nameservers`` keys).
    """
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [address]:port, got {_quote(text)}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        port_text = ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"expected a port 1-65535, got {_quote(text)}")
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address (optionally :port), got {_quote(text)}") from None
    return host, port


def _quote(text: str) -> str:
    """As the config's errors quote a bad value (this module must not import the config,
    which imports it)."""
    return '"' + (text if len(text) <= 60 else text[:57] + "...") + '"'


def resolver_for(nameservers: Sequence[Nameserver]) -> dns.resolver.Resolver:
    """The dnspython resolver for ``nameservers`` (config strings or (address, port) pairs;
    empty: the system's resolv.conf), built once per list and shared."""
    return _resolver(tuple(parse_nameserver(s) if isinstance(s, str) else (s[0], int(s[1]))
                           for s in nameservers))


@functools.lru_cache(maxsize=16)
def _resolver(servers: tuple[tuple[str, int], ...]) -> dns.resolver.Resolver:
    """One resolver per server list, built once (reading resolv.conf each lookup is waste).

    No cache: the data is asked for at most a few times per message, and a key rotation or a
    freshly published record must be seen at once.
    """
    if not servers:
        return dns.resolver.Resolver(configure=True)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    return resolver


_NXDOMAIN = "nxdomain"
_NODATA = "nodata"


def _query(name: str, rdtype: dns.rdatatype.RdataType, nameservers: Sequence[Nameserver],
           timeout: float) -> dns.resolver.Answer | str:
    """The answer, or ``_NXDOMAIN`` / ``_NODATA``; DnsTempError for the rest."""
    try:
        qname = dns.name.from_text(name.rstrip(".") + ".")
    except dns.exception.DNSException as exc:
        raise ValueError(f"not a DNS name: {name!r} ({exc})") from None
    try:
        resolver = resolver_for(nameservers)  # (no resolv.conf: NoResolverConfiguration)
        # Only this name: a relative name must never be completed with resolv.conf's search list.
        return resolver.resolve(qname, rdtype, lifetime=timeout, search=False)
    except dns.resolver.NXDOMAIN:
        return _NXDOMAIN
    except dns.resolver.NoAnswer:
        return _NODATA
    except dns.exception.Timeout:
        raise DnsTempError(f"{name}: DNS timed out after {timeout:g}s") from None
    except dns.resolver.NoNameservers:
        raise DnsTempError(f"{name}: no DNS server answered (SERVFAIL or REFUSED)") from None
    except dns.exception.DNSException as exc:  # YXDOMAIN, malformed replies...
        raise DnsTempError(f"{name}: DNS error ({type(exc).__name__})") from None


def _answer(name: str, rdtype: dns.rdatatype.RdataType, nameservers: Sequence[Nameserver],
            timeout: float) -> dns.resolver.Answer | None:
    found = _query(name, rdtype, nameservers, timeout)
    return None if isinstance(found, str) else found


def name_exists(name: str, *, nameservers: Sequence[Nameserver] = (),
                timeout: float = 5.0) -> bool:
    """False only for NXDOMAIN (RFC 8020: nothing exists at or below the name); for DMARC's
    ``np=`` (non-existent subdomains). Raises :class:`DnsTempError` like the others."""
    return _query(name, dns.rdatatype.A, nameservers, timeout) != _NXDOMAIN


def txt_records(name: str, *, nameservers: Sequence[Nameserver] = (),
                timeout: float = 5.0) -> list[bytes] | None:
    """The TXT records at ``name``, each record's strings joined (RFC 6376 §3.6.2.2, RFC 7208).

    ``None`` for NXDOMAIN or no TXT record; raises :class:`DnsTempError` when the answer may
    come later; ValueError when ``name`` cannot be a DNS name. Blocking.
    """
    answer = _answer(name, dns.rdatatype.TXT, nameservers, timeout)
    if answer is None:
        return None
    return [b"".join(rdata.strings) for rdata in answer]


def mx_records(name: str, *, nameservers: Sequence[Nameserver] = (),
               timeout: float = 5.0) -> list[tuple[int, str]] | None:
    """The MX records at ``name`` as (preference, exchange without final dot), lowest first."""
    answer = _answer(name, dns.rdatatype.MX, nameservers, timeout)
    if answer is None:
        return None
    return sorted((int(rdata.preference), rdata.exchange.to_text().rstrip(".").lower())
                  for rdata in answer)
