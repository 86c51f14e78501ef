# -*- test-case-name: tests.unit.test_deliver_service -*-
"""One LMTP transaction as the delivery sees it, and the trace headers it prepends.

Plain data and pure functions: the protocol fills an :class:`Envelope`, the delivery
(:mod:`deliver.store_one`) turns it into header bytes and redelivery keys.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deliver.recipients import Target

if TYPE_CHECKING:
    from deliver.snapshot import Snapshot


@dataclass(frozen=True)
class Recipient:
    """An accepted RCPT."""

    path: str
    #: Original recipient from ORCPT (decoded), when the client sent one.
    original: str | None
    targets: tuple[Target, ...]


def transaction_id() -> str:
    """22 characters of base64 (128 random bits), the length of Dovecot's LMTP IDs."""
    return base64.b64encode(os.urandom(16)).decode("ascii").rstrip("=")


@dataclass
class Envelope:
    helo: str
    sender: str
    declared_size: int | None = None
    recipients: list[Recipient] = field(default_factory=list)
    #: Postfix's queue ID from XFORWARD IDENT, when Postfix sends it.
    ident: str | None = None
    #: MAIL said SMTPUTF8 (RFC 6531): UTF-8 addresses are allowed in this transaction.
    smtputf8: bool = False
    #: The LMTP client's IP address (None on a UNIX socket), for the Received: line.
    client_ip: str | None = None
    #: When MAIL was accepted (seconds since the epoch): the Received: line's date, fixed
    #: for the whole transaction so every recipient's header is the same bytes.
    timestamp: float = 0.0
    #: The transaction's ID, in the Received: line and the 250 replies (as Dovecot does).
    id: str = field(default_factory=transaction_id)
    #: The service's snapshot taken when DATA started (new_spool): the spool's Maildir tmp
    #: file and the delivery then use the same settings, writer and quota.
    snapshot: Snapshot | None = None


#: Control characters (C0 and DEL): never copied into a header we write.
_CONTROLS = re.compile("[\x00-\x1f\x7f]")


def _clean_header_value(text: str) -> str:
    return _CONTROLS.sub("", text)


def received_line(envelope: Envelope, hostname: str, recipient: str | None) -> str:
    """Dovecot's LMTP trace record (``smtp_server_transaction_write_trace_record``): from the
    LHLO name and client IP, by us with LMTP, the transaction ID, the envelope sender, the
    recipient only when the transaction has one, the time of MAIL."""
    text = "Received: from " + _clean_header_value(envelope.helo)
    if envelope.client_ip:
        text += f" ([{envelope.client_ip}])"
    text += f"\n\tby {hostname} with LMTP\n\tid {envelope.id}"
    text += f"\n\t(envelope-from <{_clean_header_value(envelope.sender)}>)"
    if recipient is not None:
        text += f"\n\tfor <{_clean_header_value(recipient)}>"
    return text + "; " + email.utils.formatdate(envelope.timestamp, localtime=True) + "\n"


def build_header(sender: str, recipient: Recipient, delivered_to: bool, received: str = "") -> bytes:
    """Trace headers prepended to the message (LF line ends, like the rest of the file)."""
    lines = [f"Return-Path: <{_clean_header_value(sender)}>\n"]
    if delivered_to:
        lines.append(f"Delivered-To: {_clean_header_value(recipient.path)}\n")
    if recipient.original:
        lines.append(f"X-Original-To: {_clean_header_value(recipient.original)}\n")
    lines.append(received)
    return "".join(lines).encode("utf-8")


def redelivery_key(envelope: Envelope, recipient: Recipient, size: int) -> str | None:
    """What identifies one message for one recipient across Postfix's retries: its queue ID
    (XFORWARD IDENT), the RCPT address and the size. None without a queue ID: a client that
    does not say which message this is never has a delivery skipped."""
    if not envelope.ident:
        return None
    text = f"{envelope.ident}\0{envelope.sender}\0{recipient.path}\0{size}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]

