# -*- test-case-name: tests.unit.test_policyd_rules -*-
"""Which addresses a login may send as: one rule for policyd (envelope) and milterd (``From:``).

policyd refuses an authenticated ``MAIL FROM`` its login does not own; milterd refuses to sign
(and by default rejects) a message whose ``From:`` its login does not own. Both ask
:func:`login_owns` through their own lookups (policyd's cached ones, milterd's), so the rule
is written once and the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from mailplugins.addresses import Address, AddressError, parse_address
from mailplugins.records import MailboxRecord, Resolution


class SenderLookups(Protocol):
    """The three facts the rule needs; each returns something awaitable (a Deferred)."""

    @property
    def delimiters(self) -> str: ...

    def mailbox(self, address: Address) -> Awaitable[MailboxRecord | None]: ...

    def granted_senders(self, mailbox_id: int) -> Awaitable[frozenset[str]]: ...

    def resolve(self, address: Address) -> Awaitable[Resolution | None]: ...


def _parse(text: str) -> Address | None:
    try:
        return parse_address(text)
    except AddressError:
        return None


async def login_owns(lookups: SenderLookups, login_text: str, sender_text: str) -> bool:
    """True when ``sender_text`` belongs to the mailbox ``login_text``.

    Owned: the mailbox's own address, with or without ``+detail``; an address granted to it
    (``sender grant``, exact or a whole ``@domain``); an alias that resolves to it (a list alias
    counts for each member). A catch-all match does not count: it would hand every unused
    address of the domain to one user. Routing forms are never owned.
    """
    login = _parse(login_text)
    sender = _parse(sender_text)
    if login is None or sender is None or sender.routing or sender.domain.startswith("["):
        return False
    mailbox = await lookups.mailbox(login)
    if mailbox is None:
        return False
    own_key = Address(mailbox.local_part, mailbox.domain).key
    base, _detail = sender.split_detail(lookups.delimiters)
    if own_key in (sender.key, base.key):
        return True
    grants = await lookups.granted_senders(mailbox.id)
    if sender.key in grants or base.key in grants or f"@{sender.domain}" in grants:
        return True
    resolution = await lookups.resolve(sender)
    if resolution is None or resolution.catch_all:
        return False
    return any(delivery.mailbox.id == mailbox.id for delivery in resolution.deliveries)
