# -*- test-case-name: tests.unit.test_dkim -*-
"""DKIM-Signature header values (RFC 6376 §3.5): parse and check, and the header selection
and hashing both signer and verifier use (§5.4.2, §3.7)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from milterd.dkim.canon import canonicalize_header, header_bytes
from milterd.dkim.tags import TagError, parse_tags, strip_fws

__all__ = ["ALGORITHMS", "Signature", "SignatureError", "hashed_headers", "parse_signature",
           "select_headers", "strip_b_value"]

#: a= values we can verify, and a= values we recognise but never count as pass (RFC 8301).
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
WEAK_ALGORITHMS = ("rsa-sha1",)
_DOMAIN = re.compile(r"(?=.{1,253}\Z)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                     r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_H_LIST = re.compile(r"[\x21-\x39\x3b-\x7e]+(?:[ \t\r\n]*:[ \t\r\n]*[\x21-\x39\x3b-\x7e]+)*\Z")
_B_TAG = re.compile(r"((?:^|;)[ \t\r\n]*b[ \t\r\n]*=)[^;]*")
MAX_L = 2**63


class SignatureError(ValueError):
    """The signature breaks RFC 6376 (a permerror); the message says how."""


@dataclass(frozen=True)
class Signature:
    algorithm: str                 # a=, lower case
    domain: str                    # d=, lower case
    selector: str                  # s=, lower case
    header_canon: str              # simple | relaxed
    body_canon: str
    headers: tuple[str, ...]       # h=, as written
    body_hash: bytes               # bh=, decoded
    signature: bytes               # b=, decoded
    b_text: str                    # b= as written, whitespace removed (for header.b)
    length: int | None             # l=
    identity: str                  # i= (default "@" + d=)
    timestamp: int | None          # t=
    expiration: int | None         # x=

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def hash_name(self) -> str:
        return self.algorithm.partition("-")[2]


def parse_signature(value: str) -> Signature:
    """Parse a DKIM-Signature value. Raises :class:`SignatureError` (a permerror)."""
    try:
        tags = parse_tags(value)
    except TagError as exc:
        raise SignatureError(str(exc)) from None
    for required in ("v", "a", "b", "bh", "d", "h", "s"):
        if required not in tags:
            raise SignatureError(f"no {required}= tag")
    if tags["v"] != "1":
        raise SignatureError("v= is not 1")
    algorithm = tags["a"].lower()
    domain = tags["d"].lower()
    selector = tags["s"].lower()
    if not _DOMAIN.match(domain):
        raise SignatureError("d= is not a domain name")
    if not _DOMAIN.match(selector) or len(f"{selector}._domainkey.{domain}") > 253:
        raise SignatureError("s= is not a selector")
    header_canon, _, body_canon = tags.get("c", "simple/simple").lower().partition("/")
    body_canon = body_canon or "simple"
    if header_canon not in ("simple", "relaxed") or body_canon not in ("simple", "relaxed"):
        raise SignatureError("unknown c= canonicalization")
    if not _H_LIST.match(tags["h"]):
        raise SignatureError("bad header name in h=")
    headers = tuple(h.strip(" \t\r\n") for h in tags["h"].split(":"))
    if "from" not in (h.lower() for h in headers):
        raise SignatureError("h= does not sign From")
    body_hash = _base64(tags["bh"], "bh")
    b_text = strip_fws(tags["b"])
    signature = _base64(tags["b"], "b")
    if not signature or not body_hash:
        raise SignatureError("empty b= or bh=")
    length = _number(tags, "l")
    identity = tags.get("i", "@" + domain)
    _local, at, identity_domain = identity.rpartition("@")
    identity_domain = identity_domain.lower()
    if not at or not (identity_domain == domain or identity_domain.endswith("." + domain)):
        raise SignatureError("i= is not within d=")
    timestamp = _number(tags, "t")
    expiration = _number(tags, "x")
    if timestamp is not None and expiration is not None and expiration < timestamp:
        raise SignatureError("x= is before t=")
    if "q" in tags and "dns/txt" not in (q.strip().lower() for q in tags["q"].split(":")):
        raise SignatureError("q= offers no dns/txt")
    return Signature(algorithm, domain, selector, header_canon, body_canon, headers, body_hash,
                     signature, b_text, length, identity, timestamp, expiration)


def _base64(value: str, tag: str) -> bytes:
    text = strip_fws(value)
    if len(text) % 4:
        raise SignatureError(f"{tag}= is not base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{tag}= is not base64") from None


def _number(tags: dict[str, str], tag: str) -> int | None:
    if tag not in tags:
        return None
    value = tags[tag]
    if not value.isdigit() or not value.isascii() or len(value) > 76:
        raise SignatureError(f"{tag}= is not a number")
    number = int(value)
    return min(number, MAX_L)


def select_headers(headers: Sequence[tuple[str, str]], names: Sequence[str],
                   exclude: int | None = None) -> list[tuple[str, str]]:
    """The header instances ``names`` (an ``h=`` list) signs, RFC 6376 §5.4.2: each name takes
    the last instance not yet taken, bottom up; a name with none left signs nothing (so it
    oversigns: adding such a header later breaks the signature). ``exclude`` is the index of
    the DKIM-Signature being verified, never one of its own inputs."""
    by_name: dict[str, list[int]] = {}
    for index, (name, _value) in enumerate(headers):
        if index != exclude:
            by_name.setdefault(name.lower(), []).append(index)
    chosen = []
    for name in names:
        instances = by_name.get(name.lower())
        if instances:
            chosen.append(headers[instances.pop()])
    return chosen


def strip_b_value(value: str) -> str:
    """The DKIM-Signature value with the b= tag's value emptied (§3.7), all else unchanged."""
    return _B_TAG.sub(r"\1", value, count=1)


def hashed_headers(selected: Sequence[tuple[str, str]], canon: str, sig_name: str,
                   sig_value_without_b: str) -> bytes:
    """The header data a signature covers: the selected headers, then its own DKIM-Signature
    (b= empty, no final CRLF)."""
    text = "".join(canonicalize_header(n, v, canon) for n, v in selected)
    text += canonicalize_header(sig_name, sig_value_without_b, canon)[:-2]
    return header_bytes(text)
