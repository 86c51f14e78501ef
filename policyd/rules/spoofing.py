# -*- test-case-name: tests.unit.test_policyd_rules -*-
"""No spoofing of our domains by unauthenticated clients from outside mynetworks."""

from __future__ import annotations

from mailplugins.config.policyd import PolicydConfig
from policyd.actions import NOT_LOGGED_IN
from policyd.rules.facts import Facts


async def spoof_protection(facts: Facts, config: PolicydConfig) -> str | None:
    """Postfix's reject_unauthenticated_sender_login_mismatch, for every domain of ours.

    Note: this also refuses mail from our own domains forwarded back to us by outside servers
    that do not rewrite the envelope sender (no SRS); switch it off where that matters.
    """
    if facts.trusted or not facts.sender:
        return None
    if await facts.sender_domain_is_ours():
        return NOT_LOGGED_IN
    return None
