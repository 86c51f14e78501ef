# -*- test-case-name: tests.unit.test_authresults -*-
"""Authentication-Results (RFC 8601): compose ours, and recognise headers claiming our id.

:func:`compose` writes one header value for a message's DKIM, SPF and DMARC results (shown
here with the folds' TABs as spaces)::

     mx.example.org;
        dkim=pass (2048-bit key) header.d=example.com header.s=sel header.a=rsa-sha256
         header.b="abcdefgh1234";
        spf=pass smtp.mailfrom=alice@example.com;
        dmarc=fail (p=quarantine dis=quarantine) header.from=example.com

``dis=`` is the disposition actually applied (deliver files ``dis=quarantine`` into Junk, and
trusts only a header carrying our authserv-id, which milterd adds after deleting every header
that :func:`claims_authserv_id`). Values that are not RFC 2045 tokens are quoted; comments hold
only printable text without parentheses; nothing from the message or DNS reaches the header
unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from milterd.dkim import DkimResult
from milterd.dmarc import DmarcResult

__all__ = ["SpfAuth", "claims_authserv_id", "compose", "parse_authserv_id"]

_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+\Z")
_LOCAL_AT_DOMAIN = re.compile(r"[!#$%&'*+\-/=?^_`{|}~.0-9A-Za-z]*@[A-Za-z0-9_.-]+\Z")
_COMMENT_UNSAFE = re.compile(r"[^\x20-\x27\x2a-\x5b\x5d-\x7e]")
_FOLD_AT = 76
_ID_WORD = re.compile(r"[^\s;()\"]+")
MAX_COMMENT = 80


@dataclass(frozen=True)
class SpfAuth:
    """The SPF check of the MAIL FROM identity (``helo`` for the null sender's check)."""

    result: str     # pass | fail | softfail | neutral | none | temperror | permerror
    mailfrom: str   # the envelope sender address, "" for the null sender
    helo: str = ""


def _value(text: str) -> str:
    """A property value: a token, local-part@domain, or a quoted-string (RFC 8601 pvalue)."""
    if _TOKEN.match(text) or (_LOCAL_AT_DOMAIN.match(text) and not text.startswith("@")):
        return text
    cleaned = re.sub(r"[\x00-\x1f\x7f]", "", text).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{cleaned}"'


def _comment(text: str) -> str:
    text = _COMMENT_UNSAFE.sub("", text).strip()
    if len(text) > MAX_COMMENT:
        text = text[: MAX_COMMENT - 3] + "..."
    return f"({text})" if text else ""


def _resinfo(method: str, result: str, comment: str, props: Sequence[tuple[str, str]]) -> list[str]:
    words = [f"{method}={result}"]
    if comment:
        words.append(_comment(comment))
    words.extend(f"{name}={_value(value)}" for name, value in props if value)
    return [w for w in words if w]


def _fold(words: list[str]) -> str:
    """Words on one line, folded (CRLF TAB SP) before a word that would pass the fold column."""
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > _FOLD_AT:
            lines.append(" " + word)
        else:
            lines[-1] += " " + word
    return "\r\n\t".join(lines)


def compose(authserv_id: str, dkim: Sequence[DkimResult], spf: SpfAuth | None,
            dmarc: DmarcResult | None) -> str:
    """The Authentication-Results value: leading space, one result per line (CRLF TAB)."""
    parts: list[list[str]] = []
    if not dkim:
        parts.append(["dkim=none"])
    for result in dkim:
        parts.append(_resinfo("dkim", result.result, result.reason, [
            ("header.d", result.domain), ("header.s", result.selector),
            ("header.a", result.algorithm), ("header.b", result.header_b)]))
    if spf is not None:
        if spf.mailfrom:
            props = [("smtp.mailfrom", spf.mailfrom)]
        else:
            props = [("smtp.mailfrom", ""), ("smtp.helo", spf.helo)]
        parts.append(_resinfo("spf", spf.result, "", props))
    if dmarc is not None:
        parts.append(_resinfo("dmarc", dmarc.result,
                              f"p={dmarc.policy} dis={dmarc.disposition}",
                              [("header.from", dmarc.header_from)]))
    return f" {_value(authserv_id)};\r\n\t" + ";\r\n\t".join(_fold(words) for words in parts)


# Reading an authserv-id: [CFWS] authserv-id [CFWS authres-version] ";" ...


def _skip_cfws(text: str, pos: int) -> int:
    """Past whitespace, folds and (nested, quoted-pair) comments. Raises ValueError at an
    unterminated comment, with its start as the argument."""
    while pos < len(text):
        char = text[pos]
        if char in " \t\r\n":
            pos += 1
        elif char == "(":
            start, depth = pos, 0
            while True:
                if pos >= len(text):
                    raise ValueError(start)
                char = text[pos]
                if char == "\\":
                    pos += 2
                    continue
                if char == "(":
                    depth += 1
                elif char == ")":
                    depth -= 1
                    if depth == 0:
                        pos += 1
                        break
                pos += 1
        else:
            break
    return pos


def _parse(value: str) -> tuple[str | None, int | None]:
    """(authserv-id, None), or (None, index of the character that broke the parse)."""
    try:
        pos = _skip_cfws(value, 0)
    except ValueError as exc:
        return None, int(exc.args[0])
    if value[pos:pos + 1] == '"':
        start, out = pos, []
        pos += 1
        while pos < len(value):
            char = value[pos]
            if char == "\\" and pos + 1 < len(value):
                out.append(value[pos + 1])
                pos += 2
                continue
            if char == '"':
                return "".join(out).strip(), None
            if char not in "\r\n":
                out.append(char)
            pos += 1
        return None, start
    match = _ID_WORD.match(value, pos)
    return (match.group(0), None) if match else (None, None)


def parse_authserv_id(value: str) -> str | None:
    """The authserv-id of an Authentication-Results value, or None if it has none we can read."""
    return _parse(value)[0]


def _normal(authserv_id: str) -> str:
    return authserv_id.strip().rstrip(".").lower()


def claims_authserv_id(value: str, authserv_id: str) -> bool:
    """Whether an existing Authentication-Results value claims ``authserv_id`` (so, coming from
    outside, it is forged and must go). Case and a final dot do not matter. A value broken by
    an unterminated comment or quoted string is read again without the character that opened
    it (a few times at most), so a malformed forgery that a laxer reader would take as ours is
    caught too."""
    ours = _normal(authserv_id)
    for _attempt in range(5):
        found, broken = _parse(value)
        if found is not None:
            return _normal(found) == ours
        if broken is None:
            return False
        value = value[:broken] + " " + value[broken + 1:]
    return False
