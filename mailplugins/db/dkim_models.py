# -*- test-case-name: tests.unit.test_dkim_keys -*-
"""DKIM signing keys: one row per (domain, selector), through pending -> active -> retired.

The private key is PKCS#8 PEM in the database, so it is exactly as readable as the password
hashes beside it (the SQLite directory is 2770 mailplugins:mailplugins, a server database has its
own grants); it is blanked when the key is retired, since nothing may sign with it again. The
public half is kept apart so listing keys and printing DNS records never reads the private one.
A selector is never reused for a domain, even after retirement: resolvers may still cache it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from mailplugins.db.base import DOMAIN_LEN, Base

#: A selector is one or more DNS labels; with ``._domainkey.`` and the domain it must stay a name.
SELECTOR_LEN = 63


class DkimKey(Base):
    __tablename__ = "dkim_keys"
    __table_args__ = (UniqueConstraint("domain", "selector"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The signing domain (d=), a-label, lower case.
    domain: Mapped[str] = mapped_column(String(DOMAIN_LEN), index=True)
    selector: Mapped[str] = mapped_column(String(SELECTOR_LEN))
    #: The DKIM key type (the record's k= tag): ``rsa`` or ``ed25519``.
    key_type: Mapped[str] = mapped_column(String(16))
    #: Key size (RSA modulus bits; 256 for Ed25519).
    bits: Mapped[int] = mapped_column(Integer)
    #: PKCS#8 PEM, unencrypted; empty once retired.
    private_key: Mapped[str] = mapped_column(Text)
    #: The record's p= value: base64 SubjectPublicKeyInfo (RSA) or the raw 32-byte key (Ed25519).
    public_key: Mapped[str] = mapped_column(Text)
    #: ``pending``, ``active`` or ``retired``.
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
