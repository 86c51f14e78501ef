"""authd's caches (authd.caches): good logins as HMACs, mailbox records for a few seconds."""

from __future__ import annotations

from datetime import datetime

from authd.caches import RecordCache, SuccessCache
from mailplugins.records import MailboxRecord


def _mailbox(version: int) -> MailboxRecord:
    return MailboxRecord(id=7, local_part="alice", domain="example.org", password="{PLAIN}x",
                         enabled=True, quota_bytes=0, services=frozenset({"imap"}),
                         password_version=version, created_at=datetime(2026, 1, 1), last_login_at=None)


def test_success_key_is_an_hmac_that_a_password_change_invalidates() -> None:
    cache = SuccessCache(60, 10, secret=b"k" * 32)
    key = cache.key(_mailbox(1), "s3cret")
    assert b"s3cret" not in key
    assert key == SuccessCache(60, 10, secret=b"k" * 32).key(_mailbox(1), "s3cret")
    assert key != cache.key(_mailbox(2), "s3cret")
    cache.put(key, None, 0.0)
    entry = cache.get(key, 30.0)
    assert entry is not None and entry.app_password_id is None
    assert cache.get(key, 61.0) is None


def test_success_cache_is_bounded() -> None:
    cache = SuccessCache(60, 10)
    for i in range(50):
        cache.put(bytes([i]), None, 0.0)
    assert len(cache) == 10


def test_record_cache_expires_after_its_ttl() -> None:
    cache = RecordCache(5, 10)
    cache.put("alice@example.org", (None, []), 0.0)
    assert cache.get("alice@example.org", 4.0) == (None, [])
    assert cache.get("alice@example.org", 6.0) is None
