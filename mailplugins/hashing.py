# -*- test-case-name: tests.unit.test_hashing -*-
"""Password hashes in Dovecot's ``{SCHEME}hash`` form, made and checked with libpass.

Dovecot reads what we store (the dict passdb hands it the hash), so every hash we write must be
one ``doveadm pw -t`` accepts, and every hash an existing installation has must verify here so
users can be imported as they are. Weaker schemes are rehashed to the configured default on the
next successful login (:attr:`Verification.new_hash`).

These functions are CPU-bound (argon2 and bcrypt take tens of milliseconds): call them from a
worker thread pool, never on the reactor.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from passlib.hash import (
    argon2,
    bcrypt,
    des_crypt,
    ldap_salted_sha1,
    ldap_sha1,
    md5_crypt,
    sha256_crypt,
    sha512_crypt,
)

from mailplugins.config import PasswordConfig

#: bcrypt only reads 72 bytes; Dovecot's crypt_blowfish truncates silently, and so do we.
BCRYPT_MAX_BYTES = 72

#: Schemes whose hashes are strong enough that only parameter changes trigger a rehash.
STRONG_SCHEMES = ("ARGON2ID", "ARGON2I", "BLF-CRYPT")


class HashError(ValueError):
    """A stored value that is not a hash we can read (never contains the hash itself)."""


@dataclass(frozen=True)
class Verification:
    ok: bool
    scheme: str
    #: When set, the caller should store this instead (stronger scheme or parameters).
    new_hash: str | None = None


def split_scheme(stored: str) -> tuple[str, str]:
    """``{SCHEME}rest`` -> (``SCHEME``, ``rest``); the scheme upper-cased, encoding suffix kept."""
    if not stored.startswith("{") or "}" not in stored:
        raise HashError("stored password has no {SCHEME} prefix")
    scheme, rest = stored[1:].split("}", 1)
    return scheme.upper(), rest


def _bcrypt_secret(password: str) -> bytes:
    return password.encode("utf-8")[:BCRYPT_MAX_BYTES]


def hash_password(password: str, config: PasswordConfig) -> str:
    """A new hash in the configured scheme, in the form Dovecot stores."""
    if config.scheme == "ARGON2ID":
        handler: Any = argon2.using(
            type="ID",
            memory_cost=config.argon2_memory_kib,
            rounds=config.argon2_time_cost,
            parallelism=config.argon2_parallelism,
        )
        return "{ARGON2ID}" + str(handler.hash(password))
    if config.scheme == "BLF-CRYPT":
        value = bcrypt.using(ident="2y", rounds=config.bcrypt_cost).hash(_bcrypt_secret(password))
        return "{BLF-CRYPT}" + str(value)
    if config.scheme == "SHA512-CRYPT":
        return "{SHA512-CRYPT}" + str(sha512_crypt.using(rounds=config.sha_crypt_rounds).hash(password))
    raise HashError(f"cannot make hashes of scheme {config.scheme}")


def _check_crypt(password: str, value: str) -> bool:
    """libc crypt(3) formats, as Dovecot's {CRYPT} accepts them."""
    if value.startswith("$6$"):
        return bool(sha512_crypt.verify(password, value))
    if value.startswith("$5$"):
        return bool(sha256_crypt.verify(password, value))
    if value.startswith(("$2y$", "$2b$", "$2a$")):
        return bool(bcrypt.verify(_bcrypt_secret(password), value))
    if value.startswith("$1$"):
        return bool(md5_crypt.verify(password, value))
    if value.startswith(("$argon2id$", "$argon2i$")):
        return bool(argon2.verify(password, value))
    if len(value) == 13:
        return bool(des_crypt.verify(password, value))
    raise HashError("unrecognised crypt(3) hash format")


def _decode_digest(data: str, encoding: str) -> bytes:
    if encoding == "HEX":
        return bytes.fromhex(data)
    return base64.b64decode(data, validate=True)


def _check_plain(password: str, data: str, encoding: str) -> bool:
    if encoding in ("B64", "BASE64"):
        expected = base64.b64decode(data, validate=True)
    elif encoding == "HEX":
        expected = bytes.fromhex(data)
    else:
        expected = data.encode("utf-8")
    return hmac.compare_digest(password.encode("utf-8"), expected)


def _check_salted_digest(password: str, data: str, encoding: str, name: str, size: int) -> bool:
    raw = _decode_digest(data, encoding)
    if len(raw) < size:
        raise HashError("salted digest too short")
    digest, salt = raw[:size], raw[size:]
    computed = hashlib.new(name, password.encode("utf-8") + salt).digest()
    return hmac.compare_digest(digest, computed)


def check_password(password: str, stored: str) -> bool:
    """Does ``password`` match ``stored``? Raises HashError for unreadable hashes."""
    scheme, value = split_scheme(stored)
    base, _, encoding = scheme.partition(".")
    encoding = encoding.upper()
    try:
        if base in ("ARGON2ID", "ARGON2I"):
            return bool(argon2.verify(password, value))
        if base == "BLF-CRYPT":
            return bool(bcrypt.verify(_bcrypt_secret(password), value))
        if base == "SHA512-CRYPT":
            return bool(sha512_crypt.verify(password, value))
        if base == "SHA256-CRYPT":
            return bool(sha256_crypt.verify(password, value))
        if base == "MD5-CRYPT":
            return bool(md5_crypt.verify(password, value))
        if base == "CRYPT" or base == "DES-CRYPT":
            return _check_crypt(password, value)
        if base == "SSHA512":
            return _check_salted_digest(password, value, encoding, "sha512", 64)
        if base == "SSHA256":
            return _check_salted_digest(password, value, encoding, "sha256", 32)
        if base == "SSHA":
            return bool(ldap_salted_sha1.verify(password, "{SSHA}" + value))
        if base == "SHA":
            return bool(ldap_sha1.verify(password, "{SHA}" + value))
        if base == "PLAIN":
            return _check_plain(password, value, encoding)
        if base in ("PLAIN-MD5", "LDAP-MD5"):
            digest = hashlib.md5(password.encode("utf-8"), usedforsecurity=False).digest()
            stored_digest = bytes.fromhex(value) if base == "PLAIN-MD5" and len(value) == 32 else (
                base64.b64decode(value, validate=True))
            return hmac.compare_digest(digest, stored_digest)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, HashError):
            raise
        raise HashError(f"malformed {base} hash") from None
    raise HashError(f"unsupported password scheme {base}")


def needs_rehash(stored: str, config: PasswordConfig) -> bool:
    """True when ``stored`` is weaker than (or differs in parameters from) the configured default."""
    scheme, value = split_scheme(stored)
    if scheme != config.scheme:
        return True
    if scheme == "ARGON2ID":
        current = argon2.from_string(value)
        return bool(
            current.memory_cost < config.argon2_memory_kib
            or current.rounds < config.argon2_time_cost
        )
    if scheme == "BLF-CRYPT":
        return int(value.split("$")[2]) < config.bcrypt_cost
    if scheme == "SHA512-CRYPT":
        rounds = 5000
        if value.startswith("$6$rounds="):
            rounds = int(value.split("$")[2].split("=")[1])
        return rounds < config.sha_crypt_rounds
    return True


def verify_password(password: str, stored: str, config: PasswordConfig) -> Verification:
    """Check a password and say whether the stored hash should be upgraded."""
    scheme = split_scheme(stored)[0]
    if not check_password(password, stored):
        return Verification(False, scheme)
    new_hash = hash_password(password, config) if needs_rehash(stored, config) else None
    return Verification(True, scheme, new_hash)


__all__ = [
    "HashError",
    "Verification",
    "check_password",
    "hash_password",
    "needs_rehash",
    "split_scheme",
    "verify_password",
]
