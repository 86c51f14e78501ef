# -*- test-case-name: tests.unit.test_milterd_live -*-
"""The one place where milterd's daemon meets the DKIM, DMARC, SPF, DNS and key code.

Those modules (``milterd.dkim``, ``milterd.dmarc``, ``milterd.authresults``, ``milterd.keys``,
``mailplugins.dns``, ``mailplugins.spf``) are written to the signatures of the milterd
contract; this module adapts their calls to :class:`milterd.checks.Checks`, so a change on
their side is a change here only. The ones not merged yet are imported when first used.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mailplugins import dns as core_dns
from mailplugins import spf as core_spf
from milterd.checks import DkimLike, DmarcLike, DmarcVerdict, Headers, SpfLike, VerifierLike
from milterd.dkim import DkimResult, MessageSigner, MessageVerifier, SigningKey


def _module(name: str) -> Any:
    return importlib.import_module(name)


def txt_records(name: str, *, nameservers: Sequence[tuple[str, int]], timeout: float) -> list[bytes] | None:
    """Blocking TXT lookup (``mailplugins.dns.txt_records``)."""
    return core_dns.txt_records(name, nameservers=nameservers, timeout=timeout)


def name_exists(name: str, *, nameservers: Sequence[tuple[str, int]], timeout: float) -> bool:
    """Blocking: does ``name`` exist (DMARC's ``np=``)? A DNS failure counts as existing."""
    exists = getattr(core_dns, "name_exists", None)
    if exists is None:
        return True
    try:
        return bool(exists(name, nameservers=nameservers, timeout=timeout))
    except core_dns.DnsTempError:
        return True


def key_store(engine: Any) -> Any:
    """``milterd.keys.KeyStore``: ``signing_keys(domain) -> list[SigningKey]``, blocking."""
    return _module("milterd.keys").KeyStore(engine)


def message_signer(keys: Sequence[SigningKey], headers: Headers, now: int) -> MessageSigner:
    return MessageSigner(keys, headers, now=now)


def message_verifier(headers: Headers) -> MessageVerifier:
    return MessageVerifier(headers)


def finish_verifier(verifier: VerifierLike, answers: Mapping[str, object]) -> list[DkimLike]:
    """``MessageVerifier.finish``: each answer is records, None, or a DnsTempError (any other
    failure, e.g. our own timeout, becomes one)."""
    txt: dict[str, list[bytes] | core_dns.DnsTempError | None] = {}
    for name, answer in answers.items():
        if answer is None or isinstance(answer, list | core_dns.DnsTempError):
            txt[name] = answer
        else:
            txt[name] = core_dns.DnsTempError(str(answer))
    assert isinstance(verifier, MessageVerifier)
    results: list[DkimResult] = verifier.finish(txt)
    return list(results)


def use_nameservers(nameservers: Sequence[tuple[str, int]]) -> None:
    """pyspf asks dnspython's process-wide resolver: point it at ``milterd.nameservers``."""
    core_spf.use_nameservers(nameservers)


def spf_check(client: str, sender: str, helo: str, receiver: str, timeout: float) -> SpfLike:
    """Blocking SPF (``mailplugins.spf``) for the envelope sender, in the DNS pool."""
    return core_spf.spf_lookup(client, sender, helo, receiver, timeout)


def dmarc(from_values: Sequence[str], dkim: Sequence[DkimLike], spf: SpfLike, spf_domain: str,
          lookup: Callable[[str], list[bytes] | None], exists: Callable[[str], bool]) -> DmarcLike:
    """Blocking DMARC (``milterd.dmarc.evaluate``), in the DNS pool."""
    try:
        evaluate = _module("milterd.dmarc").evaluate
    except ImportError:  # pragma: no cover - until milterd.dmarc is merged
        return DmarcVerdict("none", "", "none", "DMARC not evaluated")
    result: DmarcLike = evaluate(list(from_values), list(dkim), spf.result, spf_domain, lookup, exists)
    return result


def compose(authserv_id: str, dkim: Sequence[DkimLike], spf: SpfLike, verdict: DmarcLike,
            disposition: str, *, mailfrom: str, helo: str) -> str:
    """``milterd.authresults.compose`` with our disposition (after milterd.dmarc's downgrade)."""
    if dataclasses.is_dataclass(verdict) and getattr(verdict, "disposition", None) != disposition:
        verdict = dataclasses.replace(verdict, disposition=disposition)
    module = _module("milterd.authresults")
    auth = module.SpfAuth(spf.result, mailfrom, helo)
    value: str = module.compose(authserv_id, list(dkim), auth, verdict)
    return value


def claims_authserv_id(value: str, authserv_id: str) -> bool:
    claimed: bool = _module("milterd.authresults").claims_authserv_id(value, authserv_id)
    return claimed
