# -*- test-case-name: tests.unit.test_milterd_codec -*-
"""The milter protocol (version 6, as Postfix speaks it): bytes in, commands out; replies out.

A frame is a 4-byte big-endian length (counting the command byte), the command byte and its
payload; strings in a payload end in NUL. No Twisted here, so the framing is tested at every
split point without a transport.

Choices (see docs/milterd.md and the reference on Postfix 3.7):

- Every frame is bounded by ``max_frame``: Postfix sends body chunks of at most 65,535 bytes
  and headers of at most ``header_size_limit`` (102,400 bytes by default), so the default of
  256 KiB leaves room and still caps what a peer can make us hold. A longer length, a zero
  length, an unknown command byte, a payload that does not have the strings its command needs,
  a macro frame with more than ``max_macros`` names: the decoder raises :class:`CodecError`
  and refuses every later call (the connection is to be closed; Postfix then applies the
  milter's ``default_action``).
- Bytes that are not UTF-8 in strings are replaced (U+FFFD) except header values, which are
  kept as bytes decoded with ``surrogateescape`` so that a DKIM signature over raw 8-bit
  headers still hashes the very bytes Postfix saw.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from mailplugins import codec as codec_base
from mailplugins.codec import StickyDecoder

#: Protocol version we speak (Postfix 2.6+ offers 6).
VERSION = 6

# Actions (what we may do at end of message).
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20

# Protocol flags (what Postfix should not send, or not wait for).
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000

#: What milterd asks for: add and change headers (DKIM-Signature, Authentication-Results, and
#: deleting forged Authentication-Results).
ACTIONS = SMFIF_ADDHDRS | SMFIF_CHGHDRS
#: Events switched off: recipients and unknown commands are of no interest. The DATA event is
#: kept on purpose (SMFIP_NODATA makes Postfix send packets that get no reply, and over TCP
#: Nagle's algorithm then waits ~40 ms for our delayed ACK, twice per message); over TCP every
#: command we get is answered by default, so Postfix never writes twice without reading in
#: between (NO_REPLY below is for unix sockets, where there is no Nagle).
PROTOCOL = SMFIP_NORCPT | SMFIP_NOUNKNOWN | SMFIP_HDR_LEADSPC

#: Events Postfix need not wait an answer for (SMFIP_NR_*): milterd always continues there. Every
#: one saves a round trip per message (a message is ~12 commands, 8 of them headers). On a unix
#: socket that is pure gain; over TCP, packets without a reply meet Nagle's algorithm on
#: Postfix's side (see PROTOCOL), so the protocol asks for them only where it may.
NO_REPLY = (SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_DATA | SMFIP_NR_HDR
            | SMFIP_NR_BODY)
#: The commands those flags cover.
NO_REPLY_FLAGS = {
    "Connect": SMFIP_NR_CONN, "Helo": SMFIP_NR_HELO, "Mail": SMFIP_NR_MAIL, "Data": SMFIP_NR_DATA,
    "Header": SMFIP_NR_HDR, "Body": SMFIP_NR_BODY,
}

#: Largest body chunk Postfix sends (and the most a ``B`` frame may carry).
MAX_BODY_CHUNK = 65535
DEFAULT_MAX_FRAME = 256 * 1024
DEFAULT_MAX_MACROS = 64

_LENGTH = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")


class CodecError(codec_base.CodecError):
    """The peer sent something that is not milter protocol; close the connection."""


class FrameTooLongError(CodecError):
    pass


class MalformedFrameError(CodecError):
    pass


class NegotiationError(CodecError):
    """Postfix offered less than we need (old protocol version, no header actions)."""


# -- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptNeg:
    """``O``: the MTA's offer (version, actions, protocol flags)."""

    version: int
    actions: int
    protocol: int


@dataclass(frozen=True)
class Macros:
    """``D``: macros for the command that follows (``stage`` is that command's byte)."""

    stage: str
    values: Mapping[str, str]


@dataclass(frozen=True)
class Connect:
    """``C``: client host name, family (``4``, ``6``, ``L``, ``U``), port and address."""

    hostname: str
    family: str
    port: int
    address: str


@dataclass(frozen=True)
class Helo:
    name: str


@dataclass(frozen=True)
class Mail:
    """``M``: the envelope sender as Postfix wrote it (``<a@b>`` from smtpd) and ESMTP args."""

    sender: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rcpt:
    recipient: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Data:
    pass


@dataclass(frozen=True)
class Header:
    """``L``: one header; ``value`` as Postfix sent it (LF between folded lines)."""

    name: str
    value: str


@dataclass(frozen=True)
class EndOfHeaders:
    pass


@dataclass(frozen=True)
class Body:
    chunk: bytes


@dataclass(frozen=True)
class EndOfMessage:
    """``E``: the end of one message (a last body chunk may ride along; Postfix sends none)."""

    chunk: bytes = b""


@dataclass(frozen=True)
class Abort:
    """``A``: forget the current message; the connection goes on (next message or quit)."""


@dataclass(frozen=True)
class Quit:
    """``Q`` (close) or ``K`` (``new_connection``: the next SMTP session follows on this one)."""

    new_connection: bool = False


@dataclass(frozen=True)
class Unknown:
    command: str


Command = (
    OptNeg | Macros | Connect | Helo | Mail | Rcpt | Data | Header | EndOfHeaders | Body
    | EndOfMessage | Abort | Quit | Unknown
)



def _strings(payload: bytes, count: int | None, what: str) -> list[bytes]:
    """NUL-terminated strings; ``count`` of them exactly (None: any number, at least none)."""
    if payload and not payload.endswith(b"\0"):
        raise MalformedFrameError(f"{what}: string not NUL-terminated")
    parts = payload[:-1].split(b"\0") if payload else []
    if count is not None and len(parts) != count:
        raise MalformedFrameError(f"{what}: expected {count} strings, got {len(parts)}")
    return parts


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _parse(code: int, payload: bytes, max_macros: int) -> Command:
    kind = chr(code)
    if kind == "B":
        return Body(payload)
    if kind == "L":
        if not payload.endswith(b"\0"):
            raise MalformedFrameError("header: string not NUL-terminated")
        name, sep, value = payload[:-1].partition(b"\0")
        if not sep or not name or b"\0" in value:
            raise MalformedFrameError("header: expected a name and a value")
        return Header(name.decode("utf-8", "replace"), value.decode("utf-8", "surrogateescape"))
    if kind in ("N", "T", "A", "Q", "K"):
        if payload:
            raise MalformedFrameError(f"command {kind!r} carries no payload")
        if kind == "N":
            return EndOfHeaders()
        if kind == "T":
            return Data()
        if kind == "A":
            return Abort()
        return Quit(new_connection=kind == "K")
    if kind == "E":
        return EndOfMessage(payload)
    if kind == "D":
        if not payload:
            raise MalformedFrameError("macros: no stage")
        stage = chr(payload[0])
        parts = _strings(payload[1:], None, "macros")
        if len(parts) % 2:
            raise MalformedFrameError("macros: a name without a value")
        if len(parts) // 2 > max_macros:
            raise MalformedFrameError(f"macros: more than {max_macros} in one frame")
        values = {_text(parts[i]): _text(parts[i + 1]) for i in range(0, len(parts), 2)}
        return Macros(stage, values)
    if kind == "M" or kind == "R":
        parts = _strings(payload, None, "mail" if kind == "M" else "rcpt")
        if not parts:
            raise MalformedFrameError("envelope command without an address")
        address, args = _text(parts[0]), tuple(_text(p) for p in parts[1:])
        return Mail(address, args) if kind == "M" else Rcpt(address, args)
    if kind == "H":
        (name,) = _strings(payload, 1, "helo")
        return Helo(_text(name))
    if kind == "C":
        host, sep, rest = payload.partition(b"\0")
        if not sep or not rest:
            raise MalformedFrameError("connect: no family")
        family = chr(rest[0])
        if family == "U":
            return Connect(_text(host), family, 0, "")
        if family not in ("4", "6", "L"):
            raise MalformedFrameError(f"connect: unknown family {family!r}")
        if len(rest) < 3:
            raise MalformedFrameError("connect: no port")
        port = int.from_bytes(rest[1:3], "big")
        (raw_address,) = _strings(rest[3:], 1, "connect")
        return Connect(_text(host), family, port, _text(raw_address))
    if kind == "O":
        if len(payload) != _OPTNEG.size:
            raise MalformedFrameError("option negotiation: expected 12 bytes")
        return OptNeg(*_OPTNEG.unpack(payload))
    if kind == "U":
        (line,) = _strings(payload, 1, "unknown")
        return Unknown(_text(line))
    raise MalformedFrameError(f"unknown command byte 0x{code:02x}")


class MilterDecoder(StickyDecoder[Command]):
    """Incremental decoder: :meth:`feed` bytes as they arrive, get complete commands back.

    At most one incomplete frame is held, so memory is bounded by ``max_frame`` plus the bytes
    of one read.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, max_macros: int = DEFAULT_MAX_MACROS) -> None:
        super().__init__()
        self.max_frame = max_frame
        self.max_macros = max_macros

    def _feed(self, data: bytes) -> list[Command]:
        buffer = self._buffer + data if self._buffer else data
        commands: list[Command] = []
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if length == 0:
                raise MalformedFrameError("frame of length 0")
            if length > self.max_frame:
                raise FrameTooLongError(f"frame of {length} bytes (limit {self.max_frame})")
            if end - start - 4 < length:
                break
            code = buffer[start + 4]
            payload = buffer[start + 5 : start + 4 + length]
            commands.append(_parse(code, payload, self.max_macros))
            start += 4 + length
        self._buffer = buffer[start:] if start < end else b""
        return commands


def negotiate(offer: OptNeg, actions: int = ACTIONS, protocol: int = PROTOCOL) -> OptNeg:
    """Our answer to ``offer``; NegotiationError if Postfix cannot give what we need.

    The answer's actions must be a subset of what was offered (else Postfix logs "request mask
    conflict"); so must protocol flags, except that we may only switch off what the MTA can
    switch off.
    """
    if offer.version < 2:
        raise NegotiationError(f"milter protocol version {offer.version} is too old")
    if actions & ~offer.actions:
        raise NegotiationError(
            f"the MTA does not offer the actions we need (0x{actions:x} of 0x{offer.actions:x})"
        )
    if protocol & SMFIP_HDR_LEADSPC and not offer.protocol & SMFIP_HDR_LEADSPC:
        raise NegotiationError("the MTA does not offer SMFIP_HDR_LEADSPC (needs protocol 6)")
    return OptNeg(min(offer.version, VERSION), actions, protocol & offer.protocol)


# -- encoding ---------------------------------------------------------------------------------


def frame(code: str, payload: bytes = b"") -> bytes:
    return _LENGTH.pack(len(payload) + 1) + code.encode("ascii") + payload


def _z(text: str) -> bytes:
    if "\0" in text:
        raise ValueError("a milter string must not contain NUL")
    return text.encode("utf-8", "surrogateescape") + b"\0"


def encode_optneg(answer: OptNeg) -> bytes:
    return frame("O", _OPTNEG.pack(answer.version, answer.actions, answer.protocol))


CONTINUE = frame("c")
ACCEPT = frame("a")
REJECT = frame("r")
TEMPFAIL = frame("t")
DISCARD = frame("d")
SKIP = frame("s")
PROGRESS = frame("p")


def reply_code(code: str, text: str) -> bytes:
    """``y``: an SMTP reply such as ``550 5.7.1 text``; ``%`` doubled (Postfix formats it)."""
    if len(code) != 3 or code[0] not in "45" or not code.isdigit():
        raise ValueError(f"not a 4xx/5xx reply code: {code!r}")
    if any(c in text for c in "\r\n\0"):
        raise ValueError("a reply text must be one line")
    return frame("y", _z(f"{code} {text}".replace("%", "%%")))


def _header_value(value: str) -> str:
    """A value to add or change: folds sent as bare LF.

    Postfix stores a milter's header value as given and splits its queue-file records at LF;
    a CR left in would reach the next hop as a stray ``\\r`` before each CRLF. Postfix writes
    CRLF on output, so the message carries the same folds the signer produced.
    """
    if "\0" in value:
        raise ValueError("a header value must not contain NUL")
    return value.replace("\r\n", "\n")


def add_header(name: str, value: str) -> bytes:
    """``h``: append a header at the end of the headers."""
    return frame("h", _z(name) + _z(_header_value(value)))


def insert_header(index: int, name: str, value: str) -> bytes:
    """``i``: insert a header at ``index`` (0 is the very top, above Postfix's Received:)."""
    return frame("i", struct.pack("!I", index) + _z(name) + _z(_header_value(value)))


def change_header(index: int, name: str, value: str) -> bytes:
    """``m``: change the ``index``-th (1-based) header called ``name``; empty deletes it."""
    if index < 1:
        raise ValueError("header index is 1-based")
    return frame("m", struct.pack("!I", index) + _z(name) + _z(_header_value(value)))


def quarantine(reason: str) -> bytes:
    return frame("q", _z(reason))


# -- the MTA's side (tests and the benchmark) -------------------------------------------------


@dataclass
class MtaEncoder:
    """What Postfix sends, for tests, fuzzing and the benchmark client."""

    macros: dict[str, dict[str, str]] = field(default_factory=dict)

    @staticmethod
    def optneg(version: int = 6, actions: int = 0x1FF, protocol: int = 0x1FFFFF) -> bytes:
        return frame("O", _OPTNEG.pack(version, actions, protocol))

    @staticmethod
    def macro(stage: str, values: Mapping[str, str]) -> bytes:
        return frame("D", stage.encode("ascii") + b"".join(_z(k) + _z(v) for k, v in values.items()))

    @staticmethod
    def connect(hostname: str, address: str, port: int = 25, family: str = "4") -> bytes:
        if family == "U":
            return frame("C", _z(hostname) + b"U")
        return frame("C", _z(hostname) + family.encode() + struct.pack("!H", port) + _z(address))

    @staticmethod
    def helo(name: str) -> bytes:
        return frame("H", _z(name))

    @staticmethod
    def mail(sender: str, *args: str) -> bytes:
        return frame("M", _z(sender) + b"".join(_z(a) for a in args))

    @staticmethod
    def rcpt(recipient: str) -> bytes:
        return frame("R", _z(recipient))

    @staticmethod
    def header(name: str, value: str) -> bytes:
        return frame("L", _z(name) + _z(value))

    @staticmethod
    def body(chunk: bytes) -> bytes:
        return b"".join(
            frame("B", chunk[i : i + MAX_BODY_CHUNK]) for i in range(0, len(chunk), MAX_BODY_CHUNK)
        )

    DATA = frame("T")
    EOH = frame("N")
    EOM = frame("E")
    ABORT = frame("A")
    QUIT = frame("Q")
    QUIT_NC = frame("K")


@dataclass(frozen=True)
class Reply:
    """One decoded reply (for tests and the benchmark client)."""

    code: str
    payload: bytes


def decode_replies(data: bytes) -> tuple[list[Reply], bytes]:
    """Complete replies in ``data`` and the bytes left over."""
    replies = []
    start = 0
    while len(data) - start >= 5:
        (length,) = _LENGTH.unpack_from(data, start)
        if len(data) - start - 4 < length:
            break
        replies.append(Reply(chr(data[start + 4]), data[start + 5 : start + 4 + length]))
        start += 4 + length
    return replies, data[start:]
