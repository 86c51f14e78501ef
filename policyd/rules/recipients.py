# -*- test-case-name: tests.unit.test_policyd_rules -*-
"""Recipient validation: an address in one of our domains must name something real."""

from __future__ import annotations

from mailplugins.config.policyd import PolicydConfig
from policyd.actions import UNKNOWN_USER
from policyd.rules.facts import Facts


async def recipient_validation(facts: Facts, config: PolicydConfig) -> str | None:
    """Reject an address of ours that is no mailbox, alias, catch-all or ``+detail`` of one.

    Routing forms (``user%elsewhere@ours``, ``"user@elsewhere"@ours``, ``elsewhere!user@ours``,
    ``user@elsewhere@ours``) resolve to nothing in the store, so they are unknown users here
    and can never be accepted as local and then relayed.
    """
    if facts.recipient_undecidable:
        return None
    resolution = await facts.recipient_resolution()
    if resolution is None:
        return None
    if resolution.deliveries or resolution.forwards:
        return None
    if resolution.disabled and not config.reject_disabled_as_unknown:
        return None
    return UNKNOWN_USER
