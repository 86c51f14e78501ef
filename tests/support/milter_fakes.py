"""In-memory stand-ins for milterd's Checks, and a helper to speak to a session like Postfix."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from mailplugins.config import parse_config
from mailplugins.config.milterd import MilterdConfig
from milterd.checks import DkimLike, DmarcLike, DmarcVerdict, Headers, SignerLike, SpfLike, VerifierLike
from milterd.session import from_domains

AUTHSERV_ID = "mx.example.test"


def milterd_config(**overrides: Any) -> MilterdConfig:
    section = {"listen": "unix:/tmp/milterd-test.sock", "authserv_id": AUTHSERV_ID,
               "mynetworks": ["192.0.2.0/24"], **overrides}
    config = parse_config({"database": {"url": "sqlite://"}, "milterd": section}).milterd
    assert config is not None
    return config


@dataclass
class FakeSigner:
    domain: str
    headers: Headers
    body: bytearray = field(default_factory=bytearray)
    quick: bool = True

    def feed(self, chunk: bytes) -> None:
        self.body += chunk

    def finish(self) -> list[str]:
        return [f" v=1; a=rsa-sha256; d={self.domain}; s=rsa; bh={len(self.body)}",
                f" v=1; a=ed25519-sha256; d={self.domain}; s=ed"]


@dataclass
class FakeVerifier:
    headers: Headers
    body: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes) -> None:
        self.body += chunk

    def key_names(self) -> list[str]:
        return []


@dataclass(frozen=True)
class Dkim:
    result: str
    domain: str


@dataclass(frozen=True)
class Spf:
    result: str


@dataclass
class FakeChecks:
    authserv_id: str = AUTHSERV_ID
    owned: set[tuple[str, str]] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)
    dkim: list[Dkim] = field(default_factory=list)
    spf_result: str = "pass"
    dmarc_verdicts: dict[str, DmarcVerdict] = field(default_factory=dict)
    signers: list[FakeSigner] = field(default_factory=list)
    verifiers: list[FakeVerifier] = field(default_factory=list)
    spf_calls: list[tuple[str, str, str]] = field(default_factory=list)
    dmarc_calls: list[tuple[str, str]] = field(default_factory=list)
    #: Stage -> a Deferred to hand out instead (to test slowness) or an exception to fail with.
    hold: dict[str, Deferred[Any]] = field(default_factory=dict)
    broken: dict[str, Exception] = field(default_factory=dict)

    def _answer(self, stage: str, value: Any) -> Deferred[Any]:
        if stage in self.broken:
            return fail(self.broken[stage])
        if stage in self.hold:
            return self.hold[stage]
        return succeed(value)

    def may_send_as(self, login: str, address: str) -> Deferred[bool]:
        return self._answer("owns", (login, address.lower()) in self.owned)

    def signer(self, domain: str, headers: Headers) -> Deferred[SignerLike | None]:
        if domain not in self.keys:
            return self._answer("keys", None)
        signer = FakeSigner(domain, list(headers))
        self.signers.append(signer)
        return self._answer("keys", signer)

    def sign(self, signer: SignerLike) -> Deferred[list[str]]:
        return self._answer("sign", signer.finish())

    def verifier(self, headers: Headers) -> VerifierLike:
        verifier = FakeVerifier(list(headers))
        self.verifiers.append(verifier)
        return verifier

    def spf(self, client_address: str, helo: str, sender: str) -> Deferred[SpfLike]:
        self.spf_calls.append((client_address, helo, sender))
        return self._answer("spf", Spf(self.spf_result))

    def verify(self, verifier: VerifierLike) -> Deferred[list[DkimLike]]:
        return self._answer("verify", list(self.dkim))

    def dmarc(self, from_values: Sequence[str], dkim: Sequence[DkimLike], spf: SpfLike,
              spf_domain: str) -> Deferred[DmarcLike]:
        """Like milterd.dmarc for the From: cases; the verdict per domain from dmarc_verdicts."""
        count, _addresses, domains = from_domains([("From", v) for v in from_values])
        header_from = domains[0] if count == 1 and domains and all(domains) else ""
        self.dmarc_calls.append((header_from, spf_domain))
        if not header_from:
            return self._answer("dmarc", DmarcVerdict("permerror", "", "none", "no usable From"))
        verdict = self.dmarc_verdicts.get(header_from, DmarcVerdict("none", header_from, "none"))
        if verdict.result == "fail":
            verdict = dataclasses.replace(verdict, disposition=verdict.policy)
        return self._answer("dmarc", verdict)

    def authentication_results(self, dkim: Sequence[DkimLike], spf: SpfLike, dmarc: DmarcLike,
                               disposition: str, *, mailfrom: str, helo: str) -> str:
        parts = [f"dkim={d.result} header.d={d.domain}" for d in dkim] or ["dkim=none"]
        return (f" {self.authserv_id}; " + "; ".join(parts) + f"; spf={spf.result}; dmarc={dmarc.result}"
                f" (p={dmarc.policy} dis={disposition}) header.from={dmarc.header_from}")

    def claims_our_id(self, value: str) -> bool:
        return value.split(";", 1)[0].strip().lower() == self.authserv_id
