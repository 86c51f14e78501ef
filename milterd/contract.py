# -*- test-case-name: tests.unit.test_milterd_live -*-
"""The one place where milterd's daemon meets the DKIM, DMARC, SPF, DNS and key code.

Those modules (``milterd.dkim``, ``milterd.dmarc``, ``milterd.authresults``, ``milterd.keys``,
``mailplugins.dns``, ``mailplugins.spf``) are written alongside this daemon to the signatures
of the milterd contract; this module adapts their calls to :class:`milterd.checks.Checks`, so
a change on their side is a change here only.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from milterd.checks import DkimLike, DmarcVerdict, Headers, SpfLike, VerifierLike


def _module(name: str) -> Any:
    return importlib.import_module(name)


def txt_records(name: str, *, nameservers: Sequence[tuple[str, int]], timeout: float) -> list[bytes] | None:
    """Blocking TXT lookup (``mailplugins.dns.txt_records``)."""
    answer: list[bytes] | None = _module("mailplugins.dns").txt_records(
        name, nameservers=nameservers, timeout=timeout
    )
    return answer


def key_store(engine: Any) -> Any:
    return _module("milterd.keys").KeyStore(engine)


def message_signer(keys: Sequence[Any], headers: Headers, now: int) -> Any:
    return _module("milterd.dkim").MessageSigner(keys, headers, now=now)


def message_verifier(headers: Headers) -> Any:
    return _module("milterd.dkim").MessageVerifier(headers)


def finish_verifier(verifier: VerifierLike, answers: Mapping[str, object]) -> list[DkimLike]:
    """``MessageVerifier.finish``: answers are records, None, or DnsTempError."""
    temp_error = _module("mailplugins.dns").DnsTempError
    txt = {
        name: (answer if answer is None or isinstance(answer, list | temp_error)
               else temp_error(str(answer)))
        for name, answer in answers.items()
    }
    results: list[DkimLike] = verifier.finish(txt)  # type: ignore[attr-defined]
    return results


def spf_check(client: str, sender: str, helo: str, receiver: str, timeout: float,
              nameservers: Sequence[tuple[str, int]]) -> SpfLike:
    """Blocking SPF (``mailplugins.spf``) for the envelope sender, in the DNS pool."""
    spf = _module("mailplugins.spf")
    if nameservers and hasattr(spf, "use_nameservers"):
        spf.use_nameservers(nameservers)
    result: SpfLike = spf.spf_lookup(client, sender, helo, receiver, timeout)
    return result


def dmarc(resolver: Any, header_from: str, dkim: Sequence[DkimLike], spf: SpfLike,
          spf_domain: str) -> Deferred[DmarcVerdict]:
    """DMARC for ``header_from`` with its DNS through ``resolver`` (``milterd.dmarc``)."""
    module = _module("milterd.dmarc")
    evaluated: Deferred[Any] = Deferred.fromCoroutine(
        module.evaluate_async(header_from, dkim, spf, spf_domain, resolver.txt)
    )

    def verdict(result: Any) -> DmarcVerdict:
        return DmarcVerdict(result.result, result.header_from, result.policy, result.reason)

    return evaluated.addCallback(verdict)


def compose(authserv_id: str, dkim: Sequence[DkimLike], spf: SpfLike, verdict: DmarcVerdict,
            disposition: str) -> str:
    value: str = _module("milterd.authresults").compose(authserv_id, dkim, spf, verdict, disposition)
    return value


def claims_authserv_id(value: str, authserv_id: str) -> bool:
    claimed: bool = _module("milterd.authresults").claims_authserv_id(value, authserv_id)
    return claimed
