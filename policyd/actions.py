# -*- test-case-name: tests.unit.test_policyd_rules -*-
"""The replies policyd gives, and their metric labels.

Postfix formats every policy rejection itself, numeric ones included (observed with 3.7.11):
the action ``550 5.1.1 User unknown`` reaches the SMTP client as
``550 5.1.1 <rcpt>: Recipient address rejected: User unknown`` when the policy service sits in
``smtpd_recipient_restrictions`` (or the relay list), and ``553 5.7.1 not logged in`` as
``553 5.7.1 <sender>: Sender address rejected: not logged in`` when it sits in
``smtpd_sender_restrictions``. So the actions carry only the code and the reason, worded as
Postfix's own restrictions word them; sending the prefix as well would make Postfix repeat it.
"""

from __future__ import annotations

import re

from mailplugins.config.actions import ACTION_VERBS

#: "No opinion": the next restriction decides. "Allowed" is always DUNNO, never OK, so that
#: Postfix's own reject_unauth_destination stays as a backstop.
DUNNO = "DUNNO"

_NUMERIC = re.compile(r"^[45]\d\d$")

STATES = frozenset({
    "CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN",
})


#: Client sees ``550 5.1.1 <rcpt>: Recipient address rejected: User unknown``.
UNKNOWN_USER = "550 5.1.1 User unknown"

#: Client sees ``554 5.7.1 <rcpt>: Recipient address rejected: Relay access denied``.
RELAY_DENIED = "554 5.7.1 Relay access denied"

#: ``553 5.7.1 <sender>: Sender address rejected: not logged in`` from the sender list.
NOT_LOGGED_IN = "553 5.7.1 not logged in"


def sender_not_owned(login: str) -> str:
    """From the sender list the client sees Postfix's own reject_sender_login_mismatch text,
    ``553 5.7.1 <sender>: Sender address rejected: not owned by user <login>``: Postfix adds
    the sender, so only the login is ours to say."""
    return f"553 5.7.1 not owned by user {login}"


def verb(action: str) -> str:
    """A bounded metric label: the access(5) verb upper-cased, the SMTP code, or ``OTHER``."""
    word = action.split(None, 1)[0].upper() if action else ""
    if word in ACTION_VERBS or _NUMERIC.match(word):
        return word
    return "OTHER"


def state_label(state: str) -> str:
    return state if state in STATES else "OTHER"
