# -*- test-case-name: tests.unit.test_auth_failures -*-
"""authd's shared state: authentication failure counters, so several hosts see one attacker."""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from mailplugins.db.base import Base


class AuthFailure(Base):
    """Failures per key (``ip:<address or IPv6 network>`` or ``user:<login>``) in a window."""

    __tablename__ = "auth_failures"

    key: Mapped[str] = mapped_column(String(340), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    #: Epoch seconds of the last failure; rows older than the window count as zero.
    last_seen: Mapped[int] = mapped_column(BigInteger, index=True)
    #: Hex HMAC of the last (login, password) tried: retrying the same wrong password does not
    #: count again (a client with a stale saved password is not an attacker).
    fingerprint: Mapped[str] = mapped_column(String(32))
