# -*- test-case-name: tests.unit.test_dkim -*-
"""DKIM verification (RFC 6376 §6, RFC 8463, RFC 8301) of every signature on a message.

Two steps keep DNS out of this code: :class:`MessageVerifier` parses the signatures when built
and hashes the body as it streams (one hasher per distinct canonicalization, hash and ``l=``);
``key_names()`` says which key records to look up; ``finish(answers)`` checks each signature
against the records the caller found.

Results (RFC 8601 §2.7.1):

- ``pass``: the signature verifies with an acceptable key.
- ``fail``: body hash or signature does not verify; the key is revoked (empty ``p=``, RFC 6376
  §6.1.2 "treat as a failed signature check"); ``x=`` has passed (when ``now`` is given).
- ``policy``: it verifies, or could, but is not acceptable here: ``rsa-sha1`` or an RSA key
  under 1024 bits (RFC 8301), or ``l=`` leaving part of the body unsigned (content could have
  been appended, so it is never a ``pass``).
- ``permerror``: the signature breaks RFC 6376 (a malformed or missing tag, ``h=`` without From,
  ``i=`` outside ``d=``, an unknown algorithm or canonicalization, ``l=`` beyond the body), or
  the key is unusable: no record (NXDOMAIN or NODATA: RFC 6376 §6.1.2 "PERMFAIL (no key for
  signature)", which RFC 8601 writes ``permerror``), a malformed record, a key type or hash the
  record does not allow, a service type other than email.
- ``temperror``: the key lookup failed for now (DNS timeout, SERVFAIL).

At most ``MAX_SIGNATURES`` signatures are checked (the first ones from the top); the rest are
ignored, so a message cannot buy unbounded work or an unbounded Authentication-Results header.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mailplugins.dns import DnsTempError
from milterd.dkim.canon import BodyHasher, crlf_folds
from milterd.dkim.keyrecord import KeyRecord, KeyRecordError, parse_key_record
from milterd.dkim.signature import (
    ALGORITHMS,
    WEAK_ALGORITHMS,
    Signature,
    SignatureError,
    hashed_headers,
    parse_signature,
    select_headers,
    strip_b_value,
)

__all__ = ["MAX_SIGNATURES", "DkimResult", "MessageVerifier"]

MAX_SIGNATURES = 10
RSA_MIN_BITS = 1024
HEADER_B_LENGTH = 12
_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


@dataclass(frozen=True)
class DkimResult:
    result: str      # pass | fail | neutral | policy | temperror | permerror
    domain: str      # d=
    selector: str    # s=
    algorithm: str   # a=
    reason: str      # short text for the A-R comment
    header_b: str    # first characters of b=, for header.b


@dataclass
class _Entry:
    index: int                       # of the DKIM-Signature header
    value: str
    signature: Signature | None
    error: str                       # why it is a permerror / policy before any lookup
    error_result: str = "permerror"
    hasher: BodyHasher | None = None


class MessageVerifier:
    """Check every DKIM-Signature of one message (see the module docstring).

    ``headers`` are (name, value) in message order, values as after the colon. ``now`` (Unix
    time), when given, makes signatures past their ``x=`` fail.
    """

    def __init__(self, headers: Sequence[tuple[str, str]], *, now: int | None = None) -> None:
        # Folds as CRLF (Postfix hands a milter bare LF between folded lines).
        self._headers = [(n, v if "\n" not in v else crlf_folds(v)) for n, v in headers]
        self._now = now
        self._entries: list[_Entry] = []
        hashers: dict[tuple[str, str, int | None], BodyHasher] = {}
        for index, (name, value) in enumerate(self._headers):
            if name.lower() != "dkim-signature":
                continue
            if len(self._entries) >= MAX_SIGNATURES:
                break
            entry = self._parse(index, value)
            sig = entry.signature
            if sig is not None and not entry.error:
                key = (sig.body_canon, sig.hash_name, sig.length)
                if key not in hashers:
                    hashers[key] = BodyHasher(sig.body_canon, sig.hash_name, sig.length)
                entry.hasher = hashers[key]
            self._entries.append(entry)
        self._hashers = list(hashers.values())

    @staticmethod
    def _parse(index: int, value: str) -> _Entry:
        try:
            sig = parse_signature(value)
        except SignatureError as exc:
            return _Entry(index, value, None, str(exc))
        if sig.algorithm in WEAK_ALGORITHMS:
            return _Entry(index, value, sig, f"{sig.algorithm} is not accepted (RFC 8301)", "policy")
        if sig.algorithm not in ALGORITHMS:
            return _Entry(index, value, sig, f"unknown algorithm {sig.algorithm[:30]}")
        return _Entry(index, value, sig, "")

    def feed(self, chunk: bytes) -> None:
        for hasher in self._hashers:
            hasher.feed(chunk)

    def key_names(self) -> list[str]:
        """The key records to look up ("selector._domainkey.domain"), each once, in order."""
        names: list[str] = []
        for entry in self._entries:
            if entry.signature is not None and not entry.error:
                name = entry.signature.key_name
                if name not in names:
                    names.append(name)
        return names

    def finish(self, txt: Mapping[str, list[bytes] | DnsTempError | None]) -> list[DkimResult]:
        """One result per signature checked, top first. ``txt`` maps each of ``key_names()``
        to its TXT records (``None``: no record; a DnsTempError: the lookup failed)."""
        for hasher in self._hashers:
            hasher.digest()
        return [self._check(entry, txt) for entry in self._entries]

    def _check(self, entry: _Entry, txt: Mapping[str, list[bytes] | DnsTempError | None]
               ) -> DkimResult:
        sig = entry.signature
        if sig is None:
            return DkimResult("permerror", "", "", "", entry.error, "")

        def result(kind: str, reason: str) -> DkimResult:
            assert sig is not None
            return DkimResult(kind, sig.domain, sig.selector, sig.algorithm, reason,
                              sig.b_text[:HEADER_B_LENGTH])

        if entry.error:
            return result(entry.error_result, entry.error)
        hasher = entry.hasher
        assert hasher is not None
        if sig.length is not None and sig.length > hasher.length:
            return result("permerror", "l= is longer than the body")
        if self._now is not None and sig.expiration is not None and sig.expiration < self._now:
            return result("fail", "signature expired")
        found = txt.get(sig.key_name, DnsTempError("not looked up"))
        if isinstance(found, DnsTempError):
            return result("temperror", "key lookup failed")
        if not found:
            return result("permerror", "no key for signature")
        try:
            key = _first_key(found)
        except KeyRecordError as exc:
            return result("permerror", str(exc))
        problem = _key_problem(key, sig)
        if problem:
            return result(*problem)
        if not hmac.compare_digest(hasher.digest(), sig.body_hash):
            return result("fail", "body hash did not verify")
        selected = select_headers(self._headers, sig.headers, exclude=entry.index)
        data = hashed_headers(selected, sig.header_canon, self._headers[entry.index][0],
                              strip_b_value(entry.value))
        if not _verify(key, sig, data):
            return result("fail", "signature did not verify")
        testing = " (key in testing mode)" if key.testing else ""
        if key.key_type == "rsa" and key.bits < RSA_MIN_BITS:
            return result("policy", f"RSA key of {key.bits} bits is too short (RFC 8301)")
        if sig.length is not None and sig.length < hasher.length:
            return result("policy", f"l= leaves {hasher.length - sig.length} body bytes unsigned")
        return result("pass", f"{key.bits}-bit key" + testing if key.key_type == "rsa"
                      else "ed25519 key" + testing)


def _first_key(records: list[bytes]) -> KeyRecord:
    """The first usable record at the name (RFC 6376 §6.1.2 leaves several to the verifier)."""
    error: KeyRecordError | None = None
    for record in records:
        try:
            return parse_key_record(record)
        except KeyRecordError as exc:
            error = error or exc
    assert error is not None
    raise error


def _key_problem(key: KeyRecord, sig: Signature) -> tuple[str, str] | None:
    if key.revoked:
        return ("fail", "key revoked")
    if key.key_type != sig.algorithm.partition("-")[0]:
        return ("permerror", f"key type {key.key_type} does not match a={sig.algorithm}")
    if key.hashes is not None and sig.hash_name not in key.hashes:
        return ("permerror", f"key h= does not allow {sig.hash_name}")
    if not ({"email", "*"} & set(key.services)):
        return ("permerror", "key is not for email (s=)")
    if key.strict_subdomains and sig.identity.rpartition("@")[2].lower() != sig.domain:
        return ("permerror", "key t=s forbids a subdomain in i=")
    return None


def _verify(key: KeyRecord, sig: Signature, data: bytes) -> bool:
    digest = hashlib.new(sig.hash_name, data).digest()
    try:
        if isinstance(key.key, Ed25519PublicKey):
            key.key.verify(sig.signature, digest)  # RFC 8463: over the SHA-256 hash
        elif key.key is not None:
            key.key.verify(sig.signature, digest, padding.PKCS1v15(),
                           utils.Prehashed(_HASHES[sig.hash_name]()))
        else:  # pragma: no cover - revoked keys are refused before
            return False
    except InvalidSignature:
        return False
    return True
