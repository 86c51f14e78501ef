# -*- test-case-name: tests.unit.test_dns_records -*-
"""The ``dns:`` section: what ``mailplugins dns-records`` tells each domain to publish.

Every key is optional. Where the mail for the domains goes (``mx``) defaults to this host's FQDN,
the host that runs the CLI being the mail server in the common one-host setup; SPF defaults to
``v=spf1 mx -all`` (mail comes from the MX hosts, nothing else); DMARC to ``p=quarantine``. The
DKIM records come from the keys in the database, never from here.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from mailplugins.config.fields import Fields, describe

DMARC_POLICIES = ("none", "quarantine", "reject")
DEFAULT_SPF = "v=spf1 mx -all"
_HOST = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def default_mx() -> tuple[str, ...]:
    return (socket.getfqdn().lower().rstrip("."),)


@dataclass(frozen=True)
class DnsConfig:
    #: The MX hosts, most preferred first (preferences 10, 20, ...).
    mx: tuple[str, ...] = field(default_factory=default_mx)
    #: The domain's SPF record, the same for every domain.
    spf: str = DEFAULT_SPF
    #: The DMARC record's p= (RFC 9989).
    dmarc_policy: str = "quarantine"
    #: Where aggregate reports go (rua=mailto:...), or empty for none.
    dmarc_rua: tuple[str, ...] = ()
    #: The TTL written in the zone-file lines.
    ttl: int = 3600


def _host(value: object) -> str:
    if not isinstance(value, str) or not _HOST.fullmatch(value.strip()):
        raise ValueError(f"expected a host name, got {describe(value)}")
    return value.strip().lower().rstrip(".")


def _txt(prefix: str) -> Callable[[object], str]:
    def conv(value: object) -> str:
        if not isinstance(value, str) or not value.strip().lower().startswith(prefix):
            raise ValueError(f"expected a record starting with {prefix}, got {describe(value)}")
        if any(not 32 <= ord(c) < 127 for c in value):
            raise ValueError("must be printable ASCII on one line")
        return " ".join(value.split())

    return conv


def _mailbox(value: object) -> str:
    if (not isinstance(value, str) or value.count("@") != 1 or any(c in value for c in " \t,;!\"\\")
            or not all(value.split("@"))):
        raise ValueError(f"expected an address for aggregate reports, got {describe(value)}")
    return value


def parse_dns(fields: Fields | None) -> DnsConfig:
    f = fields or Fields({}, "dns")
    mx: tuple[str, ...]
    if isinstance(f._raw.get("mx"), str):
        mx = (f.convert("mx", None, _host),)
    else:
        mx = f.items("mx", default_mx(), _host)
        if not mx:
            raise f.error("mx", "needs at least one host")
    rua = f._raw.get("dmarc_rua")
    config = DnsConfig(
        mx=mx,
        spf=f.convert("spf", DEFAULT_SPF, _txt("v=spf1")),
        dmarc_policy=f.string("dmarc_policy", "quarantine", choices=DMARC_POLICIES),
        dmarc_rua=((f.convert("dmarc_rua", None, _mailbox),) if isinstance(rua, str)
                   else f.items("dmarc_rua", (), _mailbox)),
        ttl=int(f.duration("ttl", 3600, minimum=60, maximum=7 * 86400)),
    )
    f.done()
    return config
