# -*- test-case-name: tests.unit.test_authd_daemon -*-
"""The ``authd:`` section.

Every delay here is bounded so that a reply always reaches Postfix within its hard-coded 10 s
auth timeout (``AUTH_TIMEOUT`` in xsasl_dovecot_server.c): past that Postfix answers 454 and the
deliberate failure delay would turn into a temporary failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailplugins.config.fields import Fields, IPNetwork

#: Postfix gives up on the auth server after 10 s; every reply must leave well before that.
POSTFIX_AUTH_TIMEOUT = 10.0
#: Longest deliberate delay (failure delay plus penalty) we allow, leaving room for the work.
MAX_DELIBERATE_DELAY = 8.0
#: Dovecot's default ``auth_username_chars`` (2.3 and 2.4): what a login may be made of.
DOVECOT_USERNAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@"


@dataclass(frozen=True)
class AuthdConfig:
    #: Dovecot auth-client protocol listeners (Postfix ``smtpd_sasl_type = dovecot``).
    sasl_listen: tuple[str, ...]
    #: Dovecot dict proxy protocol listeners (Dovecot 2.3 passdb/userdb).
    dict_listen: tuple[str, ...]
    #: HTTP verify endpoint for Dovecot's Lua passdb.
    http_listen: tuple[str, ...]
    metrics: str | None
    max_connections: int
    #: Delay before a failed SASL answer (Dovecot's auth_failure_delay).
    failure_delay: float
    #: Delay before a failed HTTP answer; 0 by default because Dovecot adds its own.
    http_failure_delay: float
    #: How long a successful verification is remembered (0 disables the cache).
    cache_ttl: float
    cache_size: int
    #: How long a mailbox record read from the database is reused (0: read on every login).
    lookup_cache_ttl: float
    #: Failures (per client network, per login) before penalties start.
    penalty_threshold: int
    #: First penalty; each further failure doubles it, up to ``penalty_max``.
    penalty_initial: float
    penalty_max: float
    #: Failure counters are forgotten after this long without a new failure.
    penalty_window: float
    #: Failures are counted per /32 IPv4 and per this prefix for IPv6 (Dovecot uses /48).
    penalty_ipv6_prefix: int
    #: Counters kept at most (oldest forgotten first), so a flood of names cannot exhaust memory.
    penalty_table_size: int
    #: Also count failures in the database, so every host sharing it sees the same attacker.
    penalty_shared: bool
    #: Clients never delayed nor counted (e.g. webmail, Dovecot's login_trusted_networks).
    trusted_networks: tuple[IPNetwork, ...]
    #: A verification not finished by then is answered as a temporary failure.
    request_timeout: float
    #: SASL requests waiting for the client's CONT are forgotten after this (Dovecot: 150 s).
    continue_timeout: float
    #: Longest auth-client / dict line accepted; longer drops the connection (Dovecot: 16384).
    max_line_length: int
    #: An auth-client or dict line, or an HTTP request up to the end of its body, must arrive
    #: whole within this long of its first byte, else the connection is closed. Postfix and
    #: Dovecot write each whole, so only a broken or hostile peer is ever this slow.
    line_timeout: float
    #: In-flight SASL requests per connection (Postfix has at most one).
    max_requests_per_connection: int
    #: Largest HTTP request body accepted by the verify endpoint.
    http_max_body: int
    #: Nice value of the hashing threads (Linux: per thread), so the reactor wins the CPU.
    hash_niceness: int
    #: Characters a login may contain (Dovecot's ``auth_username_chars``); empty allows any,
    #: non-ASCII (EAI) logins included.
    username_chars: str
    #: ``user<sep>master`` logs the master user in as ``user`` (Dovecot's
    #: ``auth_master_user_separator``); empty: only the PLAIN authzid names the target.
    master_user_separator: str
    #: Whether master users may log in on SMTP (submission) too; off: IMAP, POP3, sieve, ...
    master_user_smtp: bool
    #: Processes serving authd; 1 by default (see docs/workers.md): hashing already uses
    #: every core through the CPU pool, and the local penalty counters are per process.
    workers: int = 1


def parse_authd(f: Fields) -> AuthdConfig:
    config = AuthdConfig(
        sasl_listen=f.endpoints("sasl_listen", ()),
        dict_listen=f.endpoints("dict_listen", ()),
        http_listen=f.endpoints("http_listen", ()),
        metrics=f.endpoint("metrics", None),
        max_connections=f.integer("max_connections", 2000, minimum=1),
        failure_delay=f.duration("failure_delay", 2.0, maximum=5.0),
        http_failure_delay=f.duration("http_failure_delay", 0.0, maximum=5.0),
        cache_ttl=f.duration("cache_ttl", 600.0, maximum=86400.0),
        cache_size=f.integer("cache_size", 100_000, minimum=1, maximum=10_000_000),
        lookup_cache_ttl=f.duration("lookup_cache_ttl", 5.0, maximum=300.0),
        penalty_threshold=f.integer("penalty_threshold", 3, minimum=1, maximum=1000),
        penalty_initial=f.duration("penalty_initial", 1.0, maximum=MAX_DELIBERATE_DELAY),
        penalty_max=f.duration("penalty_max", 5.0, maximum=MAX_DELIBERATE_DELAY),
        penalty_window=f.duration("penalty_window", 900.0, minimum=1.0),
        penalty_ipv6_prefix=f.integer("penalty_ipv6_prefix", 48, minimum=16, maximum=128),
        penalty_table_size=f.integer("penalty_table_size", 100_000, minimum=100),
        penalty_shared=f.boolean("penalty_shared", True),
        trusted_networks=f.networks("trusted_networks", ()),
        request_timeout=f.duration("request_timeout", 9.0, minimum=0.5, maximum=9.5),
        continue_timeout=f.duration("continue_timeout", 150.0, minimum=1.0),
        max_line_length=f.integer("max_line_length", 16384, minimum=1024, maximum=1024 * 1024),
        line_timeout=f.duration("line_timeout", 5.0, minimum=0.1, maximum=60.0),
        max_requests_per_connection=f.integer("max_requests_per_connection", 32, minimum=1),
        http_max_body=f.size("http_max_body", 16384, minimum=1024),
        hash_niceness=f.integer("hash_niceness", 5, minimum=0, maximum=19),
        username_chars=f.string("username_chars", DOVECOT_USERNAME_CHARS),
        master_user_separator=f.string("master_user_separator", ""),
        master_user_smtp=f.boolean("master_user_smtp", False),
        workers=f.workers(1),
    )
    if not (config.sasl_listen or config.dict_listen or config.http_listen):
        raise f.error("sasl_listen", "authd needs at least one of sasl_listen, dict_listen, http_listen")
    if config.penalty_initial > config.penalty_max:
        raise f.error("penalty_initial", "must not exceed penalty_max")
    if config.failure_delay + config.penalty_max > MAX_DELIBERATE_DELAY:
        raise f.error(
            "penalty_max",
            f"failure_delay + penalty_max must stay under {MAX_DELIBERATE_DELAY:g}s "
            f"(Postfix gives up after {POSTFIX_AUTH_TIMEOUT:g}s and answers 454)",
        )
    separator = config.master_user_separator
    if separator and (len(separator) != 1 or not separator.isprintable() or separator in "@ "):
        raise f.error("master_user_separator", "must be one printable character other than @")
    if separator and separator in config.username_chars:
        raise f.error("master_user_separator", "must not be one of username_chars")
    if config.workers > 1 and not config.penalty_shared:
        raise f.error(
            "workers",
            "more than one worker needs penalty_shared: true (otherwise each worker counts "
            "failures on its own and an attacker gets workers x penalty_threshold tries)",
        )
    if config.failure_delay >= config.request_timeout:
        raise f.error("failure_delay", "must be shorter than request_timeout")
    f.done()
    return config
