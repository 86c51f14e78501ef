# -*- test-case-name: tests.unit.test_wiring_endpoints -*-
"""Where Postfix and Dovecot reach a daemon: the client side of a Twisted endpoint string.

The daemons listen on Twisted server endpoint strings (``unix:``, ``tcp:``, ``systemd:``); the
generators and the doctor need the address a client connects to, and ``mailplugins serve``
needs to recognise a unix socket path. A ``systemd:`` listener is resolved through the socket
units shipped in ``systemd/`` (the only ones whose address is known here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["SHIPPED_SOCKETS", "Endpoint", "first_endpoint", "parse_endpoint"]

#: ``FileDescriptorName`` -> where the shipped socket unit (systemd/) listens, so a
#: ``systemd:domain=UNIX:name=NAME`` listener can still be named in Postfix and Dovecot.
SHIPPED_SOCKETS: Mapping[str, str] = {
    "policy": "unix:/var/spool/postfix/private/mailplugins-policy",
    "sasl": "unix:/var/spool/postfix/private/mailplugins-auth",
    "dict": "unix:/run/mailplugins/dict.sock",
    "http": "tcp:9643:interface=127.0.0.1",
    "lmtp": "unix:/var/spool/postfix/private/mailplugins-deliver",
    "milter": "unix:/var/spool/postfix/private/mailplugins-milter",
}


@dataclass(frozen=True)
class Endpoint:
    """Where a client reaches a listener: a unix socket path, or a loopback TCP address."""

    kind: str  # "unix" or "inet"
    path: str = ""
    host: str = ""
    port: int = 0
    #: Why the address is a guess (systemd sockets, wildcard listeners), for a comment.
    note: str = ""

    def inet(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _split_unescaped(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_endpoint(description: str) -> Endpoint:
    """The client side of a Twisted server endpoint string (``unix:``, ``tcp:``, ``systemd:``).

    Raises ValueError for endpoint types a Postfix or Dovecot client cannot reach.
    """
    kind, *rest = _split_unescaped(description)
    positional = [part for part in rest if "=" not in part]
    options = dict(part.split("=", 1) for part in rest if "=" in part)
    kind = kind.lower()
    if kind == "unix":
        path = options.get("address") or (positional[0] if positional else "")
        if not path:
            raise ValueError(f"{description}: no socket path")
        return Endpoint("unix", path=os.path.normpath(path))
    if kind in ("tcp", "tcp6"):
        port_text = options.get("port") or (positional[0] if positional else "")
        if not port_text.isdigit():
            raise ValueError(f"{description}: no port")
        interface = options.get("interface", "")
        note = ""
        if interface in ("", "0.0.0.0", "::"):  # noqa: S104 - recognising a wildcard, not binding one
            note = "listens on every interface; clients use loopback"
            interface = "::1" if kind == "tcp6" or interface == "::" else "127.0.0.1"
        return Endpoint("inet", host=interface, port=int(port_text), note=note)
    if kind == "systemd":
        name = options.get("name")
        shipped = SHIPPED_SOCKETS.get(name or "")
        if shipped is None:
            raise ValueError(
                f"{description}: a systemd socket other than the shipped ones "
                f"({', '.join(f'name={n}' for n in SHIPPED_SOCKETS)}): cannot tell where it listens"
            )
        found = parse_endpoint(shipped)
        return Endpoint(found.kind, found.path, found.host, found.port,
                        note=f"socket of the shipped systemd unit ({description})")
    raise ValueError(f"{description}: Postfix and Dovecot cannot connect to a {kind!r} endpoint")


def first_endpoint(endpoints: Sequence[str], key: str) -> Endpoint:
    if not endpoints:
        raise ValueError(f"{key} is not set")
    # The first listener that a client can reach; the others (e.g. a second host's) are extras.
    errors = []
    for text in endpoints:
        try:
            return parse_endpoint(text)
        except ValueError as exc:
            errors.append(str(exc))
    raise ValueError(f"{key}: {errors[0]}")
