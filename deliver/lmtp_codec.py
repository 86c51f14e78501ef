# -*- test-case-name: tests.unit.test_deliver_codec -*-
"""LMTP (RFC 2033) without a transport: command lines in, commands out; DATA decoding; replies.

Nothing here imports Twisted or touches a socket, so every limit and every split point can be
tested with plain bytes. :class:`DataDecoder` turns the dot-stuffed, CRLF-terminated DATA stream
into the bytes a Maildir file holds (dot-unstuffed, CRLF -> LF) chunk by chunk, keeping at most
a few bytes between chunks: memory does not grow with the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "Command",
    "CommandError",
    "DataDecoder",
    "Reply",
    "decode_xtext",
    "parse_command",
    "parse_path",
]

#: Verbs the server knows; anything else is ``500 5.5.1`` (RFC 3463: invalid command, as Dovecot).
VERBS = frozenset(
    {"LHLO", "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP", "XFORWARD"}
)
#: XFORWARD attributes we take (Postfix's XFORWARD_README); IDENT is Postfix's queue ID.
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
BODY_TYPES = frozenset({"7BIT", "8BITMIME"})
#: Control characters refused in a command line (tab is allowed).
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
#: Longest address inside <> we parse (RFC 5321: 256 for a path; be generous).
MAX_PATH_LENGTH = 1024


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; ``enhanced`` is the RFC 3463 code (empty only for greeting and LHLO)."""

    code: int
    enhanced: str
    text: str
    #: Extra lines of a multi-line reply (LHLO capabilities), before ``text``.
    lines: tuple[str, ...] = ()

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    def encode(self) -> bytes:
        body = [*self.lines, self.text]
        out = []
        for index, line in enumerate(body):
            sep = " " if index == len(body) - 1 else "-"
            prefix = f"{self.enhanced} " if self.enhanced else ""
            clean = line.replace("\r", " ").replace("\n", " ")
            out.append(f"{self.code}{sep}{prefix}{clean}\r\n")
        return "".join(out).encode("utf-8", "replace")


class CommandError(Exception):
    """A command that cannot be accepted; carries the reply to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _error(code: int, enhanced: str, text: str) -> CommandError:
    return CommandError(Reply(code, enhanced, text))


@dataclass(frozen=True)
class Command:
    verb: str
    #: The argument text after the verb (LHLO name, VRFY string), stripped.
    argument: str = ""
    #: MAIL/RCPT: the address inside ``<>`` ("" for the null sender).
    path: str = ""
    #: MAIL/RCPT: ESMTP parameters, keys upper-cased; a keyword without ``=`` maps to "".
    params: dict[str, str] = field(default_factory=dict)


def decode_xtext(text: str) -> str:
    """RFC 3461 xtext: ``+XX`` is the octet XX; raise ValueError when malformed."""
    out = bytearray()
    index = 0
    raw = text.encode("utf-8")
    while index < len(raw):
        char = raw[index]
        if char == 0x2B:  # "+"
            hexdigits = raw[index + 1 : index + 3]
            if len(hexdigits) != 2 or not all(c in b"0123456789ABCDEFabcdef" for c in hexdigits):
                raise ValueError("malformed xtext")
            out.append(int(hexdigits, 16))
            index += 3
            continue
        if char < 33 or char == 0x3D:  # controls, space and "=" are not xtext
            raise ValueError("malformed xtext")
        out.append(char)
        index += 1
    return out.decode("utf-8", "replace")


def parse_path(text: str) -> tuple[str, str]:
    """Split ``<path> params`` after ``FROM:``/``TO:``; returns (address, rest).

    Quoted local parts may contain ``>`` and spaces; a source route ``@a,@b:`` is kept (the
    address parser flags it as routing).
    """
    text = text.lstrip(" ")
    if not text.startswith("<"):
        raise _error(501, "5.5.4", "Syntax error: address must be enclosed in <>")
    index = 1
    quoted = False
    while index < len(text):
        char = text[index]
        if quoted and char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            break
        index += 1
    else:
        raise _error(501, "5.5.4", "Syntax error: unterminated <address>")
    address = text[1:index]
    if len(address) > MAX_PATH_LENGTH:
        raise _error(501, "5.5.4", "Syntax error: address too long")
    rest = text[index + 1 :]
    if rest and not rest.startswith(" "):
        raise _error(501, "5.5.4", "Syntax error after <address>")
    return address, rest.strip(" ")


def _parse_params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if not key or not all(c.isascii() and (c.isalnum() or c == "-") for c in key):
            raise _error(501, "5.5.4", f"Syntax error in parameter {word[:40]}")
        if sep and not value:
            raise _error(501, "5.5.4", f"Syntax error in parameter {key[:40]}")
        params[key.upper()] = value
    return params


def parse_command(line: bytes) -> Command:
    """One command line (without CRLF) -> Command, or CommandError with the reply to send."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _error(500, "5.5.2", "Syntax error: invalid UTF-8") from None
    if _CONTROLS.search(text):
        raise _error(500, "5.5.2", "Syntax error: control characters")
    verb, _, rest = text.strip(" \t").partition(" ")
    verb = verb.upper()
    if verb not in VERBS:
        raise _error(500, "5.5.1", "Command unrecognized")
    rest = rest.strip(" \t")
    if verb in ("MAIL", "RCPT"):
        keyword = "FROM:" if verb == "MAIL" else "TO:"
        if not rest[: len(keyword)].upper() == keyword:
            raise _error(501, "5.5.4", f"Syntax error: expected {verb} {keyword}<address>")
        address, params_text = parse_path(rest[len(keyword) :])
        return Command(verb, rest, address, _parse_params(params_text))
    if verb in ("DATA", "RSET", "QUIT") and rest:
        raise _error(501, "5.5.4", f"Syntax error: {verb} takes no argument")
    if verb == "XFORWARD":
        params = _parse_params(rest)
        if not params:
            raise _error(501, "5.5.4", "Syntax: XFORWARD attribute=value ...")
        for key in params:
            if key not in XFORWARD_ATTRIBUTES:
                raise _error(501, "5.5.4", f"Bad XFORWARD attribute name: {key[:40]}")
        return Command(verb, rest, params=params)
    return Command(verb, rest)


class LineTooLong(OverflowError):
    """A command line over the limit; ``complete`` is False when its end has not arrived yet
    (the buffer was emptied and the caller must discard input up to the next LF)."""

    def __init__(self, complete: bool) -> None:
        super().__init__("line too long")
        self.complete = complete


def split_line(buffer: bytearray, limit: int) -> bytes | None:
    """Take one command line (LF or CRLF terminated) from ``buffer``; None if incomplete.

    Raises :class:`LineTooLong` when the line exceeds ``limit`` octets; what arrived of it is
    removed from ``buffer`` either way.
    """
    index = buffer.find(b"\n", 0, limit + 2)
    if index < 0:
        if len(buffer) > limit + 1:
            index = buffer.find(b"\n")
            if index < 0:
                buffer.clear()
                raise LineTooLong(complete=False)
            del buffer[: index + 1]
            raise LineTooLong(complete=True)
        return None
    end = index - 1 if index > 0 and buffer[index - 1] == 0x0D else index
    if end > limit:
        del buffer[: index + 1]
        raise LineTooLong(complete=True)
    line = bytes(buffer[:end])
    del buffer[: index + 1]
    return line


class DataDecoder:
    """The DATA stream -> message bytes: dot-unstuffed, CRLF -> LF, ending at CRLF.CRLF.

    Only CRLF.CRLF ends the data (RFC 5321 4.1.1.4); a lone LF or CR is message content and
    kept. A leading ``.`` is removed at every line start, after CRLF or after a lone LF: a
    client that sends LF line ends (``smtplib.sendmail`` with such a message) still
    dot-stuffs every line, and Dovecot unstuffs them too (issue #15, item 1). Feed chunks as
    they arrive; each :meth:`feed` returns the decoded bytes it could finish. When the
    terminator is seen :attr:`done` is True and :attr:`leftover` holds what followed it
    (pipelined commands). At most two bytes are held back between calls.

    Counters: :attr:`size` is the decoded size (Maildir ``S=``); :attr:`vsize` the size with
    every LF not preceded by CR counted as CRLF (Dovecot's virtual size, Maildir ``W=``).
    """

    def __init__(self) -> None:
        self._pending = b""
        self._at_line_start = True
        #: Whether the current line start follows CRLF (or the start of DATA): only then can a
        #: "." line be the terminator.
        self._after_crlf = True
        self._last = 0
        self.done = False
        self.leftover = b""
        self.size = 0
        self.bare_newlines = 0

    @property
    def vsize(self) -> int:
        return self.size + self.bare_newlines

    def _decode(self, raw: bytes) -> bytes:
        """CRLF -> LF over the unstuffed runs of one :meth:`feed`, counting as it goes.

        ``replace(b"\\r", b"")`` is a memchr loop, ten times faster than replacing the
        two-byte CRLF. It is the same thing whenever every CR is part of a CRLF; when moreover
        every LF is (what Postfix sends), putting the CRs back before each LF gives ``raw``
        again, which one more memchr-driven replace and a memcmp tell, half the instructions of
        counting CRLFs (callgrind). Any other input takes the counting path.
        """
        if not raw:
            return raw
        segment = raw.replace(b"\r", b"")
        removed = len(raw) - len(segment)
        crlf = 0  # CRLFs left in the output (only from CR CR LF or bare CRs)
        if not removed:
            lines = len(segment) - len(segment.replace(b"\n", b""))  # LFs, counted by removal
        elif raw == segment.replace(b"\n", b"\r\n"):
            lines = removed  # every line ended by CRLF: one LF for each CR removed
        else:
            if raw.count(b"\r\n") != removed:  # a bare CR: keep it
                segment = raw.replace(b"\r\n", b"\n")
                crlf = segment.count(b"\r\n")
            lines = len(segment) - len(segment.replace(b"\n", b""))
        if lines:
            # An LF right after a CR in the output (CR CR LF in the input, or a bare CR that
            # ended the previous feed) is not bare: Dovecot's W= counts it once.
            if self._last == 0x0D and segment[0] == 0x0A:
                crlf += 1
            self.bare_newlines += lines - crlf
        self.size += len(segment)
        self._last = segment[-1]
        return segment

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            self.leftover += chunk
            return b""
        data = self._pending + chunk if self._pending else chunk
        self._pending = b""
        # Unstuffed runs of the input, CRLF still in them: decoded once, joined, at the end.
        runs: list[bytes] = []
        pos = 0
        length = len(data)
        while True:
            if self._at_line_start:
                # A line starting with "." is the terminator (after CRLF) or dot-stuffed.
                if pos >= length:
                    break
                if data[pos] == 0x2E:  # "."
                    if self._after_crlf:
                        if length - pos < 3 and data[pos:length] in (b".", b".\r"):
                            self._pending = data[pos:]  # cannot tell yet
                            break
                        if data[pos : pos + 3] == b".\r\n":
                            self.done = True
                            self.leftover = data[pos + 3 :]
                            break
                    pos += 1  # unstuff
                self._at_line_start = False
            # Most large bodies (base64 attachments) hold no "." at all: memchr says so quickly
            # and the LF "." search starts at the first dot instead of the run's start.
            dot = data.find(b".", pos)
            index = -1 if dot < 0 else data.find(b"\n.", max(pos, dot - 1))
            if index < 0:
                # Hold back a trailing CR, LF or CRLF: the next chunk may start with the "." of
                # a line start (or the LF of a CRLF).
                keep = 2 if data.endswith(b"\r\n") else 1 if data.endswith((b"\r", b"\n")) else 0
                end = max(pos, length - keep)
                runs.append(data[pos:end])
                self._pending = data[end:]
                break
            runs.append(data[pos : index + 1])
            # The byte before the LF is in this feed's data whenever it was a CR: a trailing CR
            # is always held back for the next feed.
            self._after_crlf = index > 0 and data[index - 1] == 0x0D
            pos = index + 1
            self._at_line_start = True
        return self._decode(runs[0] if len(runs) == 1 else b"".join(runs))
