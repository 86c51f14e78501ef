"""DKIM keys on SQLite, PostgreSQL and MariaDB: generation, states, the rotation rule, KeyStore."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from sqlalchemy import Engine, select

from mailplugins.db.dkim_models import DkimKey
from mailplugins.dkim_keys import (
    DkimKeyRecord,
    DkimKeys,
    choose_signers,
    generate_key,
    key_record_problem,
    normalise_selector,
    parse_tags,
    signing_ids,
)
from mailplugins.records import AlreadyExists, NotFound, StoreError
from tests.support.sync import migrated_engine


class Clock:
    """Naive UTC datetimes, a minute apart on each call (activation order is by time)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 4, 12, 0)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    yield from migrated_engine(database_url, pool_size=2)


@pytest.fixture
def keys(engine: Engine) -> DkimKeys:
    return DkimKeys(engine, Clock())


def _private(keys: DkimKeys, domain: str, selector: str) -> str:
    with keys.engine.connect() as conn:
        return str(conn.execute(select(DkimKey.private_key).where(
            DkimKey.domain == domain, DkimKey.selector == selector)).scalar_one())


def test_rsa_key_is_pending_and_its_halves_match(keys: DkimKeys) -> None:
    key = keys.generate("Example.ORG")
    assert (key.domain, key.selector, key.key_type, key.bits, key.state) == (
        "example.org", "mp202612r", "rsa", 2048, "pending")
    assert key.algorithm == "rsa-sha256" and key.dns_name == "mp202612r._domainkey.example.org"
    assert key.activated_at is None and key.retired_at is None
    assert key.txt_value() == f"v=DKIM1; k=rsa; p={key.public_key}"
    pem = _private(keys, "example.org", "mp202612r")
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    private = serialization.load_pem_private_key(pem.encode(), None)
    public = serialization.load_der_public_key(base64.b64decode(key.public_key))
    assert isinstance(private, rsa.RSAPrivateKey) and isinstance(public, rsa.RSAPublicKey)
    signature = private.sign(b"message", padding.PKCS1v15(), hashes.SHA256())
    public.verify(signature, b"message", padding.PKCS1v15(), hashes.SHA256())
    assert keys.signing_keys("example.org") == []  # pending keys never sign


def test_ed25519_key_is_the_bare_public_key(keys: DkimKeys) -> None:
    key = keys.generate("example.org", key_type="ed25519", selector="Ed.Sel-1")
    assert (key.selector, key.bits, key.algorithm) == ("ed.sel-1", 256, "ed25519-sha256")
    assert len(key.public_key) == 44 and len(base64.b64decode(key.public_key)) == 32  # RFC 8463
    private = serialization.load_pem_private_key(_private(keys, "example.org", "ed.sel-1").encode(), None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    public = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(key.public_key))
    public.verify(private.sign(b"m"), b"m")
    assert key.txt_value() == f"v=DKIM1; k=ed25519; p={key.public_key}"


def test_refusals(keys: DkimKeys) -> None:
    for bits in (512, 1024, 2047, 8192):
        with pytest.raises(StoreError, match="refused"):
            keys.generate("example.org", bits=bits)
    with pytest.raises(StoreError, match="RSA keys only"):
        keys.generate("example.org", key_type="ed25519", bits=2048)
    with pytest.raises(StoreError, match="unknown key type"):
        keys.generate("example.org", key_type="dsa")
    for selector in ("bad_selector", "-x", "a..b", "x" * 64, "sp ace"):
        with pytest.raises(StoreError, match="bad selector"):
            keys.generate("example.org", selector=selector, key_type="ed25519")
    with pytest.raises(StoreError):
        keys.generate("not a domain", key_type="ed25519")
    keys.generate("example.org", selector="s1", key_type="ed25519")
    with pytest.raises(AlreadyExists, match="never reused"):
        keys.generate("EXAMPLE.org", selector="S1", key_type="ed25519")
    assert [k.selector for k in keys.list_keys()] == ["s1"]


def test_default_selectors_are_unique_per_domain(keys: DkimKeys) -> None:
    made = [keys.generate("example.org", key_type="ed25519").selector for _ in range(3)]
    assert made == ["mp202612e", "mp202612e2", "mp202612e3"]
    assert keys.generate("example.net", key_type="ed25519").selector == "mp202612e"
    assert keys.generate("bücher.de", key_type="ed25519").domain == "xn--bcher-kva.de"
    assert keys.domains() == ["example.net", "example.org", "xn--bcher-kva.de"]
    assert [k.selector for k in keys.list_keys("example.org")] == made


def test_rotation_rule(keys: DkimKeys) -> None:
    def signers() -> list[str]:
        found = keys.signing_keys("example.org")
        assert [k.record.state for k in found] == ["active"] * len(found)
        return [k.record.selector for k in found]

    keys.generate("example.org", selector="old", key_type="rsa")
    keys.activate("example.org", "old")
    assert signers() == ["old"]
    keys.generate("example.org", selector="new", key_type="rsa")
    assert signers() == ["old"]  # a pending key is only published
    keys.activate("example.org", "new")
    assert signers() == ["new"]  # the newest active key of a type signs; old stays active
    assert keys.get("example.org", "old").state == "active"
    keys.generate("example.org", selector="ed", key_type="ed25519")
    keys.activate("example.org", "ed")
    assert signers() == ["new", "ed"]  # dual signing: one per type, RSA first
    keys.retire("example.org", "new")
    assert signers() == ["old", "ed"]  # the older active key is still published: it signs again
    keys.retire("example.org", "old")
    assert signers() == ["ed"]
    with pytest.raises(StoreError, match="last active DKIM key of example.org"):
        keys.retire("example.org", "ed")
    assert signers() == ["ed"]
    retired = keys.retire("example.org", "ed", force=True)
    assert retired.state == "retired" and retired.retired_at is not None
    assert signers() == []
    assert _private(keys, "example.org", "ed") == ""  # nothing may sign with it again


def test_activations_in_one_second_keep_their_order(engine: Engine) -> None:
    instant = datetime(2026, 12, 4, 12, 0, 0, 250_000)
    keys = DkimKeys(engine, lambda: instant)  # every call: the same moment
    for selector in ("b", "a", "c"):
        keys.generate("example.org", selector=selector)
    for selector in ("c", "a", "b"):  # activated in this order, within one second
        keys.activate("example.org", selector)
        [signer] = keys.signing_keys("example.org")
        assert signer.record.selector == selector
    assert [k.activated_at for k in keys.list_keys()] == [
        datetime(2026, 12, 4, 12, 0, 2), datetime(2026, 12, 4, 12, 0, 1), datetime(2026, 12, 4, 12, 0, 0)]


def test_state_changes_refused(keys: DkimKeys) -> None:
    with pytest.raises(NotFound, match="no DKIM key nope for example.org"):
        keys.activate("example.org", "nope")
    with pytest.raises(NotFound):
        keys.retire("example.org", "nope")
    keys.generate("example.org", selector="a", key_type="ed25519")
    active = keys.activate("example.org", "A")
    assert active.state == "active" and active.activated_at is not None
    with pytest.raises(StoreError, match="is active, not pending"):
        keys.activate("example.org", "a")
    keys.generate("example.org", selector="p", key_type="ed25519")
    assert keys.retire("example.org", "p").state == "retired"  # a pending key can be dropped
    with pytest.raises(StoreError, match="already retired"):
        keys.retire("example.org", "p")
    with pytest.raises(StoreError, match="is retired, not pending"):
        keys.activate("example.org", "p")
    assert keys.signing_keys("not a domain!") == []


def test_signing_key_repr_hides_the_private_key(keys: DkimKeys) -> None:
    keys.generate("example.org", selector="a", key_type="ed25519")
    keys.activate("example.org", "a")
    [key] = keys.signing_keys("EXAMPLE.ORG")
    assert key.private_key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert "PRIVATE" not in repr(key) and "PRIVATE" not in str(key)


def _record(key_id: int, key_type: str, state: str, activated: int | None) -> DkimKeyRecord:
    base = datetime(2026, 1, 1)
    return DkimKeyRecord(key_id, "example.org", f"s{key_id}", key_type, 2048, "AAAA", state, base,
                         base + timedelta(days=activated) if activated is not None else None, None)


def test_choose_signers_by_activation_time_not_row_order() -> None:
    keys = [_record(1, "rsa", "active", 5), _record(2, "rsa", "active", 3),
            _record(3, "ed25519", "active", 1), _record(4, "rsa", "pending", None),
            _record(5, "ed25519", "retired", 9)]
    assert [k.id for k in choose_signers(keys)] == [1, 3]
    assert signing_ids(keys) == {1, 3}
    assert choose_signers([]) == []


def test_key_record_problem() -> None:
    _pem, public, _bits = generate_key("ed25519")
    key = _record(1, "ed25519", "active", 1)
    key = DkimKeyRecord(**{**key.__dict__, "public_key": public})
    assert key_record_problem(f"v=DKIM1; k=ed25519; p={public}".encode(), key) is None
    spaced = f"v=DKIM1;k=ed25519;\tp={public[:20]} {public[20:]}"  # FWS inside p= is allowed
    assert key_record_problem(spaced.encode(), key) is None
    assert key_record_problem(f"v=DKIM1; p={public}".encode(), key) == (
        "its k= is rsa (by default), the key is ed25519")
    assert key_record_problem(b"v=DKIM1; k=ed25519; p=", key) == "its p= is empty (the key is revoked)"
    assert key_record_problem(b"v=DKIM1; k=ed25519; p=AAAA", key) == "its p= is another key"
    assert key_record_problem(b"v=DKIM2; k=ed25519; p=AAAA", key) == "its v= is 'DKIM2', not DKIM1"
    assert key_record_problem(b"v=spf1 -all", key) == "it has no p= tag"


def test_parse_tags_and_selectors() -> None:
    assert parse_tags(" v=DMARC1 ;P = reject; junk; rua=mailto:a@b; p=none") == {
        "v": "DMARC1", "p": "reject", "rua": "mailto:a@b"}
    assert normalise_selector(" MP2026.Foo-1 ") == "mp2026.foo-1"


def test_key_store_gives_the_signer_its_keys(engine: Engine) -> None:
    from milterd.dkim import SigningKey
    from milterd.keys import KeyStore

    keys = DkimKeys(engine, Clock())
    store = KeyStore(engine)
    assert store.signing_keys("example.org") == []
    for selector, key_type in (("r1", "rsa"), ("e1", "ed25519"), ("r2", "rsa")):
        keys.generate("example.org", selector=selector, key_type=key_type)
        keys.activate("example.org", selector)
    found = store.signing_keys("example.org")
    assert [(k.domain, k.selector, k.algorithm) for k in found] == [
        ("example.org", "r2", "rsa-sha256"), ("example.org", "e1", "ed25519-sha256")]
    assert all(isinstance(k, SigningKey) for k in found)
    assert isinstance(serialization.load_pem_private_key(found[0].private_key_pem, None), rsa.RSAPrivateKey)
    assert isinstance(serialization.load_pem_private_key(found[1].private_key_pem, None),
                      ed25519.Ed25519PrivateKey)
    assert "PRIVATE" not in repr(found)
    keys.retire("example.org", "e1")
    assert [k.selector for k in store.signing_keys("example.org")] == ["r2"]
