# -*- test-case-name: tests.unit.test_config -*-
"""The ``authd:`` section."""

from __future__ import annotations

from dataclasses import dataclass

from mailplugins.config.fields import Fields


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


def parse_authd(f: Fields) -> AuthdConfig:
    config = AuthdConfig(
        sasl_listen=f.endpoints("sasl_listen", ()),
        dict_listen=f.endpoints("dict_listen", ()),
        http_listen=f.endpoints("http_listen", ()),
        metrics=f.endpoint("metrics", None),
        max_connections=f.integer("max_connections", 2000, minimum=1),
    )
    if not (config.sasl_listen or config.dict_listen or config.http_listen):
        raise f.error("sasl_listen", "authd needs at least one of sasl_listen, dict_listen, http_listen")
    f.done()
    return config
