# -*- test-case-name: tests.unit.test_policyd_rules -*-
"""What the rules know about one request: parsed addresses, the client, memoised lookups.

Parsing is forgiving in one direction only: an address that does not parse is never taken for
a local mailbox. If its domain (the part after the last ``@``) is one of ours it is an unknown
user; otherwise it is somebody else's address and the relay rules apply. IP literals
(``user@[192.0.2.1]``) and source routes (``@ours:user@elsewhere``, whose real domain is the
last one) are never ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from mailplugins.addresses import Address, AddressError, normalise_domain, parse_address
from mailplugins.clients import client_in
from mailplugins.config.fields import IPNetwork
from mailplugins.records import Resolution
from policyd.codec import PolicyRequest
from policyd.lookups import Lookups

#: An empty resolution: the domain is ours, the address names nothing.
NOTHING = Resolution()


@lru_cache(maxsize=4096)
def parse_or_none(text: str) -> Address | None:
    """A parsed address, or None when it does not parse (memoised: Postfix repeats itself)."""
    try:
        return parse_address(text)
    except AddressError:
        return None


def domain_of(text: str) -> str | None:
    """The normalised domain after the last ``@``, even when the local part is malformed."""
    _, at, domain = text.rpartition("@")
    if not at:
        return None
    try:
        return normalise_domain(domain)
    except AddressError:
        return None


class Facts:
    """One RCPT request as the rules see it; lookups are memoised for the request's lifetime."""

    __slots__ = (
        "_lookups",
        "_resolution",
        "_resolved",
        "client_address",
        "context",
        "in_mynetworks",
        "login",
        "recipient",
        "sender",
        "state",
    )

    def __init__(
        self, request: PolicyRequest, lookups: Lookups, mynetworks: Sequence[IPNetwork]
    ) -> None:
        self.state = request.get("protocol_state")
        self.recipient = request.get("recipient")
        self.sender = request.get("sender")
        self.login = request.get("sasl_username")
        self.client_address = request.get("client_address")
        self.context = request.get("policy_context")
        self.in_mynetworks = client_in(self.client_address, mynetworks)
        self._lookups = lookups
        self._resolved = False
        self._resolution: Resolution | None = None

    @property
    def lookups(self) -> Lookups:
        return self._lookups

    @property
    def trusted(self) -> bool:
        """Authenticated, or inside mynetworks: the two ways a client may relay."""
        return bool(self.login) or self.in_mynetworks

    @property
    def recipient_undecidable(self) -> bool:
        """A recipient without a domain (``RCPT TO:<postmaster>``): Postfix qualifies it."""
        return "@" not in self.recipient

    async def recipient_resolution(self) -> Resolution | None:
        """What the recipient resolves to; None when it is not in one of our domains."""
        if not self._resolved:
            self._resolution = await self.resolve_address(self.recipient)
            self._resolved = True
        return self._resolution

    async def resolve_address(self, text: str) -> Resolution | None:
        address = parse_or_none(text)
        if address is None:
            domain = domain_of(text)
            if domain is None or domain.startswith("["):
                return None
            return NOTHING if await self._lookups.is_local_domain(domain) else None
        if address.domain.startswith("["):
            return None
        return await self._lookups.resolve(address)

    async def sender_domain_is_ours(self) -> bool:
        address = parse_or_none(self.sender)
        domain = address.domain if address is not None else domain_of(self.sender)
        if domain is None or domain.startswith("["):
            return False
        return await self._lookups.is_local_domain(domain)
