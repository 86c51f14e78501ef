# -*- test-case-name: tests.unit.test_dkim_canon -*-
"""RFC 6376 §3.4 canonicalization: headers, and the body hashed as it streams in.

The body never sits in memory. :class:`BodyHasher` canonicalizes each chunk with a few regex and
``bytes`` operations on the whole chunk (no per-byte Python loop) and hashes it at once, holding
back only what the next chunk may still change: a final lone CR (maybe the start of a CRLF), a
final run of whitespace (relaxed: it may end a line, or merge with more whitespace), and the final
run of empty lines, which it keeps as a *count* (ignored if the body ends there, hashed once more
data follows). So a body of 50 MiB of empty lines costs a counter, not 50 MiB, and the hash is
the same whatever the chunk boundaries.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["BodyHasher", "canonicalize_header", "crlf_folds", "header_bytes"]

_SPACES = re.compile(rb"  +")  # (a literal prefix: re searches for it at C speed)
_HEADER_SPACES = re.compile(r"  +")
_BARE_LF = re.compile(r"(?<!\r)\n")
_CRLF_BLOCK = b"\r\n" * 4096


def header_bytes(text: str) -> bytes:
    """Header text as the bytes on the wire: UTF-8 (RFC 6532), and bytes a caller decoded
    with ``surrogateescape`` come back unchanged."""
    return text.encode("utf-8", "surrogateescape")


def crlf_folds(value: str) -> str:
    """A header value with every bare LF made CRLF (how it travels on the wire)."""
    return _BARE_LF.sub("\r\n", value)


def canonicalize_header(name: str, value: str, canon: str) -> str:
    """One header field, canonicalized, with its final CRLF.

    ``value`` is the text after the colon exactly as it stands (folds as CRLF; a bare LF, as
    Postfix hands folds to a milter, counts as CRLF, which is how the message goes on the wire).
    """
    if "\n" in value:
        value = _BARE_LF.sub("\r\n", value)
    if canon == "simple":
        return f"{name}:{value}\r\n"
    # relaxed: lower-case name, unfold, runs of WSP -> one SP, no WSP at the ends of the value
    # or before the colon. (Each step only when needed: this runs for every signed header.)
    if "\r\n" in value:
        value = value.replace("\r\n", "")
    if "\t" in value:
        value = value.replace("\t", " ")
    if "  " in value:
        value = _HEADER_SPACES.sub(" ", value)
    return name.rstrip(" \t").lower() + ":" + value.strip(" ") + "\r\n"


def _trailing_crlf_run(data: bytes) -> int:
    """Where the final run of CRLF pairs in ``data`` starts (``len(data)`` if none)."""
    stripped = len(data.rstrip(b"\r\n"))
    region = data[stripped:]
    if not region:
        return len(data)
    # region holds only CR and LF; the pairs are its longest alternating suffix "\r\n...\r\n".
    start = max(region.rfind(b"\r\r"), region.rfind(b"\n\n")) + 1
    if region[start:start + 1] == b"\n":
        start += 1
    if region[-1:] != b"\n":  # cannot happen: callers hold back a final CR
        return len(data)
    return stripped + start


class BodyHasher:
    """Hash one canonicalization of a body as it streams: ``feed`` chunks, then ``digest``.

    ``limit`` is a signature's ``l=``: hash only that many canonical bytes; ``length`` says how
    many the whole canonical body had, so the caller can tell a signature that covers only part
    of the body (or claims more than there is).
    """

    def __init__(self, canon: str, algorithm: str = "sha256", limit: int | None = None) -> None:
        if canon not in ("simple", "relaxed"):
            raise ValueError(f"unknown body canonicalization {canon!r}")
        self.relaxed = canon == "relaxed"
        self._hash = hashlib.new(algorithm)
        self.limit = limit
        #: Canonical bytes so far (hashed or not, past ``limit``).
        self.length = 0
        self._crlfs = 0          # held-back empty-line run, as a count of CRLFs
        self._space = False      # relaxed: held-back whitespace (one SP once canonical)
        self._cr = False         # a final lone CR, held until the next byte is known
        self._content = False    # anything emitted yet (relaxed: the empty body hashes nothing)
        self._done = False

    def feed(self, chunk: bytes) -> None:
        if self._done:
            raise ValueError("feed after digest")
        if not chunk:
            return
        held = (b" " if self._space else b"") + (b"\r" if self._cr else b"")
        data = held + chunk if held else chunk
        self._space = self._cr = False
        if data.endswith(b"\r"):
            self._cr = True
            data = data[:-1]
        if self.relaxed:
            # WSP runs -> one SP (tabs first, so the regex only meets spaces), none at line ends.
            if b"\t" in data:
                data = data.replace(b"\t", b" ")
            if b"  " in data:
                data = _SPACES.sub(b" ", data)
            data = data.replace(b" \r\n", b"\r\n")
            if data.endswith(b" "):  # (before a held CR: the CR decides what it is)
                self._space = True
                data = data[:-1]
        cut = _trailing_crlf_run(data)
        run = (len(data) - cut) // 2
        head = data[:cut]
        if head:
            self._flush_crlfs()
            self._emit(head)
            self._crlfs = run
        else:
            self._crlfs += run

    def _flush_crlfs(self) -> None:
        count, self._crlfs = self._crlfs, 0
        while count > 0:
            step = min(count, len(_CRLF_BLOCK) // 2)
            self._emit(_CRLF_BLOCK[: step * 2])
            count -= step

    def _emit(self, data: bytes) -> None:
        self._content = True
        if self.limit is not None:
            room = self.limit - self.length
            if room > 0:
                self._hash.update(data[:room] if room < len(data) else data)
        else:
            self._hash.update(data)
        self.length += len(data)

    def digest(self) -> bytes:
        """The body hash; finishes the body (a final lone CR is content, then the final CRLF)."""
        if not self._done:
            self._done = True
            if self._cr:
                # The CR is content: the held run and whitespace are in the middle of the body.
                self._flush_crlfs()
                self._emit(b" \r\r\n" if self._space else b"\r\r\n")
            elif self._content or not self.relaxed:
                # Trailing empty lines are ignored; the body ends with exactly one CRLF
                # (simple: an empty body is one CRLF too). Relaxed drops trailing whitespace.
                self._crlfs = 0
                self._emit(b"\r\n")
            self._space = False
        return self._hash.digest()
