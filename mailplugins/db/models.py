# -*- test-case-name: tests.unit.test_store -*-
"""SQLAlchemy models: the one source of truth for domains, mailboxes, aliases and grants.

Addresses are stored split: ``domain`` rows hold the normalised (lower-case, IDNA) domain, and
each local part is kept as written (``local_part``) plus a case-folded copy (``local_key``) that
carries the unique index, so lookups are exact-match index hits on every backend.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from mailplugins.db.base import ADDRESS_LEN, DOMAIN_LEN, HASH_LEN, LOCAL_LEN, Base


class Domain(Base):
    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(DOMAIN_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)

    mailboxes: Mapped[list[Mailbox]] = relationship(
        back_populates="domain", cascade="all, delete-orphan", passive_deletes=True
    )
    aliases: Mapped[list[Alias]] = relationship(
        back_populates="domain", cascade="all, delete-orphan", passive_deletes=True
    )


class Mailbox(Base):
    __tablename__ = "mailboxes"
    __table_args__ = (UniqueConstraint("domain_id", "local_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    local_part: Mapped[str] = mapped_column(String(LOCAL_LEN))
    local_key: Mapped[str] = mapped_column(String(LOCAL_LEN))
    password: Mapped[str] = mapped_column(String(HASH_LEN))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Bytes; 0 means no quota.
    quota_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    allow_smtp: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_imap: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_pop3: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_lmtp: Mapped[bool] = mapped_column(Boolean, default=True)
    #: A master user: its own credentials may log in as any other mailbox (Dovecot's master
    #: passdb, used by imapsync and support staff). Never on SMTP unless authd allows it.
    master: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: Bumped on every password change so that verification caches drop old entries.
    password_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    domain: Mapped[Domain] = relationship(back_populates="mailboxes")
    app_passwords: Mapped[list[AppPassword]] = relationship(
        back_populates="mailbox", cascade="all, delete-orphan", passive_deletes=True
    )
    sender_grants: Mapped[list[SenderGrant]] = relationship(
        back_populates="mailbox", cascade="all, delete-orphan", passive_deletes=True
    )


class Alias(Base):
    """``local_key == ""`` is the ``@domain`` catch-all."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("domain_id", "local_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    local_part: Mapped[str] = mapped_column(String(LOCAL_LEN))
    local_key: Mapped[str] = mapped_column(String(LOCAL_LEN))
    created_at: Mapped[datetime] = mapped_column(DateTime)

    domain: Mapped[Domain] = relationship(back_populates="aliases")
    targets: Mapped[list[AliasTarget]] = relationship(
        back_populates="alias",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="AliasTarget.position",
    )


class AliasTarget(Base):
    __tablename__ = "alias_targets"
    __table_args__ = (UniqueConstraint("alias_id", "target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alias_id: Mapped[int] = mapped_column(ForeignKey("aliases.id", ondelete="CASCADE"))
    #: Normalised address (domain IDNA-encoded); may be outside our domains (forwarding).
    target: Mapped[str] = mapped_column(String(ADDRESS_LEN))
    position: Mapped[int] = mapped_column(Integer, default=0)

    alias: Mapped[Alias] = relationship(back_populates="targets")


class SenderGrant(Base):
    """The login ``mailbox`` may use ``address`` as envelope sender (``@domain``: any there)."""

    __tablename__ = "sender_grants"
    __table_args__ = (UniqueConstraint("mailbox_id", "address_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(ADDRESS_LEN))
    #: Case-folded local part @ normalised domain.
    address_key: Mapped[str] = mapped_column(String(ADDRESS_LEN), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)

    mailbox: Mapped[Mailbox] = relationship(back_populates="sender_grants")


class AppPassword(Base):
    __tablename__ = "app_passwords"
    __table_args__ = (UniqueConstraint("mailbox_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    password: Mapped[str] = mapped_column(String(HASH_LEN))
    #: Comma-separated services (smtp,imap,pop3) or empty for every service.
    services: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    mailbox: Mapped[Mailbox] = relationship(back_populates="app_passwords")


class Setting(Base):
    """Small key/value facts about the installation (e.g. the cache HMAC key)."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
