# -*- test-case-name: tests.unit.test_policyd_rules -*-
"""Sender/login match: an authenticated client sends only as addresses its login owns."""

from __future__ import annotations

from mailplugins.config.policyd import PolicydConfig
from mailplugins.senders import login_owns
from policyd.actions import sender_not_owned
from policyd.rules.facts import Facts


async def sender_login_match(facts: Facts, config: PolicydConfig) -> str | None:
    """Postfix's reject_sender_login_mismatch for authenticated clients; ``<>`` is allowed.

    The rule itself (:func:`mailplugins.senders.login_owns`) is shared with milterd, which
    applies it to the ``From:`` header.
    """
    if not facts.login or not facts.sender:
        return None
    if await login_owns(facts.lookups, facts.login, facts.sender):
        return None
    return sender_not_owned(facts.login)
