"""Password hashes in Dovecot's {SCHEME} form: making, checking and rehashing."""

from __future__ import annotations

import dataclasses

import pytest

from mailplugins.config.core import parse_passwords
from mailplugins.hashing import (
    HashError,
    check_password,
    hash_password,
    needs_rehash,
    split_scheme,
    verify_password,
)

DEFAULT = parse_passwords(None)
FAST = {
    "ARGON2ID": dataclasses.replace(DEFAULT, argon2_memory_kib=1024, argon2_time_cost=1),
    "BLF-CRYPT": dataclasses.replace(DEFAULT, scheme="BLF-CRYPT", bcrypt_cost=4),
    "SHA512-CRYPT": dataclasses.replace(DEFAULT, scheme="SHA512-CRYPT", sha_crypt_rounds=5000),
}


def test_default_is_argon2id_with_owasp_parameters() -> None:
    stored = hash_password("s3cret", DEFAULT)
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$")
    assert check_password("s3cret", stored)


@pytest.mark.parametrize("scheme", sorted(FAST))
def test_round_trip(scheme: str) -> None:
    stored = hash_password("pässword with spaces", FAST[scheme])
    assert split_scheme(stored)[0] == scheme
    assert check_password("pässword with spaces", stored)
    assert not check_password("pässword with space", stored)
    assert not check_password("", stored)


@pytest.mark.parametrize(
    ("stored", "password"),
    [
        ("{PLAIN}secret", "secret"),
        ("{plain}secret", "secret"),
        ("{PLAIN.B64}c2VjcmV0", "secret"),
        ("{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=", "secret"),
        ("{PLAIN-MD5}5ebe2294ecd0e0f08eab7690d2a6ee69", "secret"),
        ("{CRYPT}$1$saltsalt$9xy1btjgzLYfb7hivXtC//", "secret"),
        ("{MD5-CRYPT}$1$saltsalt$9xy1btjgzLYfb7hivXtC//", "secret"),
    ],
)
def test_legacy_schemes_verify(stored: str, password: str) -> None:
    assert check_password(password, stored)
    assert not check_password(password + "x", stored)


def test_bcrypt_truncates_at_72_bytes_like_dovecot() -> None:
    long = "é" * 40  # 80 UTF-8 bytes
    stored = hash_password(long, FAST["BLF-CRYPT"])
    assert check_password(long, stored)
    assert check_password(long.encode()[:72].decode(), stored)
    assert not check_password(long[:35], stored)


@pytest.mark.parametrize(
    "stored", ["nobrace", "{NOPE}abc", "{ARGON2ID}garbage", "{SSHA512}!!!", "{BLF-CRYPT}$2y$xx"]
)
def test_unreadable_hashes_raise_hash_error(stored: str) -> None:
    with pytest.raises(HashError) as info:
        check_password("x", stored)
    assert "garbage" not in str(info.value)


def test_rehash_of_weaker_schemes_and_parameters() -> None:
    assert needs_rehash("{PLAIN}secret", DEFAULT)
    assert needs_rehash(hash_password("x", FAST["SHA512-CRYPT"]), DEFAULT)
    assert needs_rehash(hash_password("x", FAST["ARGON2ID"]), DEFAULT)
    assert not needs_rehash(hash_password("x", DEFAULT), DEFAULT)
    result = verify_password("secret", "{PLAIN}secret", FAST["ARGON2ID"])
    assert result.ok and result.scheme == "PLAIN"
    assert result.new_hash is not None and result.new_hash.startswith("{ARGON2ID}")
    assert check_password("secret", result.new_hash)
    assert verify_password("wrong", "{PLAIN}secret", DEFAULT) == type(result)(False, "PLAIN")
    same = verify_password("x", hash_password("x", FAST["BLF-CRYPT"]), FAST["BLF-CRYPT"])
    assert same.ok and same.new_hash is None
