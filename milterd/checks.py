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


@dataclass(frozen=True)
class DmarcVerdict:
    """The DMARC outcome for one message, as the session acts on it.

    ``result``: pass | fail | none | temperror | permerror; ``policy``: none | quarantine |
    reject (the one that applies to this message's domain); ``header_from``: the domain
    evaluated ("" when the message has none).
    """

    result: str
    header_from: str
    policy: str
    reason: str = ""


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
        self, header_from: str, dkim: Sequence[DkimLike], spf: SpfLike, spf_domain: str
    ) -> Deferred[DmarcVerdict]:
        """DMARC for the ``From:`` domain given the DKIM and SPF results."""

    def authentication_results(
        self, dkim: Sequence[DkimLike], spf: SpfLike, dmarc: DmarcVerdict, disposition: str
    ) -> str:
        """The value of our Authentication-Results header (leading space, folded)."""

    def claims_our_id(self, value: str) -> bool:
        """True when an Authentication-Results value names our authserv-id."""

