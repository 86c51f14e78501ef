# -*- test-case-name: tests.unit.test_policyd_config -*-
"""Postfix access(5) actions as policyd's config accepts them (policyd and its state sections).

Its own module so that ``config/policyd.py`` and ``config/policy_state.py`` both import it and
neither imports the other late.
"""

from __future__ import annotations

import re

from mailplugins.config.fields import describe

#: access(5) verbs Postfix understands in a policy reply (plus ``4NN``/``5NN text``).
ACTION_VERBS = frozenset({
    "OK", "DUNNO", "REJECT", "DEFER", "DEFER_IF_REJECT", "DEFER_IF_PERMIT", "DISCARD", "HOLD",
    "FILTER", "REDIRECT", "BCC", "PREPEND", "WARN", "INFO",
})
_NUMERIC = re.compile(r"^[45]\d\d(?: |$)")


def check_action(value: object) -> str:
    """An action Postfix will accept; an unknown verb would make Postfix answer 451 4.3.5."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected an access(5) action such as DUNNO, got {describe(value)}")
    text = value.strip()
    if any(c in text for c in "\r\n\0"):
        raise ValueError("an action must be one line")
    verb = text.split(None, 1)[0].upper()
    if verb not in ACTION_VERBS and not _NUMERIC.match(text):
        raise ValueError(
            f"unknown action {describe(verb)} (use DUNNO, DEFER_IF_PERMIT text, 4NN text, ...)"
        )
    return text
