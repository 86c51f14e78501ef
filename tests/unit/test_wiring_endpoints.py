"""A listener's endpoint string as Postfix and Dovecot reach it (mailplugins.wiring.endpoints)."""

from __future__ import annotations

import pytest

from mailplugins.wiring.endpoints import parse_endpoint


@pytest.mark.parametrize(
    ("text", "kind", "where"),
    [
        ("unix:/var/spool/postfix/private/x:mode=660", "unix", "/var/spool/postfix/private/x"),
        ("unix:address=/run/a.sock:lockfile=0", "unix", "/run/a.sock"),
        ("tcp:9640:interface=127.0.0.1", "inet", "127.0.0.1:9640"),
        ("tcp:port=9640:interface=192.0.2.7", "inet", "192.0.2.7:9640"),
        ("tcp6:9640:interface=\\:\\:1", "inet", "[::1]:9640"),
        ("tcp:9640", "inet", "127.0.0.1:9640"),
        ("systemd:domain=UNIX:name=policy", "unix", "/var/spool/postfix/private/mailplugins-policy"),
        ("systemd:domain=INET:name=http", "inet", "127.0.0.1:9643"),
    ],
)
def test_parse_endpoint(text: str, kind: str, where: str) -> None:
    endpoint = parse_endpoint(text)
    assert endpoint.kind == kind
    assert (endpoint.path if kind == "unix" else endpoint.inet()) == where


@pytest.mark.parametrize("text", ["ssl:443", "systemd:domain=UNIX:name=mine", "unix:", "tcp:x"])
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)

