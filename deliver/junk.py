# -*- test-case-name: tests.unit.test_deliver_junk -*-
"""Which messages go to the Junk folder: those milterd marked ``dis=quarantine`` (DMARC).

Only our own verdict counts. milterd inserts its ``Authentication-Results`` at the very top of
the message, above the ``Received:`` Postfix adds when it accepts the mail, and deletes every
other one that claims our authserv-id. So deliver reads only the ``Authentication-Results``
fields that stand at the top of the message before any other field: a sender can put headers
anywhere *below* Postfix's ``Received:``, never above it, and when milterd did not run
(Postfix's ``default_action=accept``) the top field is that ``Received:``, so a forged verdict
is never believed. Among those top fields, one whose authserv-id is ours and whose ``dmarc``
result carries ``dis=quarantine`` files the message into Junk.
"""

from __future__ import annotations

import re

#: How much of the message is read to find the top fields (they come first, and are short).
HEAD_LIMIT = 64 * 1024

_DMARC = re.compile(r"(?:^|;)\s*dmarc\s*=\s*[a-z]+\b([^;]*)", re.IGNORECASE)
_DIS = re.compile(r"\bdis\s*=\s*quarantine\b", re.IGNORECASE)
_COMMENT = re.compile(r"\([^()]*\)")


def top_fields(head: bytes) -> list[tuple[str, str]]:
    """The header fields at the top of ``head`` (unfolded), up to the end of the header."""
    text = head.decode("latin-1")
    fields: list[tuple[str, str]] = []
    for line in re.split(r"\r?\n", text):
        if line == "":
            break
        if line[0] in " \t":
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon:
            break
        fields.append((name.strip(), value.strip()))
    return fields


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results value (comments removed)."""
    first = _COMMENT.sub(" ", value.split(";", 1)[0]).split()
    return first[0].lower() if first else ""


def quarantined(head: bytes, authserv_id: str) -> bool:
    """True when our own Authentication-Results at the top says ``dis=quarantine``."""
    if head[:1] not in (b" ", b"\t") and not head[:22].lower().startswith(b"authentication-results"):
        return False  # the top field is another one (Postfix's Received:): no header parsing
    ours = authserv_id.lower()
    for name, value in top_fields(head[:HEAD_LIMIT]):
        if name.lower() != "authentication-results":
            return False  # the first other field ends the block milterd writes
        if authserv_id_of(value) != ours:
            continue
        for match in _DMARC.finditer(value):
            if _DIS.search(match.group(1)):
                return True
    return False
