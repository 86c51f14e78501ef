# -*- test-case-name: tests.unit.test_policyd_codec -*-
"""Postfix SMTPD access policy delegation framing: bytes in, requests out; replies out.

A request is ``name=value\\n`` lines ended by an empty line; a reply is ``action=...\\n\\n``.
No Twisted here, so the framing is tested at every split point without a transport.

Choices (see the reference page on Postfix 3.7):

- Lines are split on the **first** ``=`` only: values may contain ``=`` (BATV senders).
- Unknown attribute names are kept, so a newer Postfix never breaks us.
- A duplicated attribute keeps its **first** value; Postfix never repeats a name, so a repeat
  is either a bug or someone trying to override a value after the fact.
- Bytes that are not UTF-8 are replaced (U+FFFD): such a value never names a mailbox, and the
  connection is not dropped for something Postfix let through.
- A trailing CR is dropped, so a person can talk to the server with a CRLF client.
- Every line is bounded by ``max_line_length`` and every request by ``max_attributes``, so a
  peer can never make us hold more than ``max_line_length * max_attributes`` bytes. A line
  without ``=``, an empty name, a NUL byte, an empty request, or a request whose ``request``
  attribute is not ``smtpd_access_policy`` is malformed. After an error the decoder refuses
  further input: the connection is to be closed without a reply.
"""

from __future__ import annotations

from collections.abc import Mapping

from mailplugins import codec as codec_base
from mailplugins.codec import StickyDecoder

REQUEST_TYPE = "smtpd_access_policy"


class CodecError(codec_base.CodecError):
    """The peer sent something that is not a policy request; close without replying."""


class LineTooLongError(CodecError):
    pass


class TooManyAttributesError(CodecError):
    pass


class MalformedRequestError(CodecError):
    pass


class PolicyRequest:
    """One request: attribute names to values (first value wins); treat it as read-only."""

    __slots__ = ("attributes",)

    def __init__(self, attributes: Mapping[str, str]) -> None:
        self.attributes = attributes

    def get(self, name: str, default: str = "") -> str:
        return self.attributes.get(name, default)

    def __repr__(self) -> str:
        state = self.attributes.get("protocol_state", "?")
        return f"<PolicyRequest {state} with {len(self.attributes)} attributes>"


class RequestDecoder(StickyDecoder[PolicyRequest]):
    """Incremental decoder: :meth:`feed` bytes as they arrive, get complete requests back.

    A request is parsed whole once its terminating empty line has arrived (a few C-level
    splits instead of a Python step per line: this is the hot path). Until then its bytes wait
    in a buffer bounded by ``max_attributes * (max_line_length + 1)``; an unterminated line is
    refused as soon as it passes ``max_line_length``.
    """

    def __init__(self, max_line_length: int = 8192, max_attributes: int = 128) -> None:
        super().__init__()
        self.max_line_length = max_line_length
        self.max_attributes = max_attributes
        self._max_pending = max_attributes * (max_line_length + 1)

    def _feed(self, data: bytes) -> list[PolicyRequest]:
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            # CRLF from a person typing; a lone CR at the end may still meet its LF later.
            buffer = buffer.replace(b"\r\n", b"\n")
        requests: list[PolicyRequest] = []
        start = 0
        while True:
            if buffer.startswith(b"\n", start):
                raise MalformedRequestError("empty request")
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            requests.append(self._parse(buffer[start:end]))
            start = end + 2
        rest = buffer[start:] if start else buffer
        if rest:
            first_line = rest.find(b"\n")
            if first_line >= 0 and b"=" not in rest[:first_line]:
                raise MalformedRequestError("attribute line without name=value")  # fail early
            last_line = len(rest) - rest.rfind(b"\n") - 1
            if last_line > self.max_line_length + (1 if rest.endswith(b"\r") else 0):
                raise LineTooLongError(f"line longer than {self.max_line_length} bytes")
            if rest.count(b"\n") >= self.max_attributes:
                raise TooManyAttributesError(
                    f"more than {self.max_attributes} attributes in one request"
                )
            if len(rest) > self._max_pending:
                raise LineTooLongError(f"line longer than {self.max_line_length} bytes")
        self._buffer = rest
        return requests

    def _parse(self, block: bytes) -> PolicyRequest:
        """One request without its final empty line: ``name=value`` lines joined by LF."""
        if block.count(b"\n") >= self.max_attributes:
            raise TooManyAttributesError(f"more than {self.max_attributes} attributes in one request")
        limit = self.max_line_length
        if len(block) > limit and max(map(len, block.split(b"\n"))) > limit:
            raise LineTooLongError(f"line longer than {limit} bytes")
        if b"\0" in block:
            raise MalformedRequestError("NUL byte in attribute line")
        text = block.decode("utf-8", "replace")
        if text.startswith("=") or "\n=" in text:
            raise MalformedRequestError("attribute line without name=value")
        try:
            # Reversed, so that the first of two equal names is the one kept.
            attributes = dict(reversed([line.split("=", 1) for line in text.split("\n")]))
        except ValueError:
            raise MalformedRequestError("attribute line without name=value") from None
        kind = attributes.get("request")
        if kind != REQUEST_TYPE:
            raise MalformedRequestError(
                "missing request attribute" if kind is None else "unknown request type"
            )
        return PolicyRequest(attributes)


def encode_request(attributes: Mapping[str, str] | list[tuple[str, str]]) -> bytes:
    """The wire form of a request (for tests and the benchmark client)."""
    pairs = attributes.items() if isinstance(attributes, Mapping) else attributes
    return b"".join(f"{k}={v}\n".encode() for k, v in pairs) + b"\n"


def encode_reply(action: str) -> bytes:
    """``action=<action>\\n\\n``; an action holding a line break would desynchronise Postfix."""
    if not action or any(c in action for c in "\r\n\0"):
        raise ValueError("a policy action must be one non-empty line")
    return b"action=" + action.encode("utf-8") + b"\n\n"


def decode_reply(data: bytes) -> str:
    """The action of one complete reply (for tests and the benchmark client)."""
    text = data.decode("utf-8")
    if not text.endswith("\n\n"):
        raise ValueError("incomplete reply")
    for line in text[:-2].split("\n"):
        name, _, value = line.partition("=")
        if name == "action":
            return value
    raise ValueError("reply without action")
