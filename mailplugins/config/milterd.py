# -*- test-case-name: tests.unit.test_milterd_live -*-
"""The ``milterd:`` section: listeners, direction, DNS, DMARC policy, limits and timeouts.

One listener serves both directions. A message is *outgoing* (signed) when the client
authenticated (``{auth_authen}``), is in ``mynetworks``, or the mail came through Postfix's
``non_smtpd_milters`` (``sendmail``); everything else is *incoming* (checked).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from mailplugins.config.fields import ConfigError, Fields, IPNetwork, describe
from mailplugins.config.policy_state import _nameservers

#: What a DMARC ``p=reject`` failure gets: ``reject`` (550 5.7.1), ``quarantine`` (filed into
#: Junk by deliver) or ``none`` (only recorded in Authentication-Results).
DMARC_ACTIONS = ("reject", "quarantine", "none")
#: What an authenticated user's message whose ``From:`` they may not use gets.
UNOWNED_FROM_ACTIONS = ("reject", "accept-unsigned")


@dataclass(frozen=True)
class DmarcPolicyConfig:
    #: The action for failures of a domain publishing ``p=reject`` (or ``sp``/``np`` = reject).
    reject_action: str = "reject"
    #: The action for failures of a domain publishing ``p=quarantine``.
    quarantine_action: str = "quarantine"
    #: SMTP reply text for a rejection (the code is always ``550 5.7.1``).
    reject_text: str = "Message rejected by the sender domain's DMARC policy"


@dataclass(frozen=True)
class MilterdConfig:
    listen: tuple[str, ...]
    metrics: str | None
    #: The authserv-id of our Authentication-Results headers (and of the ones deliver trusts).
    authserv_id: str
    #: Clients whose mail is signed without authentication (the MTA's own networks).
    mynetworks: tuple[IPNetwork, ...]
    #: DNS servers as (address, port); empty: the system resolver.
    nameservers: tuple[tuple[str, int], ...]
    #: Seconds one DNS lookup may take; slower is a temperror.
    dns_timeout: float
    #: Answers kept (positive and negative) and for how long at most.
    dns_cache_size: int
    dns_cache_ttl: float
    #: Threads doing blocking DNS (SPF, DKIM keys, DMARC records).
    dns_threads: int
    dmarc: DmarcPolicyConfig
    unowned_from: str
    max_connections: int
    #: Longer than Postfix's milter_content_timeout (300 s): Postfix closes first.
    idle_timeout: float
    #: Seconds a frame may take to arrive, from its first byte.
    frame_timeout: float
    #: Seconds the checks of one message may take before its default action is answered.
    budget: float
    max_frame: int
    max_macros: int
    #: Headers of one message kept for signing/verifying at most, in number and bytes.
    max_headers: int
    max_header_bytes: int
    #: Seconds a login's right to a ``From:`` address is reused without the database.
    cache_ttl: float
    #: Seconds a domain's signing keys are reused without the database: a ``dkim activate`` or
    #: ``retire`` takes effect within this time.
    key_cache_ttl: float = 10.0
    #: Ask Postfix not to wait for our "continue" to connect, HELO, MAIL, DATA, headers and body
    #: on TCP connections too (always on unix sockets): see docs/milterd.md.
    no_reply_tcp: bool = True
    #: Make every signature in the CPU pool (true), or only those with RSA keys over 2048 bits
    #: (false: quick ones on the reactor, see milterd.live.LiveChecks.sign).
    sign_in_pool: bool = False
    #: Processes serving milterd (mailplugins.workers); 1 = today's single process.
    workers: int = 1


def _authserv_id(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a host name, got {describe(value)}")
    text = value.strip()
    if any(c.isspace() or c in ';()"\\' for c in text):
        raise ValueError(f"an authserv-id must be one token without ; ( ) or quotes: {describe(text)}")
    return text


def default_authserv_id() -> str:
    return socket.getfqdn() or "localhost"


def parse_dmarc(fields: Fields | None) -> DmarcPolicyConfig:
    f = fields or Fields({}, "milterd.dmarc")
    text = f.string("reject_text", DmarcPolicyConfig.reject_text)
    if any(c in text for c in "\r\n\0") or not text.strip():
        raise ConfigError(f.key_path("reject_text"), "must be one non-empty line")
    config = DmarcPolicyConfig(
        reject_action=f.string("reject_action", "reject", choices=DMARC_ACTIONS),
        quarantine_action=f.string("quarantine_action", "quarantine", choices=("quarantine", "none")),
        reject_text=text,
    )
    f.done()
    return config


def parse_milterd(f: Fields) -> MilterdConfig:
    config = MilterdConfig(
        listen=f.endpoints("listen"),
        metrics=f.endpoint("metrics", None),
        authserv_id=f.convert("authserv_id", None, _authserv_id) or default_authserv_id(),
        mynetworks=f.networks("mynetworks", ()),
        nameservers=tuple(_nameservers(f)),
        dns_timeout=f.duration("dns_timeout", 5.0, minimum=0.1, maximum=60),
        dns_cache_size=f.integer("dns_cache_size", 10_000, minimum=0, maximum=1_000_000),
        dns_cache_ttl=f.duration("dns_cache_ttl", 300.0, maximum=86400),
        dns_threads=f.integer("dns_threads", 16, minimum=1, maximum=200),
        dmarc=parse_dmarc(f.section("dmarc")),
        unowned_from=f.string("unowned_from", "reject", choices=UNOWNED_FROM_ACTIONS),
        max_connections=f.integer("max_connections", 1000, minimum=1),
        workers=f.workers(),
        idle_timeout=f.duration("idle_timeout", 1100.0, minimum=1),
        frame_timeout=f.duration("frame_timeout", 30.0, minimum=0.1, maximum=600),
        budget=f.duration("budget", 20.0, minimum=0.1, maximum=290),
        max_frame=f.size("max_frame", 256 * 1024, minimum=65536 + 16),
        max_macros=f.integer("max_macros", 64, minimum=8, maximum=10_000),
        max_headers=f.integer("max_headers", 1000, minimum=16, maximum=100_000),
        max_header_bytes=f.size("max_header_bytes", 1024 * 1024, minimum=4096),
        cache_ttl=f.duration("cache_ttl", 30.0, maximum=86400),
        key_cache_ttl=f.duration("key_cache_ttl", 10.0, maximum=3600),
        no_reply_tcp=f.boolean("no_reply_tcp", True),
        sign_in_pool=f.boolean("sign_in_pool", False),
    )
    f.done()
    return config
