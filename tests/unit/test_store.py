"""The store on SQLite, PostgreSQL and MariaDB: schema, admin round trips, resolution."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from mailplugins.addresses import parse_address
from mailplugins.db import schema
from mailplugins.db.tables import metadata
from mailplugins.records import AlreadyExists, NotFound, StoreError
from mailplugins.store import Store
from tests.support.sync import migrated_engine


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    yield from migrated_engine(database_url, pool_size=2)


@pytest.fixture
def store(engine: Engine) -> Store:
    store = Store(engine)
    store.add_domain("example.org")
    store.add_domain("Bücher.DE")
    return store


def test_upgrade_is_idempotent_and_matches_models(engine: Engine) -> None:
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    schema.upgrade(engine)
    assert schema.current_revision(engine) == schema.head_revision()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}),
                                metadata)
    assert diff == []


def test_domains_round_trip(store: Store) -> None:
    assert [d.name for d in store.list_domains()] == ["example.org", "xn--bcher-kva.de"]
    with pytest.raises(AlreadyExists):
        store.add_domain("EXAMPLE.org")
    with pytest.raises(StoreError):
        store.add_domain("not a domain")
    assert store.is_local_domain("example.org")
    store.remove_domain("bücher.de")
    assert not store.is_local_domain("xn--bcher-kva.de")
    with pytest.raises(NotFound):
        store.remove_domain("bücher.de")


def test_domain_with_mailboxes_needs_force(store: Store) -> None:
    store.add_mailbox("bob@example.org", "{PLAIN}x")
    store.add_alias("info@example.org", ["bob@example.org"])
    with pytest.raises(StoreError, match="still has 1 mailbox"):
        store.remove_domain("example.org")
    store.remove_domain("example.org", force=True)
    assert store.get_mailbox("bob@example.org") is None
    assert store.list_aliases() == []


def test_mailboxes_round_trip(store: Store) -> None:
    record = store.add_mailbox("Bob@Example.ORG", "{PLAIN}x", quota_bytes=1000, services=["smtp", "imap"])
    assert record.address == "Bob@example.org"
    assert record.services == {"smtp", "imap"}
    with pytest.raises(AlreadyExists):
        store.add_mailbox("bob@example.org", "{PLAIN}y")
    with pytest.raises(NotFound):
        store.add_mailbox("bob@nowhere.example", "{PLAIN}y")
    with pytest.raises(StoreError, match="routing"):
        store.add_mailbox("a%b@example.org", "{PLAIN}y")
    found = store.get_mailbox("BOB@example.org")
    assert found is not None and found.id == record.id and found.local_part == "Bob"
    store.set_password("bob@example.org", "{PLAIN}new")
    store.set_enabled("bob@example.org", False)
    store.set_quota("bob@example.org", 5)
    store.set_services("bob@example.org", ["pop3"])
    changed = store.get_mailbox("bob@example.org")
    assert changed is not None
    assert (changed.password, changed.password_version, changed.enabled, changed.quota_bytes) == (
        "{PLAIN}new", 1, False, 5)
    assert changed.allows("pop3") and not changed.allows("imap") and not changed.allows("doveadm")
    assert store.replace_password_hash(record.id, "{PLAIN}new", "{PLAIN}rehashed")
    assert not store.replace_password_hash(record.id, "{PLAIN}new", "{PLAIN}other")
    store.record_login(record.id)
    assert store.get_mailbox_by_id(record.id).last_login_at is not None
    store.add_mailbox("alice@bücher.de", "{PLAIN}a")
    assert [m.address for m in store.list_mailboxes()] == ["Bob@example.org", "alice@xn--bcher-kva.de"]
    assert [m.address for m in store.list_mailboxes("bücher.de")] == ["alice@xn--bcher-kva.de"]
    assert [m.address for m in store.iter_mailboxes(batch=1)] == [
        "Bob@example.org", "alice@xn--bcher-kva.de"]
    store.remove_mailbox("bob@example.org")
    with pytest.raises(NotFound):
        store.remove_mailbox("bob@example.org")


def test_aliases_and_resolution(store: Store) -> None:
    store.add_mailbox("bob@example.org", "{PLAIN}b")
    store.add_mailbox("alice@example.org", "{PLAIN}a")
    store.add_mailbox("off@example.org", "{PLAIN}o")
    store.set_enabled("off@example.org", False)
    store.add_alias("team@example.org", ["bob@example.org", "alice@example.org", "out@else.example"])
    store.add_alias("team@example.org", ["bob@example.org"])  # no duplicate target
    store.add_alias("bob@example.org", ["bob@example.org", "archive@example.org"])
    store.add_alias("archive@example.org", ["alice@example.org"])
    store.add_alias("loop1@example.org", ["loop2@example.org"])
    store.add_alias("loop2@example.org", ["loop1@example.org"])
    store.add_alias("@bücher.de", ["alice@example.org"])
    assert len(store.list_aliases()) == 6

    def resolve(text: str) -> tuple[list[tuple[str, str | None]], list[str], bool, bool]:
        result = store.resolve(parse_address(text), "+")
        assert result is not None
        return ([(d.mailbox.address, d.detail) for d in result.deliveries], list(result.forwards),
                result.catch_all, bool(result.disabled))

    assert store.resolve(parse_address("x@elsewhere.example"), "+") is None
    assert resolve("alice@example.org") == ([("alice@example.org", None)], [], False, False)
    assert resolve("ALICE+lists@example.org") == ([("alice@example.org", "lists")], [], False, False)
    assert resolve("team@example.org") == (
        [("bob@example.org", None), ("alice@example.org", None)], ["out@else.example"], False, False)
    # bob -> bob (self: his mailbox) + archive -> alice
    assert resolve("bob+x@example.org") == (
        [("bob@example.org", "x"), ("alice@example.org", "x")], [], False, False)
    assert resolve("nobody@example.org") == ([], [], False, False)
    assert resolve("off@example.org") == ([], [], False, True)
    assert resolve("anyone@bücher.de") == ([("alice@example.org", None)], [], True, False)
    assert resolve("loop1@example.org") == ([], [], False, False)
    for routing in ("bob%else.example@example.org", "else.example!bob@example.org",
                    '"bob@else.example"@example.org'):
        assert resolve(routing)[0] == []

    store.remove_alias("team@example.org", ["out@else.example"])
    assert resolve("team@example.org")[1] == []
    with pytest.raises(NotFound):
        store.remove_alias("team@example.org", ["nobody@example.org"])
    store.remove_alias("team@example.org")
    with pytest.raises(NotFound):
        store.remove_alias("team@example.org")


def test_sender_grants(store: Store) -> None:
    bob = store.add_mailbox("bob@example.org", "{PLAIN}b")
    store.grant_sender("bob@example.org", "Sales@Example.org")
    store.grant_sender("bob@example.org", "@bücher.de")
    with pytest.raises(AlreadyExists):
        store.grant_sender("bob@example.org", "sales@example.org")
    with pytest.raises(NotFound):
        store.grant_sender("nobody@example.org", "sales@example.org")
    assert store.granted_senders(bob.id) == {"sales@example.org", "@xn--bcher-kva.de"}
    assert [g.address for g in store.list_grants("bob@example.org")] == [
        "@xn--bcher-kva.de", "Sales@example.org"]
    store.revoke_sender("bob@example.org", "sales@example.org")
    with pytest.raises(NotFound):
        store.revoke_sender("bob@example.org", "sales@example.org")
    assert store.granted_senders(bob.id) == {"@xn--bcher-kva.de"}


def test_app_passwords(store: Store) -> None:
    bob = store.add_mailbox("bob@example.org", "{PLAIN}b")
    store.add_app_password("bob@example.org", "phone", "{PLAIN}p", ["imap"])
    store.add_app_password("bob@example.org", "laptop", "{PLAIN}l")
    with pytest.raises(AlreadyExists):
        store.add_app_password("bob@example.org", "phone", "{PLAIN}q")
    with pytest.raises(StoreError):
        store.add_app_password("bob@example.org", "bad", "{PLAIN}q", ["ftp"])
    records = store.app_passwords_for(bob.id)
    assert [r.name for r in records] == ["phone", "laptop"]
    assert records[0].allows("imap") and not records[0].allows("smtp")
    assert records[1].allows("smtp")
    store.record_app_password_use(records[0].id)
    assert store.list_app_passwords("bob@example.org")[1].last_used_at is not None
    store.revoke_app_password("bob@example.org", "phone")
    with pytest.raises(NotFound):
        store.revoke_app_password("bob@example.org", "phone")
    store.remove_mailbox("bob@example.org")
    assert store.app_passwords_for(bob.id) == []


def test_secret_is_stable(store: Store) -> None:
    first = store.secret("cache")
    assert len(first) == 32
    assert store.secret("cache") == first
    assert store.secret("other") != first
