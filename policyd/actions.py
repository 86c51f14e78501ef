# -*- test-case-name: tests.unit.test_policyd_rules -*-
"""The replies policyd gives, and their metric labels.

At RCPT, Postfix passes a ``4NN``/``5NN text`` action through verbatim (it adds the
``<addr>: Recipient address rejected:`` prefix only to ``REJECT``/``DEFER``-style verbs), so the
texts below are written out in full and reach the SMTP client exactly as shown.
"""

from __future__ import annotations

import re

from mailplugins.config.policyd import ACTION_VERBS

#: "No opinion": the next restriction decides. "Allowed" is always DUNNO, never OK, so that
#: Postfix's own reject_unauth_destination stays as a backstop.
DUNNO = "DUNNO"

_NUMERIC = re.compile(r"^[45]\d\d$")

STATES = frozenset({
    "CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN",
})


def _angle(address: str) -> str:
    return f"<{address}>"


def unknown_user(recipient: str) -> str:
    return f"550 5.1.1 {_angle(recipient)}: Recipient address rejected: User unknown"


def relay_denied(recipient: str) -> str:
    return f"554 5.7.1 {_angle(recipient)}: Relay access denied"


def sender_not_owned(sender: str, login: str) -> str:
    return f"553 5.7.1 {_angle(sender)}: Sender address rejected: not owned by user {login}"


def sender_not_logged_in(sender: str) -> str:
    return f"553 5.7.1 {_angle(sender)}: Sender address rejected: not logged in"


def verb(action: str) -> str:
    """A bounded metric label: the access(5) verb upper-cased, the SMTP code, or ``OTHER``."""
    word = action.split(None, 1)[0].upper() if action else ""
    if word in ACTION_VERBS or _NUMERIC.match(word):
        return word
    return "OTHER"


def state_label(state: str) -> str:
    return state if state in STATES else "OTHER"
