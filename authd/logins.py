# -*- test-case-name: tests.unit.test_authd_verify -*-
"""What a front end asks the verifier and what it answers: the request, the login it names
(Dovecot's master-user forms), the login-character rule and the verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

from authd.sasl_codec import Outcome


@dataclass(frozen=True)
class VerifyRequest:
    user: str
    password: str = field(repr=False)
    service: str
    remote_ip: str | None
    #: Label for metrics only: ``plain``, ``login`` or ``http``.
    mechanism: str
    secured: bool = False
    #: The mailbox to log in as (PLAIN's authzid); set and different from ``user`` it makes
    #: ``user`` a master user's login.
    authzid: str = ""


@dataclass(frozen=True)
class Login:
    """Who logs in (``target``) and, for a master-user login, with whose credentials."""

    target: str
    master: str | None = None


def split_login(request: VerifyRequest, separator: str) -> Login:
    """Dovecot's rules: an authzid other than the login names the target and makes the login a
    master user; else ``target<separator>master`` (the first separator) does the same."""
    if request.authzid and request.authzid.casefold() != request.user.casefold():
        # (Logins are case-insensitive: Alice logging in as alice is no master login.)
        return Login(request.authzid, request.user)
    if separator and separator in request.user:
        target, _, master = request.user.partition(separator)
        if master and master.casefold() != target.casefold():
            return Login(target, master)
        return Login(target)
    return Login(request.user)


def bad_username(login: str, allowed: str) -> str | None:
    """Why Dovecot (``auth_username_chars``) would refuse ``login``, or None.

    An empty ``allowed`` allows everything, as in Dovecot; non-ASCII characters (EAI logins) are
    then allowed too, else refused like any other character outside the set.
    """
    if not login:
        return "empty login"
    if not allowed:
        return None
    for char in login:
        if char not in allowed:
            shown = f"0x{ord(char):02x}" if ord(char) < 0x80 else f"U+{ord(char):04X}"
            return f"login character {shown} not allowed by username_chars"
    return None


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    #: The canonical login (stored address) when the outcome is OK.
    user: str | None = None
    #: Why it failed, for the operator's log only (clients never see it).
    reason: str = ""


def printable(text: str, limit: int = 128) -> str:
    """A client-supplied string made safe for one log line (no control characters)."""
    cut = text[:limit]
    return "".join(c if c.isprintable() else "?" for c in cut) + ("..." if len(text) > limit else "")
