# -*- test-case-name: tests.unit.test_store -*-
"""What the user database answers: frozen records, and the errors its changes raise.

Plain values with no SQLAlchemy in them, so they cross from the database pool to the reactor
(and into the daemons' caches) safely; :class:`~mailplugins.store.Store` makes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from mailplugins.addresses import Address, AddressError, parse_address

__all__ = [
    "SERVICES",
    "AliasRecord",
    "AlreadyExists",
    "AppPasswordRecord",
    "Delivery",
    "DomainRecord",
    "GrantRecord",
    "MailboxRecord",
    "NotFound",
    "Resolution",
    "StoreError",
    "utcnow",
]

SERVICES = ("smtp", "imap", "pop3", "lmtp")


class StoreError(Exception):
    """An operation that cannot be done; the message is one line for the operator."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class DomainRecord:
    name: str
    mailboxes: int
    aliases: int
    created_at: datetime


@dataclass(frozen=True)
class MailboxRecord:
    id: int
    local_part: str
    domain: str
    password: str
    enabled: bool
    quota_bytes: int
    services: frozenset[str]
    password_version: int
    created_at: datetime
    last_login_at: datetime | None
    #: A master user: may log in as any other mailbox with its own password (see docs/authd.md).
    master: bool = False

    @property
    def address(self) -> str:
        return str(Address(self.local_part, self.domain, quoted=_needs_quotes(self.local_part)))

    def allows(self, service: str) -> bool:
        """Unknown services (e.g. ``doveadm``, ``sieve``) follow the IMAP flag."""
        return (service if service in SERVICES else "imap") in self.services


@dataclass(frozen=True)
class AliasRecord:
    address: str
    targets: tuple[str, ...]


@dataclass(frozen=True)
class AppPasswordRecord:
    id: int
    name: str
    password: str
    services: frozenset[str]
    created_at: datetime
    last_used_at: datetime | None

    def allows(self, service: str) -> bool:
        return not self.services or (service if service in SERVICES else "imap") in self.services


@dataclass(frozen=True)
class GrantRecord:
    login: str
    address: str


@dataclass(frozen=True)
class Delivery:
    """One local mailbox a recipient resolves to, with the ``+detail`` that applies to it."""

    mailbox: MailboxRecord
    detail: str | None


@dataclass(frozen=True)
class Resolution:
    """What a recipient address in one of our domains resolves to."""

    deliveries: tuple[Delivery, ...] = ()
    #: Alias targets outside our domains (Postfix's virtual_alias_maps forwards those).
    forwards: tuple[str, ...] = ()
    #: Local mailboxes found but disabled (they are not in ``deliveries``).
    disabled: tuple[MailboxRecord, ...] = ()
    #: The recipient matched only through a ``@domain`` catch-all.
    catch_all: bool = False

    @property
    def exists(self) -> bool:
        return bool(self.deliveries or self.forwards or self.disabled)


def _needs_quotes(local: str) -> bool:
    try:
        return parse_address(f"{local}@x.invalid").local != local
    except AddressError:
        return True
