# -*- test-case-name: tests.unit.test_clients -*-
"""Client addresses as Postfix and Dovecot report them, parsed one way for every daemon.

policyd's rules, rate limits and greylisting, authd's penalty keys and trusted networks, and
milterd's networks all ask the same questions: which address is it (IPv4-mapped IPv6 counts as
the IPv4 address, an IPv6 scope is dropped) and which network of a given prefix holds it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from functools import lru_cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8192)
def client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address (IPv4-mapped IPv6 as IPv4, scope dropped); memoised: parsing is
    the most expensive part of a remembered greylisting decision. The memo is kept small:
    each address object is one more for every full pass of the garbage collector to walk
    (65536 of them made policyd's pauses on a stream of new clients tens of ms long), and
    the addresses that come back soon (the recipients and DATA of one message) fit."""
    try:
        # Dotted quads, nearly every client, through the C parser: ip_address's Python
        # parsing was a quarter of a new client's greylisting decision. inet_pton refuses
        # what ip_address refuses (leading zeros, fewer than four parts) and the rest falls
        # through to ip_address.
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):  # ValueError: a NUL in the text
        pass
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=65536)
def client_network(text: str, ipv4_prefix: int, ipv6_prefix: int) -> str | None:
    """``192.0.2.0/24``-style network of a client address (IPv4-mapped IPv6 as IPv4)."""
    address = client_ip(text)
    if address is None:
        return None
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    # What ip_network(f"{address}/{prefix}", strict=False) prints, from the address's integer
    # (parsing the text again cost more than the rest of a greylisting decision).
    host_bits = address.max_prefixlen - prefix
    network = type(address)(int(address) >> host_bits << host_bits)
    return f"{network}/{prefix}"


def client_in(text: str | None, networks: Iterable[IPNetwork]) -> bool:
    """Whether the client address ``text`` lies in any of ``networks`` (False if unparsable)."""
    address = client_ip(text) if text else None
    return address is not None and any(address in network for network in networks)
