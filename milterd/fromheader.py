# -*- test-case-name: tests.unit.test_milterd_fromheader -*-
"""The addresses of a ``From:`` header value, as :func:`email.utils.getaddresses` gives them.

Every incoming message is parsed once for DMARC and every outgoing one for the login/``From:``
rule, and ``getaddresses`` (a general RFC 5322 parser: quoting, comments, groups, obsolete
syntax) was the largest single Python cost of a DMARC evaluation. Most ``From:`` values are
one of two plain forms, ``Display Name <local@domain>`` and ``local@domain``, with nothing a
parser has to interpret: those are answered by one regular expression; anything else (quotes,
comments, several addresses, groups, encoded words, brackets in odd places) goes to
``getaddresses`` as before. The unit tests check the two agree on both kinds.
"""

from __future__ import annotations

import email.utils
import re

__all__ = ["addresses"]

# Atoms only: no quotes, parentheses, commas, colons, semicolons, backslashes or brackets in
# the display name, a dot-atom local part and a plain LDH domain.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
_PLAIN = re.compile(
    rf"[ \t]*(?:(?P<name>{_ATOM}(?:[ \t]+{_ATOM})*)[ \t]*)?<(?P<angle>{_DOT_ATOM}@{_DOMAIN})>[ \t]*\Z"
    rf"|[ \t]*(?P<bare>{_DOT_ATOM}@{_DOMAIN})[ \t]*\Z"
)


def addresses(value: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of one header value (folds removed first)."""
    value = value.replace("\r\n", "").replace("\n", "")
    plain = _PLAIN.match(value)
    if plain is None:
        return email.utils.getaddresses([value])
    if plain["bare"] is not None:
        return [("", plain["bare"])]
    name = plain["name"] or ""
    return [(" ".join(name.split()), plain["angle"])]
