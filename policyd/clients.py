"""Client addresses as Postfix reports them, parsed once: shared by the rules, rate limits
and greylisting."""

from __future__ import annotations

import ipaddress
from functools import lru_cache


@lru_cache(maxsize=65536)
def client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address (IPv4-mapped IPv6 as IPv4, scope dropped); memoised: parsing is
    the most expensive part of a remembered greylisting decision."""
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
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
