# -*- test-case-name: tests.unit.test_store -*-
"""Tables holding policyd's shared state: rate-limit counters and overrides, greylisting.

They live on the same :class:`~mailplugins.db.base.Base` so one Alembic history covers them
(revision 0002). Times are integer epoch seconds (``BigInteger``): no time zones, and the hot
comparisons (``last_seen < cutoff``) are plain integer range scans on every backend.

Several MX hosts share these rows, so every write that must be atomic is one upsert or one
transaction holding a row lock (see :mod:`policyd.sql`).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from mailplugins.db.base import ADDRESS_LEN, Base

#: Rule names (config keys).
RULE_LEN = 64
#: A subject is a login, an address, ``@domain`` or an IP network such as ``2001:db8::/64``.
SUBJECT_LEN = ADDRESS_LEN


class RateSubject(Base):
    """One row per (rule, subject): the row every check on that subject locks first.

    Upserting it serialises all checks on one subject across processes and hosts, so the
    counters read after it are exactly what the other transactions committed.
    """

    __tablename__ = "policy_rate_subjects"

    rule: Mapped[str] = mapped_column(String(RULE_LEN), primary_key=True)
    subject: Mapped[str] = mapped_column(String(SUBJECT_LEN), primary_key=True)
    #: Epoch seconds of the last check; rows unused for longer than the longest window go.
    last_seen: Mapped[int] = mapped_column(BigInteger, index=True)


class RateBucket(Base):
    """Sub-bucket counters of one window: ``bucket`` is ``floor(now / step)``."""

    __tablename__ = "policy_rate_buckets"

    rule: Mapped[str] = mapped_column(String(RULE_LEN), primary_key=True)
    subject: Mapped[str] = mapped_column(String(SUBJECT_LEN), primary_key=True)
    #: Window length in seconds (each window has its own buckets, ten per window).
    period: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    messages: Mapped[int] = mapped_column(BigInteger, default=0)
    recipients: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Epoch seconds after which the bucket is outside every window (purge cutoff).
    expires: Mapped[int] = mapped_column(BigInteger, index=True)


class RateOverride(Base):
    """A per-mailbox (``user@domain``) or per-domain (``@domain``) limit for one window.

    A NULL limit inherits the configured one; -1 means unlimited. A period the rule does not
    configure adds a window for that subject.
    """

    __tablename__ = "policy_rate_overrides"
    __table_args__ = (UniqueConstraint("rule", "subject", "period"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule: Mapped[str] = mapped_column(String(RULE_LEN))
    subject: Mapped[str] = mapped_column(String(SUBJECT_LEN))
    period: Mapped[int] = mapped_column(Integer)
    messages: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    recipients: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class GreylistEntry(Base):
    """One greylisting triplet, keyed by the SHA-256 of ``net/sender/recipient`` (privacy)."""

    __tablename__ = "policy_greylist"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen: Mapped[int] = mapped_column(BigInteger)
    last_seen: Mapped[int] = mapped_column(BigInteger, index=True)
    passed: Mapped[bool] = mapped_column(Boolean, default=False)


class GreylistClient(Base):
    """Client auto-whitelist: successful passes of one exact client address."""

    __tablename__ = "policy_greylist_clients"

    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    passes: Mapped[int] = mapped_column(Integer, default=0)
    #: When a pass was last counted (at most one per hour counts).
    last_counted: Mapped[int] = mapped_column(BigInteger)
    last_seen: Mapped[int] = mapped_column(BigInteger, index=True)
