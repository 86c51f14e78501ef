# -*- test-case-name: tests.unit.test_addresses -*-
"""Mail address parsing and normalisation, shared by the CLI, the store and every daemon.

Domains are stored lower-cased and IDNA-encoded (``xn--``); local parts keep their case and are
compared case-insensitively. Quoted local parts are understood (``"john doe"@example.org``).
Anything that smells of routing (``%``, ``!``, ``@`` inside the local part, source routes, IP
literals) is kept visible through :attr:`Address.routing` so that policy code can refuse it
instead of mistaking it for a local mailbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: RFC 5321 limits.
MAX_LOCAL_LENGTH = 64
MAX_DOMAIN_LENGTH = 255
MAX_ADDRESS_LENGTH = 320

_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\u0080-\U0010ffff]+$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class AddressError(ValueError):
    """Not a usable mail address; the message says why in words fit for an operator."""


@dataclass(frozen=True)
class Address:
    """A parsed address: ``local`` as written (quotes removed), ``domain`` normalised."""

    local: str
    domain: str
    #: True when the local part was quoted on input (and must be quoted on output).
    quoted: bool = False

    @property
    def routing(self) -> bool:
        """Routing syntax that must never be taken for a plain local mailbox."""
        return any(c in self.local for c in "%!@") or self.domain.startswith("[")

    @property
    def local_key(self) -> str:
        """The local part as compared: case-insensitively."""
        return self.local.casefold()

    @property
    def key(self) -> str:
        return f"{self.local_key}@{self.domain}"

    def __str__(self) -> str:
        return f"{quote_local(self.local) if self.quoted else self.local}@{self.domain}"

    def split_detail(self, delimiters: str) -> tuple[Address, str | None]:
        """``user+detail@d`` -> (``user@d``, ``detail``); the first delimiter found splits.

        Postfix's recipient_delimiter may list several characters; like Postfix, an address that
        starts with a delimiter has no detail.
        """
        if not delimiters:
            return self, None
        for index, char in enumerate(self.local):
            if char in delimiters and index > 0:
                return Address(self.local[:index], self.domain, self.quoted), self.local[index + 1 :]
        return self, None


def quote_local(local: str) -> str:
    if _ATEXT.match(local) and not local.startswith(".") and ".." not in local:
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def normalise_domain(domain: str) -> str:
    """Lower-case and IDNA-encode a domain; IP literals (``[192.0.2.1]``) are kept as given."""
    text = domain.strip().rstrip(".")
    if not text:
        raise AddressError("empty domain")
    if text.startswith("["):
        if not text.endswith("]"):
            raise AddressError(f"malformed address literal: {domain!r}")
        return text.lower()
    try:
        ascii_domain = text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise AddressError(f"not a valid domain name: {domain!r}") from None
    if len(ascii_domain) > MAX_DOMAIN_LENGTH:
        raise AddressError(f"domain longer than {MAX_DOMAIN_LENGTH} characters")
    labels = ascii_domain.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"not a valid domain name: {domain!r}")
    return ascii_domain


def _split_quoted(text: str) -> tuple[str, str]:
    """Split ``"quoted local"@domain``; backslash escapes inside the quotes."""
    local = []
    index = 1
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            local.append(text[index + 1])
            index += 2
            continue
        if char == '"':
            rest = text[index + 1 :]
            if not rest.startswith("@"):
                raise AddressError("quoted local part must be followed by @domain")
            return "".join(local), rest[1:]
        local.append(char)
        index += 1
    raise AddressError("unterminated quoted local part")


def parse_address(text: str, *, allow_empty_local: bool = False) -> Address:
    """Parse ``local@domain`` (angle brackets and a source route are accepted and flagged).

    With ``allow_empty_local`` the catch-all form ``@domain`` is accepted (local part "").
    """
    if len(text) > MAX_ADDRESS_LENGTH:
        raise AddressError(f"address longer than {MAX_ADDRESS_LENGTH} characters")
    value = text.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise AddressError("address contains control characters")
    route = ""
    if value.startswith("@") and ":" in value and not allow_empty_local:
        # RFC 5321 source route "@relay:user@domain": keep it visible as routing.
        route, value = value.split(":", 1)
    if value.startswith('"'):
        local, domain = _split_quoted(value)
        quoted = True
    else:
        if "@" not in value:
            raise AddressError(f"not an address (no @): {text!r}")
        local, domain = value.rsplit("@", 1)
        quoted = False
        if local and not quoted and (local.startswith(".") or local.endswith(".") or ".." in local):
            raise AddressError(f"malformed local part: {local!r}")
        if any(c in local for c in ' "(),:;<>[\\]'):
            raise AddressError(f"malformed local part: {local!r}")
    if not local and not allow_empty_local:
        raise AddressError(f"empty local part: {text!r}")
    if len(local.encode("utf-8")) > MAX_LOCAL_LENGTH:
        raise AddressError(f"local part longer than {MAX_LOCAL_LENGTH} octets")
    if route:
        local = f"{route}:{local}"
        if "@" not in local:
            local = "@" + local
    return Address(local, normalise_domain(domain), quoted)


def parse_domain(text: str) -> str:
    """A bare domain for the domains table: no IP literals, normalised."""
    domain = normalise_domain(text)
    if domain.startswith("["):
        raise AddressError("an address literal is not a mail domain")
    if "." not in domain and domain != "localhost":
        raise AddressError(f"not a fully qualified domain: {text!r}")
    return domain
