# -*- test-case-name: tests.unit.test_dkim -*-
"""DKIM public key records (RFC 6376 §3.6.1, RFC 8463): parse a published TXT record.

``v=DKIM1`` (optional, first if present), ``k=`` key type (``rsa`` default, ``ed25519``), ``p=``
the key (empty: revoked), ``h=`` acceptable hashes, ``s=`` service types (``email`` or ``*``),
``t=`` flags (``y`` testing, ``s`` no subdomains in ``i=``). Unknown tags are ignored, as the RFC
says. The key is loaded with ``cryptography`` here, once per record text (cached), so a verifier
with a usable :class:`KeyRecord` holds a ready key object.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

from milterd.dkim.tags import TagError, parse_tags, strip_fws

__all__ = ["KeyRecord", "KeyRecordError", "PublicKey", "parse_key_record"]

PublicKey = RSAPublicKey | Ed25519PublicKey


class KeyRecordError(ValueError):
    """The record is not a usable DKIM key; the message says why (for the A-R comment)."""


@dataclass(frozen=True)
class KeyRecord:
    key_type: str                 # "rsa" | "ed25519"
    key: PublicKey | None         # None: revoked (empty p=)
    hashes: tuple[str, ...] | None  # h=, None: any
    services: tuple[str, ...]     # s=
    testing: bool                 # t=y
    strict_subdomains: bool       # t=s

    @property
    def revoked(self) -> bool:
        return self.key is None

    @property
    def bits(self) -> int:
        """RSA modulus size (Ed25519: 256)."""
        return self.key.key_size if isinstance(self.key, RSAPublicKey) else 256


def parse_key_record(record: bytes | str) -> KeyRecord:
    """Parse one TXT record (its strings already joined). Raises :class:`KeyRecordError`."""
    return _parse(record if isinstance(record, bytes) else record.encode("utf-8", "replace"))


@functools.lru_cache(maxsize=256)
def _parse(record: bytes) -> KeyRecord:
    try:
        text = record.decode("ascii")
    except UnicodeDecodeError:
        raise KeyRecordError("key record is not ASCII") from None
    try:
        tags = parse_tags(text)
    except TagError as exc:
        raise KeyRecordError(f"key record syntax: {exc}") from None
    if "v" in tags and (tags["v"] != "DKIM1" or next(iter(tags)) != "v"):
        raise KeyRecordError("key record v= is not DKIM1 (or not first)")
    key_type = tags.get("k", "rsa").lower()
    if key_type not in ("rsa", "ed25519"):
        raise KeyRecordError(f"unknown key type k={key_type[:20]}")
    if "p" not in tags:
        raise KeyRecordError("key record has no p=")
    hashes = None
    if "h" in tags:
        hashes = tuple(h.strip().lower() for h in tags["h"].split(":"))
    services = tuple(s.strip().lower() for s in tags.get("s", "*").split(":"))
    flags = tuple(f.strip().lower() for f in tags.get("t", "").split(":"))
    data = strip_fws(tags["p"])
    key = _load_key(key_type, data) if data else None
    return KeyRecord(key_type, key, hashes, services, "y" in flags, "s" in flags)


def _load_key(key_type: str, data: str) -> PublicKey:
    try:
        if len(data) % 4:
            raise ValueError("length")
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise KeyRecordError("key record p= is not base64") from None
    if key_type == "ed25519":
        if len(raw) != 32:
            raise KeyRecordError(f"ed25519 key of {len(raw)} bytes, not 32")
        return Ed25519PublicKey.from_public_bytes(raw)
    try:
        key = load_der_public_key(raw)  # SubjectPublicKeyInfo, what everyone publishes
    except ValueError:
        try:  # RFC 6376 §3.6.1 literally says RSAPublicKey (PKCS#1): accept it too
            pem = (b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(raw)
                   + b"-----END RSA PUBLIC KEY-----\n")
            key = load_pem_public_key(pem)
        except ValueError:
            raise KeyRecordError("key record p= is not an RSA public key") from None
    if not isinstance(key, RSAPublicKey):
        raise KeyRecordError("k=rsa but p= holds another kind of key")
    return key
