# -*- test-case-name: tests.unit.test_dkim_canon,tests.unit.test_dkim -*-
"""RFC 6376 §3.2 tag lists (``tag=value; ...``): DKIM-Signature values and key records.

Strict on purpose: a malformed list is a ``permerror`` for the signature (or an unusable key), so
the parser refuses what the grammar refuses (a bad tag name, a character outside VALCHAR, a
duplicate tag) instead of guessing.
"""

from __future__ import annotations

import re

__all__ = ["TagError", "parse_tags", "strip_fws"]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
# tag-value = [ tval *( 1*(WSP / FWS) tval ) ], tval = 1*VALCHAR (%x21-3A / %x3C-7E).
_VALUE = re.compile(r"(?:[\x21-\x3a\x3c-\x7e]+(?:(?:[ \t]|\r\n[ \t])+[\x21-\x3a\x3c-\x7e]+)*)?\Z")
_FWS_EDGES = "\r\n\t "
_WHITESPACE = re.compile(r"[ \t\r\n]+")


class TagError(ValueError):
    """The tag list breaks RFC 6376 §3.2; the message says how (for the A-R comment)."""


def parse_tags(text: str) -> dict[str, str]:
    """``{name: value}`` with the FWS around names and values removed (values keep inner FWS)."""
    tags: dict[str, str] = {}
    parts = text.split(";")
    if len(parts) > 1 and not parts[-1].strip(_FWS_EDGES):
        parts.pop()  # the optional final ";"
    for part in parts:
        name, sep, value = part.partition("=")
        name = name.strip(_FWS_EDGES)
        value = value.strip(_FWS_EDGES)
        if not sep:
            raise TagError(f"tag without '=': {_short(part)}")
        if not _NAME.match(name):
            raise TagError(f"bad tag name {_short(name)}")
        if not _VALUE.match(value):
            raise TagError(f"bad characters in {name}=")
        if name in tags:
            raise TagError(f"duplicate tag {name}=")
        tags[name] = value
    return tags


def strip_fws(value: str) -> str:
    """A value with all whitespace removed (base64 in ``b=``, ``bh=``, ``p=``)."""
    return _WHITESPACE.sub("", value)


def _short(text: str) -> str:
    text = _WHITESPACE.sub(" ", text.strip())
    return repr(text if len(text) <= 20 else text[:17] + "...")
