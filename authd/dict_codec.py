# -*- test-case-name: tests.unit.test_authd_dict_codec -*-
"""Dovecot's dict proxy protocol, server side, with no transport (v2.2 of Dovecot <= 2.3.16 and
v3.x of 2.3.17+; 2.4's v4 reads the same for what we answer).

Lines are ``\\n``-terminated, fields TAB-separated and tab-escaped. The client sends ``H``
(hello, never answered) first; lookups (``L``) and iterations (``I``) are answered strictly in
order; transaction commands (``B S U A T R``) are never answered, only ``C`` (commit) is.
See shared/reference/dovecot-auth.md section 2a for captures from Dovecot 2.3.19.1.
"""

from __future__ import annotations

from dataclasses import dataclass

from authd.sasl_codec import LineBuffer, ProtocolError, tab_escape, tab_unescape

DEFAULT_MAX_LINE = 65536

#: Iterate flags (dict.h).
ITERATE_RECURSE = 1
ITERATE_NO_VALUE = 8
ITERATE_EXACT_KEY = 16


@dataclass(frozen=True)
class Hello:
    major: int
    minor: int
    user: str
    name: str


@dataclass(frozen=True)
class Lookup:
    key: str
    user: str


@dataclass(frozen=True)
class Iterate:
    flags: int
    max_rows: int
    path: str
    user: str


@dataclass(frozen=True)
class Begin:
    tid: int
    user: str


@dataclass(frozen=True)
class Change:
    """``S`` set, ``U`` unset, ``A`` append, ``+`` increment, ``T`` timestamp: queued, unanswered."""

    tid: int
    kind: str
    key: str
    value: str


@dataclass(frozen=True)
class Commit:
    tid: int
    #: ``D`` (async commit, dict protocol 2.x) rather than ``C``.
    asynchronous: bool


@dataclass(frozen=True)
class Rollback:
    tid: int


Command = Hello | Lookup | Iterate | Begin | Change | Commit | Rollback


def _int(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise ProtocolError(f"malformed {what}")
    return int(text)


class DictDecoder:
    """Bytes -> commands; raises ProtocolError on anything a Dovecot client would not send."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._lines = LineBuffer(max_line)
        self.hello: Hello | None = None

    @property
    def pending(self) -> bool:
        """True while a line has started but is not complete (the transport times it)."""
        return self._lines.pending

    def feed(self, data: bytes) -> list[Command]:
        return [self._command(line) for line in self._lines.feed(data)]

    def _command(self, raw: bytes) -> Command:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("line is not UTF-8") from None
        if not line:
            raise ProtocolError("empty line")
        code, fields = line[0], [tab_unescape(f) for f in line[1:].split("\t")]
        if self.hello is None:
            if code != "H":
                raise ProtocolError("expected hello (H) first")
            if len(fields) < 2:
                raise ProtocolError("malformed hello")
            major, minor = _int(fields[0], "hello version"), _int(fields[1], "hello version")
            if major not in (2, 3, 4):
                raise ProtocolError(f"unsupported dict protocol version {major}")
            user = fields[3] if len(fields) > 3 else ""
            name = fields[4] if len(fields) > 4 else ""
            self.hello = Hello(major, minor, user, name)
            return self.hello
        if code == "L":
            return Lookup(fields[0], fields[1] if len(fields) > 1 else "")
        if code == "I":
            if len(fields) == 2:  # protocol 2.x: I<flags>\t<path>
                return Iterate(_int(fields[0], "iterate flags"), 0, fields[1], "")
            if len(fields) < 3:
                raise ProtocolError("malformed iterate")
            return Iterate(
                _int(fields[0], "iterate flags"), _int(fields[1], "iterate max rows"), fields[2],
                fields[3] if len(fields) > 3 else "",
            )
        if code == "B":
            return Begin(_int(fields[0], "transaction id"), fields[1] if len(fields) > 1 else "")
        if code in "SUA+T":
            if len(fields) < 2:
                raise ProtocolError(f"malformed {code} command")
            value = fields[2] if len(fields) > 2 else ""
            return Change(_int(fields[0], "transaction id"), code, fields[1], value)
        if code in "CD":
            return Commit(_int(fields[0], "transaction id"), code == "D")
        if code == "R":
            return Rollback(_int(fields[0], "transaction id"))
        raise ProtocolError(f"unknown dict command {code!r}")


# -- replies -------------------------------------------------------------------------------


def found(value: str) -> bytes:
    return ("O" + tab_escape(value) + "\n").encode("utf-8")


NOT_FOUND = b"N\n"


def failed(error: str) -> bytes:
    return ("F" + tab_escape(error) + "\n").encode("utf-8")


def iterate_rows(rows: list[tuple[str, str]]) -> bytes:
    """Each row ``O<key>\\t<value>``, then the empty line that ends an iteration."""
    body = "".join(f"O{tab_escape(key)}\t{tab_escape(value)}\n" for key, value in rows)
    return (body + "\n").encode("utf-8")


def commit_reply(tid: int, ok: bool, error: str = "") -> bytes:
    if ok:
        return f"O{tid}\n".encode("ascii")
    return f"F{tid}\t{tab_escape(error)}\n".encode()
