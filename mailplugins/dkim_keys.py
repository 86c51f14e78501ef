# -*- test-case-name: tests.unit.test_dkim_keys -*-
"""DKIM signing keys in the database: generation, states, the signing choice, the DNS text.

In the core (not in milterd) because ``mailplugins doctor --dns`` and ``dns-records`` need the
keys and their record text, and the core imports no daemon. Everything here blocks: the CLI calls
it directly, milterd through its database pool (:mod:`milterd.keys`).

Life of a key: ``keygen`` makes it *pending* (published by the operator, never used to sign);
``activate`` makes it *active*; ``retire`` makes it *retired* for good (its private half is wiped).

Which keys sign (the rotation rule): for each key type (``rsa``, ``ed25519``) the active key
activated last. Activating a new key of a type makes it that type's signer at once; the older
active key of the type signs nothing more but stays active -- and so must stay published -- until
it is retired, so mail signed with it moments earlier still verifies. A domain with active keys of
both types is signed twice (dual signing); retiring its last key of one type ends that. Retiring
the last active key of a domain is refused unless forced: its mail would go out unsigned.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from sqlalchemy import Engine, Row, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from mailplugins.addresses import AddressError, parse_domain
from mailplugins.db.dkim_models import SELECTOR_LEN, DkimKey
from mailplugins.records import AlreadyExists, NotFound, StoreError, utcnow

__all__ = [
    "DEFAULT_RSA_BITS",
    "KEY_TYPES",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "STATES",
    "DkimKeyRecord",
    "DkimKeys",
    "PrivateKey",
    "choose_signers",
    "generate_key",
    "key_record_problem",
    "normalise_selector",
    "parse_tags",
    "signing_ids",
]

KEY_TYPES = ("rsa", "ed25519")
STATES = ("pending", "active", "retired")
DEFAULT_RSA_BITS = 2048
#: RFC 8301 lets signers use 1024 bits; the issue (and every large receiver's advice) says no.
MIN_RSA_BITS = 2048
#: RFC 8301 verifiers need not accept more (a 4096-bit record is already three TXT strings).
MAX_RSA_BITS = 4096
#: The order in which a domain's signatures are made (and so listed).
_TYPE_ORDER = {name: index for index, name in enumerate(KEY_TYPES)}
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True)
class DkimKeyRecord:
    """A key as listed: everything but the private half."""

    id: int
    domain: str
    selector: str
    key_type: str
    bits: int
    public_key: str
    state: str
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None

    @property
    def algorithm(self) -> str:
        """The signature algorithm (a=): ``rsa-sha256`` or ``ed25519-sha256``."""
        return f"{self.key_type}-sha256"

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def txt_value(self) -> str:
        """The key record (RFC 6376 3.6.1, RFC 8463 for k=ed25519), one string, unsplit."""
        return f"v=DKIM1; k={self.key_type}; p={self.public_key}"


@dataclass(frozen=True)
class PrivateKey:
    """A key to sign with now; ``repr`` leaves the private half out, so a stray log cannot leak it."""

    record: DkimKeyRecord
    private_key_pem: bytes = field(repr=False)


def normalise_selector(text: str) -> str:
    """A selector (RFC 6376 3.1: dot-separated labels), lower case; ValueError names the problem."""
    selector = text.strip().lower()
    if not selector or len(selector) > SELECTOR_LEN or not _SELECTOR.fullmatch(selector):
        raise ValueError(f"bad selector {text!r}: letters, digits and hyphens in dot-separated "
                         f"labels, at most {SELECTOR_LEN} characters")
    return selector


def generate_key(key_type: str, bits: int | None = None) -> tuple[bytes, str, int]:
    """A new key: (PKCS#8 PEM private key, the record's p= value, bits). ValueError if refused."""
    if key_type == "ed25519":
        if bits not in (None, 256):
            raise ValueError("--bits applies to RSA keys only (Ed25519 keys are 256 bits)")
        ed_key = ed25519.Ed25519PrivateKey.generate()
        public = ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw)
        pem = ed_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
        return pem, base64.b64encode(public).decode("ascii"), 256
    if key_type != "rsa":
        raise ValueError(f"unknown key type {key_type!r} (use {' or '.join(KEY_TYPES)})")
    size = DEFAULT_RSA_BITS if bits is None else bits
    if not MIN_RSA_BITS <= size <= MAX_RSA_BITS:
        raise ValueError(f"RSA keys of {size} bits are refused: use {MIN_RSA_BITS} to {MAX_RSA_BITS} "
                         "(1024-bit keys are breakable and many receivers ignore them)")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=size)
    der = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, base64.b64encode(der).decode("ascii"), size


def parse_tags(text: str) -> dict[str, str]:
    """A DKIM/DMARC tag list (``v=DKIM1; k=rsa; p=...``): tag names lower case, values stripped.

    Lenient on purpose (doctor and activate compare, they do not verify): a part without ``=``
    is skipped, a repeated tag keeps its first value.
    """
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def key_record_problem(published: bytes, key: DkimKeyRecord) -> str | None:
    """Why the TXT record ``published`` (its strings joined) is not ``key``'s, or None if it is."""
    text = published.decode("ascii", "replace")
    tags = parse_tags(text)
    if "p" not in tags:
        return "it has no p= tag"
    if tags.get("v", "DKIM1") != "DKIM1":
        return f"its v= is {tags['v']!r}, not DKIM1"
    if tags.get("k", "rsa").lower() != key.key_type:
        return f"its k= is {tags.get('k', 'rsa (by default)')}, the key is {key.key_type}"
    published_key = re.sub(r"\s+", "", tags["p"])
    if not published_key:
        return "its p= is empty (the key is revoked)"
    if published_key != key.public_key:
        return "its p= is another key"
    return None


def choose_signers(keys: Iterable[DkimKeyRecord]) -> list[DkimKeyRecord]:
    """The rotation rule: per key type, the active key activated last (then the newest row)."""
    best: dict[str, DkimKeyRecord] = {}
    for key in keys:
        if key.state != "active":
            continue
        current = best.get(key.key_type)
        if current is None or _activation_order(key) > _activation_order(current):
            best[key.key_type] = key
    return sorted(best.values(), key=lambda k: _TYPE_ORDER.get(k.key_type, len(_TYPE_ORDER)))


def _activation_order(key: DkimKeyRecord) -> tuple[datetime, int]:
    return (key.activated_at or key.created_at, key.id)


def _record(row: DkimKey | Row[Any]) -> DkimKeyRecord:
    """From an ORM row or a plain one (same attribute names)."""
    return DkimKeyRecord(
        id=row.id, domain=row.domain, selector=row.selector, key_type=row.key_type, bits=row.bits,
        public_key=row.public_key, state=row.state, created_at=row.created_at,
        activated_at=row.activated_at, retired_at=row.retired_at,
    )


def _domain(text: str) -> str:
    try:
        return parse_domain(text)
    except AddressError as exc:
        raise StoreError(f"{text}: {exc}") from None


class DkimKeys:
    """The ``dkim_keys`` table. ``clock`` returns naive UTC datetimes (tests inject their own)."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def _session(self) -> Session:
        return self._sessions()

    def default_selector(self, domain: str, key_type: str) -> str:
        """``mp<YYYYMM><r|e>``, with 2, 3... appended when this domain already used that one."""
        base = f"mp{self._clock():%Y%m}{key_type[0]}"
        with self._session() as session:
            taken = set(session.scalars(select(DkimKey.selector).where(
                DkimKey.domain == _domain(domain), DkimKey.selector.startswith(base))))
        if base not in taken:
            return base
        return next(f"{base}{n}" for n in range(2, len(taken) + 3) if f"{base}{n}" not in taken)

    def generate(self, domain_text: str, *, selector: str | None = None, key_type: str = "rsa",
                 bits: int | None = None) -> DkimKeyRecord:
        """A new *pending* key; StoreError (one line, never key material) when refused."""
        domain = _domain(domain_text)
        try:
            chosen = normalise_selector(selector) if selector else self.default_selector(domain, key_type)
            pem, public, size = generate_key(key_type, bits)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        with self._session() as session, session.begin():
            if self._find(session, domain, chosen) is not None:
                raise AlreadyExists(f"selector {chosen} already exists for {domain} "
                                    "(selectors are never reused: choose another)")
            row = DkimKey(domain=domain, selector=chosen, key_type=key_type, bits=size,
                          private_key=pem.decode("ascii"), public_key=public, state="pending",
                          created_at=self._clock())
            session.add(row)
            try:
                session.flush()
            except IntegrityError:  # a concurrent keygen took it; the message must not echo the key
                raise AlreadyExists(f"selector {chosen} already exists for {domain}") from None
            return _record(row)

    @staticmethod
    def _find(session: Session, domain: str, selector: str) -> DkimKey | None:
        return session.scalar(select(DkimKey).where(DkimKey.domain == domain,
                                                    DkimKey.selector == selector.lower()))

    def _require(self, session: Session, domain: str, selector: str) -> DkimKey:
        row = self._find(session, domain, selector)
        if row is None:
            raise NotFound(f"no DKIM key {selector} for {domain}")
        return row

    def get(self, domain_text: str, selector: str) -> DkimKeyRecord | None:
        with self._session() as session:
            row = self._find(session, _domain(domain_text), selector)
            return _record(row) if row is not None else None

    def list_keys(self, domain_text: str | None = None) -> list[DkimKeyRecord]:
        """Keys by domain, oldest first."""
        query = select(DkimKey).order_by(DkimKey.domain, DkimKey.created_at, DkimKey.id)
        if domain_text is not None:
            query = query.where(DkimKey.domain == _domain(domain_text))
        with self._session() as session:
            return [_record(row) for row in session.scalars(query)]

    def domains(self) -> list[str]:
        with self._session() as session:
            return list(session.scalars(select(DkimKey.domain).distinct().order_by(DkimKey.domain)))

    def activate(self, domain_text: str, selector: str) -> DkimKeyRecord:
        """pending -> active: from now on it is its type's signer for the domain."""
        domain = _domain(domain_text)
        with self._session() as session, session.begin():
            row = self._require(session, domain, selector)
            if row.state != "pending":
                raise StoreError(f"DKIM key {row.selector} of {domain} is {row.state}, not pending")
            # Whole seconds (MariaDB's DATETIME keeps no more), strictly after the type's last
            # activation: two activations in one second must still order as they happened.
            when = self._clock().replace(microsecond=0)
            last = session.scalar(select(func.max(DkimKey.activated_at)).where(
                DkimKey.domain == domain, DkimKey.key_type == row.key_type))
            if last is not None and last >= when:
                when = last.replace(microsecond=0) + timedelta(seconds=1)
            row.state = "active"
            row.activated_at = when
            return _record(row)

    def retire(self, domain_text: str, selector: str, *, force: bool = False) -> DkimKeyRecord:
        """pending/active -> retired, for good; the private key is wiped."""
        domain = _domain(domain_text)
        with self._session() as session, session.begin():
            row = self._require(session, domain, selector)
            if row.state == "retired":
                raise StoreError(f"DKIM key {row.selector} of {domain} is already retired")
            if row.state == "active" and not force:
                others = session.scalar(select(DkimKey.id).where(
                    DkimKey.domain == domain, DkimKey.state == "active", DkimKey.id != row.id).limit(1))
                if others is None:
                    raise StoreError(f"{row.selector} is the last active DKIM key of {domain}: its mail "
                                     "would go out unsigned (activate a new key first, or --force)")
            row.state = "retired"
            row.retired_at = self._clock()
            row.private_key = ""
            return _record(row)

    def signing_keys(self, domain_text: str) -> list[PrivateKey]:
        """The keys to sign ``domain``'s mail with now (see :func:`choose_signers`); [] if none."""
        try:
            domain = parse_domain(domain_text)
        except AddressError:
            return []
        # Once per message (less milterd's cache): plain rows, no ORM session (a third cheaper).
        table = DkimKey.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(select(table).where(table.c.domain == domain,
                                                    table.c.state == "active")).all()
        by_id = {row.id: row for row in rows}
        return [PrivateKey(key, by_id[key.id].private_key.encode("ascii"))
                for key in choose_signers(_record(row) for row in rows)]


def signing_ids(keys: Sequence[DkimKeyRecord]) -> set[int]:
    """The ids of the keys that sign now, over every domain in ``keys`` (for listings)."""
    domains = {key.domain for key in keys}
    return {signer.id for d in domains for signer in choose_signers(k for k in keys if k.domain == d)}
