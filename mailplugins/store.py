# -*- test-case-name: tests.unit.test_store -*-
"""Queries and changes on the user database, as plain synchronous methods.

Everything here blocks: the CLI calls it directly, daemons through their database
:class:`~mailplugins.threads.WorkerPool`. Methods return frozen records
(:mod:`mailplugins.records`), never ORM objects or result proxies, so nothing lazy crosses a
thread boundary. The records and errors stay importable from here too.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from mailplugins.addresses import Address, AddressError, parse_address, parse_domain
from mailplugins.db.models import (
    Alias,
    AliasTarget,
    AppPassword,
    Domain,
    Mailbox,
    SenderGrant,
    Setting,
)
from mailplugins.records import (
    SERVICES,
    AliasRecord,
    AlreadyExists,
    AppPasswordRecord,
    Delivery,
    DomainRecord,
    GrantRecord,
    MailboxRecord,
    NotFound,
    Resolution,
    StoreError,
    utcnow,
)

#: Alias chains deeper than this are a loop or a mistake (Postfix's virtual_alias_recursion_limit).
ALIAS_RECURSION_LIMIT = 1000
ALIAS_DEPTH_LIMIT = 20

#: Store, and (re-exported for code written before mailplugins.records) the records and errors.
__all__ = [
    "ALIAS_DEPTH_LIMIT", "ALIAS_RECURSION_LIMIT", "SERVICES", "AliasRecord", "AlreadyExists",
    "AppPasswordRecord", "Delivery", "DomainRecord", "GrantRecord", "MailboxRecord", "NotFound",
    "Resolution", "Store", "StoreError", "utcnow",
]


@dataclass
class _Expansion:
    deliveries: list[Delivery] = field(default_factory=list)
    forwards: list[str] = field(default_factory=list)
    disabled: list[MailboxRecord] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    steps: int = 0


def _mailbox_record(row: Mailbox, domain: str) -> MailboxRecord:
    services = frozenset(s for s in SERVICES if getattr(row, f"allow_{s}"))
    return MailboxRecord(
        id=row.id,
        local_part=row.local_part,
        domain=domain,
        password=row.password,
        enabled=row.enabled,
        quota_bytes=row.quota_bytes,
        services=services,
        password_version=row.password_version,
        created_at=row.created_at,
        last_login_at=row.last_login_at,
        master=row.master,
    )


def _address(text: str | Address, *, catch_all: bool = False) -> Address:
    if isinstance(text, Address):
        return text
    try:
        return parse_address(text, allow_empty_local=catch_all)
    except AddressError as exc:
        raise StoreError(f"{text}: {exc}") from None


def _services(text: Sequence[str]) -> str:
    unknown = [s for s in text if s not in SERVICES]
    if unknown:
        raise StoreError(f"unknown service {unknown[0]!r} (use {', '.join(SERVICES)})")
    return ",".join(s for s in SERVICES if s in text)


class Store:
    """The user database. ``clock`` returns naive UTC datetimes (tests inject their own)."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def session(self) -> Session:
        return self._sessions()

    # -- domains ---------------------------------------------------------------------------

    def _domain(self, session: Session, name: str) -> Domain:
        domain = session.scalar(select(Domain).where(Domain.name == name))
        if domain is None:
            raise NotFound(f"domain {name} does not exist")
        return domain

    def add_domain(self, name: str) -> str:
        try:
            domain = parse_domain(name)
        except AddressError as exc:
            raise StoreError(f"{name}: {exc}") from None
        with self.session() as session, session.begin():
            if session.scalar(select(Domain.id).where(Domain.name == domain)) is not None:
                raise AlreadyExists(f"domain {domain} already exists")
            session.add(Domain(name=domain, created_at=self._clock()))
        return domain

    def remove_domain(self, name: str, *, force: bool = False) -> None:
        domain_name = _address(f"x@{name}").domain
        with self.session() as session, session.begin():
            domain = self._domain(session, domain_name)
            count = session.scalar(
                select(func.count()).select_from(Mailbox).where(Mailbox.domain_id == domain.id)
            )
            if count and not force:
                raise StoreError(f"domain {domain_name} still has {count} mailbox(es)")
            session.delete(domain)

    def list_domains(self) -> list[DomainRecord]:
        with self.session() as session:
            mailbox_counts = dict(
                session.execute(select(Mailbox.domain_id, func.count()).group_by(Mailbox.domain_id)).all()
            )
            alias_counts = dict(
                session.execute(select(Alias.domain_id, func.count()).group_by(Alias.domain_id)).all()
            )
            return [
                DomainRecord(d.name, mailbox_counts.get(d.id, 0), alias_counts.get(d.id, 0), d.created_at)
                for d in session.scalars(select(Domain).order_by(Domain.name))
            ]

    def is_local_domain(self, domain: str) -> bool:
        with self.session() as session:
            return session.scalar(select(Domain.id).where(Domain.name == domain)) is not None

    # -- mailboxes -------------------------------------------------------------------------

    def _mailbox_row(self, session: Session, address: Address) -> tuple[Mailbox, Domain] | None:
        row = session.execute(
            select(Mailbox, Domain)
            .join(Domain, Mailbox.domain_id == Domain.id)
            .where(Domain.name == address.domain, Mailbox.local_key == address.local_key)
        ).first()
        return (row[0], row[1]) if row else None

    def _require_mailbox(self, session: Session, text: str | Address) -> Mailbox:
        address = _address(text)
        found = self._mailbox_row(session, address)
        if found is None:
            raise NotFound(f"mailbox {address} does not exist")
        return found[0]

    def add_mailbox(
        self,
        address_text: str | Address,
        password_hash: str,
        *,
        quota_bytes: int = 0,
        services: Sequence[str] = SERVICES,
    ) -> MailboxRecord:
        address = _address(address_text)
        if address.routing:
            raise StoreError(f"{address}: routing characters (% ! @) are not allowed in a mailbox")
        allowed = _services(services).split(",")
        with self.session() as session, session.begin():
            domain = self._domain(session, address.domain)
            if self._mailbox_row(session, address) is not None:
                raise AlreadyExists(f"mailbox {address} already exists")
            row = Mailbox(
                domain_id=domain.id,
                local_part=address.local,
                local_key=address.local_key,
                password=password_hash,
                enabled=True,
                quota_bytes=quota_bytes,
                password_version=0,
                created_at=self._clock(),
                **{f"allow_{s}": s in allowed for s in SERVICES},
            )
            session.add(row)
            try:
                session.flush()
            except IntegrityError:
                raise AlreadyExists(f"mailbox {address} already exists") from None
            return _mailbox_record(row, domain.name)

    def get_mailbox(self, address: str | Address) -> MailboxRecord | None:
        parsed = _address(address)
        with self.session() as session:
            found = self._mailbox_row(session, parsed)
            return _mailbox_record(found[0], found[1].name) if found else None

    def get_mailbox_by_id(self, mailbox_id: int) -> MailboxRecord | None:
        with self.session() as session:
            row = session.execute(
                select(Mailbox, Domain).join(Domain).where(Mailbox.id == mailbox_id)
            ).first()
            return _mailbox_record(row[0], row[1].name) if row else None

    def _update_mailbox(self, address: str | Address, **values: object) -> None:
        with self.session() as session, session.begin():
            row = self._require_mailbox(session, address)
            for key, value in values.items():
                setattr(row, key, value)

    def set_password(self, address: str | Address, password_hash: str) -> None:
        with self.session() as session, session.begin():
            row = self._require_mailbox(session, address)
            row.password = password_hash
            row.password_version = row.password_version + 1

    def replace_password_hash(self, mailbox_id: int, old_hash: str, new_hash: str) -> bool:
        """Rehash on login: only if nobody changed the password meanwhile (compare-and-set)."""
        with self.session() as session, session.begin():
            result = session.execute(
                update(Mailbox)
                .where(Mailbox.id == mailbox_id, Mailbox.password == old_hash)
                .values(password=new_hash)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def set_enabled(self, address: str | Address, enabled: bool) -> None:
        self._update_mailbox(address, enabled=enabled)

    def set_master(self, address: str | Address, master: bool) -> None:
        """Make a mailbox a master user (or not): it may then log in as any other mailbox."""
        self._update_mailbox(address, master=master)

    def set_quota(self, address: str | Address, quota_bytes: int) -> None:
        if quota_bytes < 0:
            raise StoreError("quota must not be negative")
        self._update_mailbox(address, quota_bytes=quota_bytes)

    def set_services(self, address: str | Address, services: Sequence[str]) -> None:
        allowed = _services(services).split(",")
        self._update_mailbox(address, **{f"allow_{s}": s in allowed for s in SERVICES})

    def record_login(self, mailbox_id: int, when: datetime | None = None) -> None:
        with self.session() as session, session.begin():
            session.execute(
                update(Mailbox).where(Mailbox.id == mailbox_id).values(last_login_at=when or self._clock())
            )

    def remove_mailbox(self, address: str | Address) -> None:
        with self.session() as session, session.begin():
            session.delete(self._require_mailbox(session, address))

    def list_mailboxes(self, domain: str | None = None) -> list[MailboxRecord]:
        with self.session() as session:
            query = select(Mailbox, Domain).join(Domain).order_by(Domain.name, Mailbox.local_key)
            if domain is not None:
                query = query.where(Domain.name == _address(f"x@{domain}").domain)
            return [_mailbox_record(m, d.name) for m, d in session.execute(query).all()]

    def iter_mailboxes(self, batch: int = 500) -> Iterator[MailboxRecord]:
        """Every mailbox in address order, fetched in batches (dict iteration over many users)."""
        last = ("", "")
        while True:
            with self.session() as session:
                rows = session.execute(
                    select(Mailbox, Domain)
                    .join(Domain)
                    .where(
                        (Domain.name > last[0])
                        | ((Domain.name == last[0]) & (Mailbox.local_key > last[1]))
                    )
                    .order_by(Domain.name, Mailbox.local_key)
                    .limit(batch)
                ).all()
                records = [_mailbox_record(m, d.name) for m, d in rows]
            yield from records
            if len(records) < batch:
                return
            last = (rows[-1][1].name, rows[-1][0].local_key)

    # -- aliases ---------------------------------------------------------------------------

    def add_alias(self, address_text: str, targets: Sequence[str]) -> AliasRecord:
        """Create ``address`` or add ``targets`` to it; ``@domain`` is the catch-all."""
        address = _address(address_text, catch_all=True)
        if not targets:
            raise StoreError("an alias needs at least one target")
        normalised = [str(_address(t)) for t in targets]
        with self.session() as session, session.begin():
            domain = self._domain(session, address.domain)
            alias = session.scalar(
                select(Alias).where(Alias.domain_id == domain.id, Alias.local_key == address.local_key)
            )
            if alias is None:
                alias = Alias(
                    domain_id=domain.id,
                    local_part=address.local,
                    local_key=address.local_key,
                    created_at=self._clock(),
                )
                session.add(alias)
                session.flush()
            existing = {t.target.casefold() for t in alias.targets}
            position = len(alias.targets)
            for target in normalised:
                if target.casefold() not in existing:
                    session.add(AliasTarget(alias_id=alias.id, target=target, position=position))
                    existing.add(target.casefold())
                    position += 1
            session.flush()
            session.refresh(alias)
            return AliasRecord(str(address) if address.local else f"@{address.domain}",
                               tuple(t.target for t in alias.targets))

    def remove_alias(self, address_text: str, targets: Sequence[str] = ()) -> None:
        """Remove the whole alias, or only some of its targets."""
        address = _address(address_text, catch_all=True)
        with self.session() as session, session.begin():
            domain = self._domain(session, address.domain)
            alias = session.scalar(
                select(Alias).where(Alias.domain_id == domain.id, Alias.local_key == address.local_key)
            )
            if alias is None:
                raise NotFound(f"alias {address_text} does not exist")
            if not targets:
                session.delete(alias)
                return
            wanted = {str(_address(t)).casefold() for t in targets}
            for target in list(alias.targets):
                if target.target.casefold() in wanted:
                    session.delete(target)
                    wanted.discard(target.target.casefold())
            if wanted:
                raise NotFound(f"alias {address_text} has no target {sorted(wanted)[0]}")
            session.flush()
            session.refresh(alias)
            if not alias.targets:
                session.delete(alias)

    def list_aliases(self) -> list[AliasRecord]:
        with self.session() as session:
            rows = session.execute(
                select(Alias, Domain).join(Domain).order_by(Domain.name, Alias.local_key)
            ).all()
            return [
                AliasRecord(
                    f"{a.local_part}@{d.name}" if a.local_part else f"@{d.name}",
                    tuple(t.target for t in a.targets),
                )
                for a, d in rows
            ]

    def _alias_targets(self, session: Session, domain_id: int, local_key: str) -> list[str] | None:
        rows = session.scalars(
            select(AliasTarget.target)
            .join(Alias, AliasTarget.alias_id == Alias.id)
            .where(Alias.domain_id == domain_id, Alias.local_key == local_key)
            .order_by(AliasTarget.position)
        ).all()
        return list(rows) if rows else None

    # -- resolution ------------------------------------------------------------------------

    def resolve(self, address: Address, delimiters: str) -> Resolution | None:
        """Resolve a recipient as Postfix's virtual alias and mailbox maps would.

        None when the domain is not ours. Order, as Postfix: ``user+detail@d`` exactly, then
        ``user@d`` (the detail carried over to what it resolves to), then the ``@d`` catch-all.
        An alias overrides a mailbox of the same address; an alias naming itself delivers to
        the mailbox. Routing forms (``%``, ``!``, ``@`` in the local part) never match anything.
        """
        with self.session() as session:
            domain_id = session.scalar(select(Domain.id).where(Domain.name == address.domain))
            if domain_id is None:
                return None
            expansion = _Expansion()
            catch_all = self._expand(session, address, delimiters, expansion, 0, domain_id)
            return Resolution(
                tuple(expansion.deliveries),
                tuple(expansion.forwards),
                tuple(expansion.disabled),
                catch_all,
            )

    def _expand(
        self,
        session: Session,
        address: Address,
        delimiters: str,
        out: _Expansion,
        depth: int,
        domain_id: int | None = None,
    ) -> bool:
        """Expand one address into ``out``; returns True when only a catch-all matched.

        ``domain_id`` is the address's domain when the caller has looked it up already.
        """
        out.steps += 1
        if depth > ALIAS_DEPTH_LIMIT or out.steps > ALIAS_RECURSION_LIMIT:
            raise StoreError(f"alias expansion of {address} is too deep (a loop?)")
        if domain_id is None:
            domain_id = session.scalar(select(Domain.id).where(Domain.name == address.domain))
        if domain_id is None:
            out.forwards.append(str(address))
            return False
        if address.routing:
            return False
        base, detail = address.split_detail(delimiters)
        candidates: list[tuple[Address, str | None]] = [(address, None)]
        if detail is not None:
            candidates.append((base, detail))
        for candidate, carried in candidates:
            # An alias already expanded on this path (e.g. bob -> bob, archive) means its mailbox.
            if candidate.key not in out.seen:
                targets = self._alias_targets(session, domain_id, candidate.local_key)
                if targets is not None:
                    out.seen.add(candidate.key)
                    for target in targets:
                        target_address = _address(target)
                        if carried is not None:
                            target_address = _with_detail(target_address, carried, delimiters)
                        self._expand(session, target_address, delimiters, out, depth + 1)
                    return False
            found = self._mailbox_row(session, candidate)
            if found is not None:
                record = _mailbox_record(found[0], found[1].name)
                if not record.enabled:
                    out.disabled.append(record)
                elif not any(d.mailbox.id == record.id and d.detail == carried for d in out.deliveries):
                    out.deliveries.append(Delivery(record, carried))
                return False
        catch_key = "@" + address.domain
        targets = None if catch_key in out.seen else self._alias_targets(session, domain_id, "")
        if targets is None:
            return False
        out.seen.add(catch_key)
        for target in targets:
            self._expand(session, _address(target), delimiters, out, depth + 1)
        return True

    # -- sender grants ---------------------------------------------------------------------

    def grant_sender(self, login: str, address_text: str) -> GrantRecord:
        address = _address(address_text, catch_all=True)
        shown = str(address) if address.local else f"@{address.domain}"
        with self.session() as session, session.begin():
            mailbox = self._require_mailbox(session, login)
            key = address.key if address.local else f"@{address.domain}"
            exists = session.scalar(
                select(SenderGrant.id).where(
                    SenderGrant.mailbox_id == mailbox.id, SenderGrant.address_key == key
                )
            )
            if exists is not None:
                raise AlreadyExists(f"{login} may already send as {shown}")
            session.add(SenderGrant(
                mailbox_id=mailbox.id, address=shown, address_key=key, created_at=self._clock()
            ))
        return GrantRecord(login, shown)

    def revoke_sender(self, login: str, address_text: str) -> None:
        address = _address(address_text, catch_all=True)
        key = address.key if address.local else f"@{address.domain}"
        with self.session() as session, session.begin():
            mailbox = self._require_mailbox(session, login)
            result = session.execute(
                delete(SenderGrant).where(
                    SenderGrant.mailbox_id == mailbox.id, SenderGrant.address_key == key
                )
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"{login} has no grant for {address_text}")

    def list_grants(self, login: str | None = None) -> list[GrantRecord]:
        with self.session() as session:
            query = (
                select(Mailbox, Domain, SenderGrant)
                .join(Domain, Mailbox.domain_id == Domain.id)
                .join(SenderGrant, SenderGrant.mailbox_id == Mailbox.id)
                .order_by(Domain.name, Mailbox.local_key, SenderGrant.address_key)
            )
            if login is not None:
                parsed = _address(login)
                query = query.where(Domain.name == parsed.domain, Mailbox.local_key == parsed.local_key)
            return [
                GrantRecord(_mailbox_record(m, d.name).address, g.address)
                for m, d, g in session.execute(query).all()
            ]

    def granted_senders(self, mailbox_id: int) -> frozenset[str]:
        """Address keys (``local@domain`` case-folded, or ``@domain``) the login may send as."""
        with self.session() as session:
            return frozenset(
                session.scalars(select(SenderGrant.address_key).where(SenderGrant.mailbox_id == mailbox_id))
            )

    # -- app passwords ---------------------------------------------------------------------

    def add_app_password(
        self, login: str, name: str, password_hash: str, services: Sequence[str] = ()
    ) -> AppPasswordRecord:
        if not name or len(name) > 64 or any(ord(c) < 32 for c in name):
            raise StoreError("app password name must be 1 to 64 printable characters")
        service_text = _services(services) if services else ""
        with self.session() as session, session.begin():
            mailbox = self._require_mailbox(session, login)
            exists = session.scalar(
                select(AppPassword.id).where(AppPassword.mailbox_id == mailbox.id, AppPassword.name == name)
            )
            if exists is not None:
                raise AlreadyExists(f"{login} already has an app password named {name!r}")
            row = AppPassword(
                mailbox_id=mailbox.id, name=name, password=password_hash,
                services=service_text, created_at=self._clock(),
            )
            session.add(row)
            session.flush()
            return _app_record(row)

    def list_app_passwords(self, login: str) -> list[AppPasswordRecord]:
        with self.session() as session:
            mailbox = self._require_mailbox(session, login)
            return [_app_record(r) for r in sorted(mailbox.app_passwords, key=lambda r: r.name)]

    def app_passwords_for(self, mailbox_id: int) -> list[AppPasswordRecord]:
        with self.session() as session:
            rows = session.scalars(
                select(AppPassword).where(AppPassword.mailbox_id == mailbox_id).order_by(AppPassword.id)
            )
            return [_app_record(r) for r in rows]

    def revoke_app_password(self, login: str, name: str) -> None:
        with self.session() as session, session.begin():
            mailbox = self._require_mailbox(session, login)
            result = session.execute(
                delete(AppPassword).where(AppPassword.mailbox_id == mailbox.id, AppPassword.name == name)
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"{login} has no app password named {name!r}")

    def record_app_password_use(self, app_password_id: int, when: datetime | None = None) -> None:
        with self.session() as session, session.begin():
            session.execute(
                update(AppPassword)
                .where(AppPassword.id == app_password_id)
                .values(last_used_at=when or self._clock())
            )

    # -- settings --------------------------------------------------------------------------

    def setting(self, name: str, default: Callable[[], str] | None = None) -> str | None:
        """A stored setting; with ``default`` it is created once (first writer wins)."""
        with self.session() as session:
            value = session.scalar(select(Setting.value).where(Setting.name == name))
        if value is not None or default is None:
            return value
        try:
            with self.session() as session, session.begin():
                session.add(Setting(name=name, value=default()))
        except IntegrityError:
            pass
        with self.session() as session:
            return session.scalar(select(Setting.value).where(Setting.name == name))

    def secret(self, name: str) -> bytes:
        """A random per-installation key (e.g. for HMACs shared by several hosts)."""
        value = self.setting(f"secret.{name}", lambda: secrets.token_hex(32))
        assert value is not None
        return bytes.fromhex(value)


def _app_record(row: AppPassword) -> AppPasswordRecord:
    return AppPasswordRecord(
        id=row.id,
        name=row.name,
        password=row.password,
        services=frozenset(s for s in row.services.split(",") if s),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
    )


def _with_detail(address: Address, detail: str, delimiters: str) -> Address:
    """Carry ``+detail`` over to an alias target (Postfix's propagate_unmatched_extensions)."""
    if not delimiters or address.split_detail(delimiters)[1] is not None:
        return address
    return Address(f"{address.local}{delimiters[0]}{detail}", address.domain, address.quoted)
