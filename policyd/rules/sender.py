# -*- test-case-name: tests.unit.test_policyd_rules -*-
"""Sender/login match: an authenticated client sends only as addresses its login owns."""

from __future__ import annotations

from mailplugins.addresses import Address
from mailplugins.config.policyd import PolicydConfig
from policyd.actions import sender_not_owned
from policyd.rules.facts import Facts, parse_or_none


async def login_owns(facts: Facts, login_text: str, sender_text: str) -> bool:
    """True when ``sender_text`` belongs to the mailbox ``login_text``.

    Owned: the mailbox's own address, with or without ``+detail``; an address granted to it
    (``sender grant``, exact or a whole ``@domain``); an alias that resolves to it (a list alias
    counts for each member). A catch-all match does not count: it would hand every unused
    address of the domain to one user. Routing forms are never owned.
    """
    lookups = facts.lookups
    login = parse_or_none(login_text)
    sender = parse_or_none(sender_text)
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


async def sender_login_match(facts: Facts, config: PolicydConfig) -> str | None:
    """Postfix's reject_sender_login_mismatch for authenticated clients; ``<>`` is allowed."""
    if not facts.login or not facts.sender:
        return None
    if await login_owns(facts, facts.login, facts.sender):
        return None
    return sender_not_owned(facts.login)
