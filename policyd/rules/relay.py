# -*- test-case-name: tests.unit.test_policyd_rules -*-
"""Relay control: mail for other domains only from authenticated clients or mynetworks."""

from __future__ import annotations

from mailplugins.config.policyd import PolicydConfig
from policyd.actions import RELAY_DENIED
from policyd.rules.facts import Facts


async def relay_control(facts: Facts, config: PolicydConfig) -> str | None:
    """Postfix's permit_sasl_authenticated, permit_mynetworks, reject_unauth_destination.

    Allowed relaying is "no opinion" (DUNNO), never OK: Postfix's own restrictions after the
    policy service still apply.
    """
    if facts.recipient_undecidable or facts.trusted:
        return None
    if await facts.recipient_resolution() is not None:
        return None
    return RELAY_DENIED
