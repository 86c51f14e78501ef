# -*- test-case-name: tests.unit.test_milterd_session -*-
"""What the per-message logic needs from the outside world, as one injected object.

:class:`milterd.session.MilterSession` decides *what* to do with a message; everything that
touches the database, DNS, a thread pool or the DKIM/DMARC code sits behind :class:`Checks`,
so unit tests drive the session with an in-memory fake and a ``task.Clock``. The daemon
passes :class:`milterd.live.LiveChecks`.

The types here are structural (``Protocol``): the DKIM, DMARC and SPF results of
``milterd.dkim``, ``milterd.dmarc`` and ``mailplugins.spf`` fit them as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

Headers = Sequence[tuple[str, str]]


class SignerLike(Protocol):
    @property
    def quick(self) -> bool:
        """Cheap enough to sign on the reactor (see milterd.dkim.MessageSigner.quick)."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> list[str]: ...


class VerifierLike(Protocol):
    def feed(self, chunk: bytes) -> None: ...

    def key_names(self) -> list[str]: ...


class DkimLike(Protocol):
    @property
    def result(self) -> str: ...

    @property
    def domain(self) -> str: ...


class SpfLike(Protocol):
    @property
    def result(self) -> str: ...


class DmarcLike(Protocol):
    """The DMARC outcome for one message (``milterd.dmarc.DmarcResult`` fits).

    ``result``: pass | fail | none | temperror | permerror; ``policy``: none | quarantine |
    reject (the published one that applies); ``disposition``: what the domain asks for this
    message (its policy on ``fail``, ``none`` otherwise or under ``t=y``); ``header_from``:
    the domain evaluated ("" when the message has none).
    """

    @property
    def result(self) -> str: ...

    @property
    def header_from(self) -> str: ...

    @property
    def policy(self) -> str: ...

    @property
    def disposition(self) -> str: ...


@dataclass(frozen=True)
class DmarcVerdict:
    """A :class:`DmarcLike` made here (tests, or when DMARC could not be evaluated)."""

    result: str
    header_from: str
    policy: str
    reason: str = ""
    disposition: str = "none"


@dataclass(frozen=True)
class Incoming:
    """Everything known about an incoming message at end of message."""

    client_address: str
    helo: str
    #: Envelope sender without angle brackets ("" for the null sender).
    sender: str
    headers: Headers


class Checks(Protocol):
    """Injected services; every Deferred fires on the reactor thread and may fail."""

    @property
    def authserv_id(self) -> str: ...

    def may_send_as(self, login: str, address: str) -> Deferred[bool]:
        """The shared login/sender rule (:func:`mailplugins.senders.login_owns`)."""

    def signer(self, domain: str, headers: Headers) -> Deferred[SignerLike | None]:
        """A signer for ``domain``'s active keys over ``headers``; None: the domain has none."""

    def sign(self, signer: SignerLike) -> Deferred[list[str]]:
        """``signer.finish()`` off the reactor: the DKIM-Signature values, top one first."""

    def verifier(self, headers: Headers) -> VerifierLike:
        """A verifier for the message's DKIM signatures (cheap, on the reactor)."""

    def spf(self, client_address: str, helo: str, sender: str) -> Deferred[SpfLike]:
        """SPF for the envelope sender (or the HELO name for ``<>``), in a pool."""

    def verify(self, verifier: VerifierLike) -> Deferred[list[DkimLike]]:
        """Look up the verifier's key records and finish it."""

    def dmarc(
        self, from_values: Sequence[str], dkim: Sequence[DkimLike], spf: SpfLike, spf_domain: str
    ) -> Deferred[DmarcLike]:
        """DMARC (RFC 9989) for the message's ``From:`` header values given the DKIM and SPF
        results (``spf_domain``: the MAIL FROM domain, "" for the null sender)."""

    def authentication_results(
        self, dkim: Sequence[DkimLike], spf: SpfLike, dmarc: DmarcLike, disposition: str, *,
        mailfrom: str, helo: str
    ) -> str:
        """The value of our Authentication-Results header (leading space, folded), with
        ``disposition`` (what we do: the domain's wish after milterd.dmarc's downgrades)."""

    def claims_our_id(self, value: str) -> bool:
        """True when an Authentication-Results value names our authserv-id."""

