# -*- test-case-name: tests.unit.test_wiring_doctor -*-
"""``mailplugins doctor --probe``: is something listening where Postfix and Dovecot will connect?"""

from __future__ import annotations

import socket

from mailplugins.config import Config
from mailplugins.wiring.doctor import Finding
from mailplugins.wiring.endpoints import parse_endpoint

__all__ = ["probe_daemons"]


#: Which unit runs each listener, for the fix line.
_UNITS = {"policyd": "mailplugins-policyd", "authd": "mailplugins-authd", "deliver": "mailplugins-deliver",
          "milterd": "mailplugins-milterd"}


def _listeners(config: Config) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if config.policyd is not None:
        found += [("policyd.listen", e) for e in config.policyd.listen[:1]]
    if config.authd is not None:
        for key in ("sasl_listen", "dict_listen", "http_listen"):
            found += [(f"authd.{key}", e) for e in getattr(config.authd, key)[:1]]
    if config.deliver is not None:
        found += [("deliver.listen", e) for e in config.deliver.listen[:1]]
    if config.milterd is not None:
        found += [("milterd.listen", e) for e in config.milterd.listen[:1]]
    return found


def _reachable(kind: str, where: str, timeout: float) -> str | None:
    """None when something accepts a connection, else the reason."""
    try:
        if kind == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(where)
        else:
            host, _, port = where.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def probe_daemons(config: Config, timeout: float = 2.0) -> list[Finding]:
    """Connect to each daemon where Postfix and Dovecot will (and close at once)."""
    findings: list[Finding] = []
    for key, text in _listeners(config):
        try:
            endpoint = parse_endpoint(text)
        except ValueError:
            continue  # postfix-config/dovecot-config already refused it
        where = endpoint.path if endpoint.kind == "unix" else endpoint.inet()
        reason = _reachable(endpoint.kind, where, timeout)
        if reason is not None:
            unit = _UNITS[key.split(".")[0]]
            findings.append(Finding("daemons", f"{key}: nothing answers at {where} ({reason})",
                                    f"systemctl start {unit} (then: journalctl -u {unit})"))
    return findings
