# -*- test-case-name: tests.unit.test_authd_caches -*-
"""authd's two in-memory caches: good logins (as HMACs, never passwords) and mailbox records."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from mailplugins.records import AppPasswordRecord, MailboxRecord
from mailplugins.ttlcache import TTLCache


@dataclass(frozen=True)
class _CacheEntry:
    #: None when the main password matched, else the app password's id.
    app_password_id: int | None


class SuccessCache:
    """Remembers good (mailbox, password version, password) triples as HMACs, never passwords."""

    def __init__(self, ttl: float, size: int, secret: bytes | None = None) -> None:
        self._secret = secret or os.urandom(32)
        self._entries: TTLCache[bytes, _CacheEntry] = TTLCache(size, ttl)

    @property
    def ttl(self) -> float:
        return self._entries.ttl

    @property
    def size(self) -> int:
        return self._entries.size

    def key(self, mailbox: MailboxRecord, password: str) -> bytes:
        message = f"{mailbox.id}|{mailbox.password_version}|".encode() + password.encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def get(self, key: bytes, now: float) -> _CacheEntry | None:
        return self._entries.get(key, now)

    def put(self, key: bytes, app_password_id: int | None, now: float) -> None:
        self._entries.put(key, _CacheEntry(app_password_id), now)

    def discard(self, key: bytes) -> None:
        self._entries.discard(key)

    def __len__(self) -> int:
        return len(self._entries)


Loaded = tuple[MailboxRecord | None, list[AppPasswordRecord]]


class RecordCache(TTLCache[str, Loaded]):
    """Mailbox records (and their app passwords) for a few seconds, so a burst of logins costs
    one database read; ``ttl`` bounds how long a password change or a disable takes to apply.
    ``replace`` keeps an entry's expiry (e.g. after recording a login)."""

    def __init__(self, ttl: float, size: int) -> None:
        super().__init__(size, ttl)
