# -*- test-case-name: tests.unit.test_config -*-
"""Sections every daemon and the CLI share: database, mail storage layout, password hashing."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass

from mailplugins.config.fields import ConfigError, Fields, describe

DEFAULT_DATABASE_URL = "sqlite:////var/lib/mailplugins/mail.db"


@dataclass(frozen=True)
class DatabaseConfig:
    url: str
    #: Connections per process; the database thread pool has as many threads.
    pool_size: int
    #: Seconds a query may take before the caller answers with its fallback.
    timeout: float

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


@dataclass(frozen=True)
class MailConfig:
    #: Dovecot-style template (``%u``, ``%n``, ``%d``) of each mailbox's Maildir.
    location: str
    uid: int
    gid: int
    #: Characters that split ``local+detail`` (Postfix's recipient_delimiter); empty disables.
    recipient_delimiter: str


@dataclass(frozen=True)
class PasswordConfig:
    #: Scheme for new hashes and for rehashing weaker ones on login.
    scheme: str
    argon2_memory_kib: int
    argon2_time_cost: int
    argon2_parallelism: int
    bcrypt_cost: int
    sha_crypt_rounds: int


def parse_database(fields: Fields | None) -> DatabaseConfig:
    f = fields or Fields({}, "database")
    url = f.string("url", DEFAULT_DATABASE_URL)
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:
        raise f.error("url", f"not a database URL: {describe(url)}") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise f.error("url", f"unsupported database {backend!r} (sqlite, postgresql or mysql)")
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        directory = os.path.dirname(os.path.abspath(parsed.database))
        if not os.path.isdir(directory):
            raise f.error("url", f"directory does not exist: {describe(directory)}")
    config = DatabaseConfig(
        url=url,
        pool_size=f.integer("pool_size", 5, minimum=1, maximum=200),
        timeout=f.duration("timeout", 2.0, minimum=0.05, maximum=60),
    )
    f.done()
    return config


def _account_id(value: object, kind: str, number: str, lookup: Callable[[str], int]) -> int:
    """A uid or gid: a non-negative number, or a name looked up in the system's database."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return lookup(value)
        except KeyError:
            raise ValueError(f"no such {kind}: {describe(value)}") from None
    raise ValueError(f"expected a {kind} name or {number}, got {describe(value)}")


def _user_id(value: object) -> int:
    return _account_id(value, "user", "uid", lambda name: pwd.getpwnam(name).pw_uid)


def _group_id(value: object) -> int:
    return _account_id(value, "group", "gid", lambda name: grp.getgrnam(name).gr_gid)


def _location(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path template, got {describe(value)}")
    path = value.removeprefix("maildir:")
    if not os.path.isabs(path):
        raise ValueError(f"must be an absolute path template: {describe(value)}")
    if "%" not in path:
        raise ValueError(f"must contain %u, %n or %d so each mailbox differs: {describe(value)}")
    for index, char in enumerate(path):
        if char == "%" and path[index + 1 : index + 2] not in ("u", "n", "d", "%", "L", "U"):
            raise ValueError(f"unknown variable {path[index:index + 2]!r} in {describe(value)}")
    return path


def parse_mail(fields: Fields | None) -> MailConfig:
    f = fields or Fields({}, "mail")
    config = MailConfig(
        location=f.convert("location", "/var/vmail/%d/%n/Maildir", _location),
        uid=f.convert("uid", 5000, _user_id),
        gid=f.convert("gid", 5000, _group_id),
        recipient_delimiter=f.string("recipient_delimiter", "+"),
    )
    if any(c in config.recipient_delimiter for c in "@\"\\ \t"):
        raise ConfigError(f.key_path("recipient_delimiter"), "must not contain @, quotes or spaces")
    f.done()
    return config


SCHEMES = ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT")


def parse_passwords(fields: Fields | None) -> PasswordConfig:
    f = fields or Fields({}, "passwords")
    config = PasswordConfig(
        scheme=f.string("scheme", "ARGON2ID", choices=SCHEMES),
        argon2_memory_kib=f.integer("argon2_memory_kib", 19456, minimum=8, maximum=4 * 1024**2),
        argon2_time_cost=f.integer("argon2_time_cost", 2, minimum=1, maximum=100),
        argon2_parallelism=f.integer("argon2_parallelism", 1, minimum=1, maximum=64),
        bcrypt_cost=f.integer("bcrypt_cost", 12, minimum=4, maximum=31),
        sha_crypt_rounds=f.integer("sha_crypt_rounds", 100000, minimum=5000, maximum=999999999),
    )
    f.done()
    return config
