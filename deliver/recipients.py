# -*- test-case-name: tests.unit.test_deliver_service -*-
"""Recipient decisions: an RCPT address -> the mailboxes (and folders) it delivers to, or a reply.

:func:`resolve_recipient` is synchronous (it runs in the database pool) and pure apart from the
store; the protocol never sees the database.
"""

from __future__ import annotations

from dataclasses import dataclass

from deliver.lmtp_codec import Reply
from mailplugins.addresses import AddressError, parse_address
from mailplugins.maildir_path import expand_location
from mailplugins.store import Store

__all__ = ["Target", "is_postmaster", "postmaster_address", "resolve_recipient"]


@dataclass(frozen=True)
class Target:
    """One mailbox a recipient delivers to."""

    mailbox_id: int
    #: The mailbox's address (for logs only; never a metric label).
    address: str
    maildir: str
    #: The ``+detail`` that applies (None: INBOX).
    detail: str | None
    quota_bytes: int


@dataclass(frozen=True)
class Rejection:
    reply: Reply
    #: Metric label for recipients_total.
    result: str


def is_postmaster(path: str) -> bool:
    """``<postmaster>`` without a domain, in any case (RFC 5321 4.5.1: MUST be accepted)."""
    return path.casefold() == "postmaster"


def postmaster_address(store: Store, configured: str | None) -> str | None:
    """Where ``<postmaster>`` goes: ``deliver.postmaster``, else postmaster@ the first local
    domain (alphabetically); None when there is no local domain at all."""
    if configured:
        return configured
    domains = store.list_domains()
    return f"postmaster@{domains[0].name}" if domains else None


def resolve_recipient(
    store: Store,
    path: str,
    *,
    location: str,
    delimiters: str,
    disabled_action: str,
    postmaster: str | None = None,
) -> tuple[Target, ...] | Rejection:
    """Resolve one RCPT path through the store (aliases, ``+detail``, catch-all).

    ``<postmaster>`` resolves as ``postmaster`` (the ``deliver.postmaster`` setting) or its
    default, see :func:`postmaster_address`.
    """
    if is_postmaster(path):
        target = postmaster_address(store, postmaster)
        if target is None:
            return Rejection(Reply(550, "5.1.1", "<postmaster> has no address: set deliver.postmaster "
                                   "(there is no local domain to default to)"), "unknown")
        result = resolve_recipient(store, target, location=location, delimiters=delimiters,
                                   disabled_action=disabled_action)
        if isinstance(result, Rejection) and result.reply.code == 550:
            return Rejection(Reply(550, result.reply.enhanced, f"<postmaster> goes to <{target}>, which "
                                   f"cannot receive mail: {result.reply.text}"), result.result)
        return result
    try:
        address = parse_address(path)
    except AddressError:
        return Rejection(Reply(501, "5.1.3", "Bad recipient address syntax"), "bad_address")
    if address.routing:
        return Rejection(Reply(550, "5.1.1", f"<{path}> User doesn't exist"), "unknown")
    resolution = store.resolve(address, delimiters)
    if resolution is None:
        return Rejection(Reply(550, "5.1.2", f"<{path}> Domain not handled here"), "unknown")
    targets = []
    unusable = list(resolution.disabled)
    for delivery in resolution.deliveries:
        mailbox = delivery.mailbox
        if not mailbox.allows("lmtp"):
            unusable.append(mailbox)
            continue
        try:
            maildir = expand_location(location, mailbox.local_part, mailbox.domain)
        except ValueError:
            return Rejection(
                Reply(550, "5.1.1", f"<{path}> Mailbox name cannot be stored"), "bad_address"
            )
        targets.append(Target(mailbox.id, mailbox.address, maildir, delivery.detail, mailbox.quota_bytes))
    if targets:
        return tuple(targets)
    if unusable:
        if disabled_action == "defer":
            return Rejection(Reply(450, "4.2.1", f"<{path}> Mailbox disabled, try later"), "disabled")
        return Rejection(Reply(550, "5.2.1", f"<{path}> Mailbox disabled"), "disabled")
    return Rejection(Reply(550, "5.1.1", f"<{path}> User doesn't exist"), "unknown")
