# -*- test-case-name: tests.unit.test_config -*-
"""The YAML configuration, loaded into frozen typed objects and validated at load.

Every error is a :class:`ConfigError` whose text is one line naming the key path, so the CLI
can print it and exit 2, and a SIGHUP reload can log it and keep the old config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml

from mailplugins.config.authd import AuthdConfig, parse_authd
from mailplugins.config.core import (
    DatabaseConfig,
    MailConfig,
    PasswordConfig,
    parse_database,
    parse_mail,
    parse_passwords,
)
from mailplugins.config.deliver import DeliverConfig, parse_deliver
from mailplugins.config.dnsrecords import DnsConfig, parse_dns
from mailplugins.config.fields import ConfigError, Fields
from mailplugins.config.milterd import MilterdConfig, parse_milterd
from mailplugins.config.policyd import PolicydConfig, parse_policyd

__all__ = [
    "DAEMON_NAMES",
    "DEFAULT_CONFIG_PATH",
    "AuthdConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "DeliverConfig",
    "DnsConfig",
    "MailConfig",
    "MilterdConfig",
    "PasswordConfig",
    "PolicydConfig",
    "config_path",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = "/etc/mailplugins/mailplugins.yaml"
DAEMON_NAMES = ("policyd", "authd", "deliver", "milterd")
#: A config file larger than this is a mistake, not a config.
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Config:
    source: str
    database: DatabaseConfig
    mail: MailConfig
    passwords: PasswordConfig
    policyd: PolicydConfig | None
    authd: AuthdConfig | None
    deliver: DeliverConfig | None
    milterd: MilterdConfig | None = None
    #: What ``dns-records`` tells each domain to publish (and ``doctor --dns`` checks).
    dns: DnsConfig = field(default_factory=DnsConfig)

    def configured_daemons(self) -> tuple[str, ...]:
        return tuple(name for name in DAEMON_NAMES if getattr(self, name) is not None)


def config_path(explicit: str | None) -> str:
    """``--config``, else ``$MAILPLUGINS_CONFIG``, else the system default."""
    return explicit or os.environ.get("MAILPLUGINS_CONFIG") or DEFAULT_CONFIG_PATH


def parse_config(raw: object, source: str = "<memory>") -> Config:
    top = Fields(raw, "")
    policyd = top.section("policyd")
    authd = top.section("authd")
    deliver = top.section("deliver")
    milterd = top.section("milterd")
    config = Config(
        source=source,
        database=parse_database(top.section("database")),
        mail=parse_mail(top.section("mail")),
        passwords=parse_passwords(top.section("passwords")),
        policyd=parse_policyd(policyd) if policyd is not None else None,
        authd=parse_authd(authd) if authd is not None else None,
        deliver=parse_deliver(deliver) if deliver is not None else None,
        milterd=parse_milterd(milterd) if milterd is not None else None,
        dns=parse_dns(top.section("dns")),
    )
    top.done()
    return config


def load_config(path: str) -> Config:
    """Read and validate ``path``; raise ConfigError with a one-line reason on any problem."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("", f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError("", f"{path}: YAML syntax error{where}: {problem}") from None
    return parse_config(raw, source=path)
