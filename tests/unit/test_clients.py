"""mailplugins.clients: one parser for client addresses as Postfix, Dovecot and milters give them."""

from __future__ import annotations

import ipaddress
import random

from mailplugins.clients import client_in, client_ip, client_network

NETWORKS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))


def test_client_ip_maps_and_drops_scope() -> None:
    assert client_ip("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert client_ip("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert client_ip("junk") is None and client_ip("") is None


def test_client_network_is_what_ip_network_says() -> None:
    rng = random.Random(5)
    for _ in range(500):
        v4 = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        v6 = str(ipaddress.IPv6Address(rng.getrandbits(128) >> rng.randrange(0, 128)))
        prefix4, prefix6 = rng.randrange(0, 33), rng.randrange(0, 129)
        for text, prefix in ((v4, prefix4), (v6, prefix6)):
            client_network.cache_clear()
            expected = str(ipaddress.ip_network(f"{text}/{prefix}", strict=False))
            assert client_network(text, prefix4, prefix6) == expected


def test_client_network_by_family() -> None:
    assert client_network("192.0.2.77", 24, 64) == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3::4", 24, 48) == "2001:db8:1::/48"
    assert client_network("::ffff:198.51.100.9", 16, 48) == "198.51.0.0/16"


def test_client_in() -> None:
    assert client_in("192.0.2.9", NETWORKS)
    assert client_in("::ffff:192.0.2.9", NETWORKS)  # a mapped address is its IPv4 address
    assert client_in("2001:db8::5", NETWORKS)
    assert not client_in("198.51.100.1", NETWORKS)
    assert not client_in(None, NETWORKS) and not client_in("unknown", NETWORKS)


def test_client_ip_refuses_what_ip_address_refuses() -> None:
    """Dotted quads go through inet_pton first: it must accept and refuse exactly what
    ipaddress does (leading zeros, short forms, spaces, NUL bytes)."""
    texts = ["1.2.3.4", "0.0.0.0", "255.255.255.255", "256.1.1.1", "01.2.3.4", "1.2.3.04",
             "1.2.3", "1.2.3.4.5", " 1.2.3.4", "1.2.3.4 ", "1.2.3.4\x00", "0x1.2.3.4", "",
             "1.2.3.4%eth0", "::ffff:1.2.3.4", "::1", "unknown"]
    for text in texts:
        client_ip.cache_clear()
        try:
            expected: object = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            expected = None
        if isinstance(expected, ipaddress.IPv6Address) and expected.ipv4_mapped is not None:
            expected = expected.ipv4_mapped
        assert client_ip(text) == expected, text
