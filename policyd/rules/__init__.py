# -*- test-case-name: tests.unit.test_policyd_rules -*-
"""The decisions, one module each, run in a fixed order by the service.

A rule is an ``async`` function ``(facts, config) -> action | None``: None means "no opinion"
and the next rule runs; the first action wins. Rules await Deferred lookups, which are already
fired on a cache hit, so a decision on cached facts never leaves the calling stack.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from mailplugins.config.policyd import CHECKS, PolicydConfig
from policyd.rules.facts import Facts
from policyd.rules.recipients import recipient_validation
from policyd.rules.relay import relay_control
from policyd.rules.sender import sender_login_match
from policyd.rules.spoofing import spoof_protection

Rule = Callable[[Facts, PolicydConfig], Awaitable["str | None"]]

RULES: dict[str, Rule] = {
    "recipient_validation": recipient_validation,
    "relay_control": relay_control,
    "sender_login_match": sender_login_match,
    "spoof_protection": spoof_protection,
}
assert tuple(RULES) == CHECKS

__all__ = ["RULES", "Facts", "Rule"]
