# -*- test-case-name: tests.unit.test_milterd_live -*-
"""The one place where milterd's daemon meets the DKIM, DMARC, SPF, DNS and key code.

``milterd.dkim``, ``milterd.dmarc``, ``milterd.authresults``, ``milterd.keys``,
``mailplugins.dns`` and ``mailplugins.spf`` are pure logic or blocking calls written to the
milterd contract; this module adapts them to :class:`milterd.checks.Checks`' structural types,
so a change on their side is a change here only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Engine

from mailplugins import dns as core_dns
from mailplugins import spf as core_spf
from milterd import authresults
from milterd import dmarc as dmarc_module
from milterd.checks import DkimLike, DmarcLike, Headers, SpfLike, VerifierLike
from milterd.dkim import DkimResult, MessageSigner, MessageVerifier, SigningKey
from milterd.keys import KeyStore


def txt_records(name: str, *, nameservers: Sequence[tuple[str, int]], timeout: float) -> list[bytes] | None:
    """Blocking TXT lookup (``mailplugins.dns.txt_records``)."""
    return core_dns.txt_records(name, nameservers=nameservers, timeout=timeout)


def name_exists(name: str, *, nameservers: Sequence[tuple[str, int]], timeout: float) -> bool:
    """Blocking: does ``name`` exist (DMARC's ``np=``)? A DNS failure counts as existing, so
    the stricter ``np=`` is never applied on a guess."""
    try:
        return core_dns.name_exists(name, nameservers=nameservers, timeout=timeout)
    except core_dns.DnsTempError:
        return True


def key_store(engine: Engine) -> KeyStore:
    """``signing_keys(domain) -> list[SigningKey]``, blocking (the database pool)."""
    return KeyStore(engine)


def message_signer(keys: Sequence[SigningKey], headers: Headers, now: int) -> MessageSigner:
    return MessageSigner(keys, headers, now=now)


def message_verifier(headers: Headers, now: int) -> MessageVerifier:
    """``now`` lets x= (signature expiry) be checked."""
    return MessageVerifier(headers, now=now)


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
    return list(verifier.finish(txt))


def use_nameservers(nameservers: Sequence[tuple[str, int]]) -> None:
    """pyspf asks dnspython's process-wide resolver: point it at ``milterd.nameservers``."""
    core_spf.use_nameservers(nameservers)


def spf_check(client: str, sender: str, helo: str, receiver: str, timeout: float) -> SpfLike:
    """Blocking SPF (``mailplugins.spf``) for the envelope sender, in the DNS pool."""
    return core_spf.spf_lookup(client, sender, helo, receiver, timeout)


def dmarc(from_values: Sequence[str], dkim: Sequence[DkimLike], spf: SpfLike, spf_domain: str,
          lookup: Callable[[str], list[bytes] | None], exists: Callable[[str], bool]) -> DmarcLike:
    """Blocking DMARC (``milterd.dmarc.evaluate``), in the DNS pool."""
    results = cast(list[DkimResult], list(dkim))
    return dmarc_module.evaluate(list(from_values), results, spf.result, spf_domain, lookup, exists)


def compose(authserv_id: str, dkim: Sequence[DkimLike], spf: SpfLike, verdict: DmarcLike,
            disposition: str, *, mailfrom: str, helo: str) -> str:
    """``milterd.authresults.compose`` with our disposition (after milterd.dmarc's downgrade)."""
    result: Any = verdict
    if isinstance(result, dmarc_module.DmarcResult) and result.disposition != disposition:
        result = dataclasses.replace(result, disposition=disposition)
    elif not isinstance(result, dmarc_module.DmarcResult):
        result = dmarc_module.DmarcResult(verdict.result, verdict.header_from, verdict.policy,
                                          getattr(verdict, "reason", ""), disposition)
    auth = authresults.SpfAuth(spf.result, mailfrom, helo)
    return authresults.compose(authserv_id, cast(list[DkimResult], list(dkim)), auth, result)


def claims_authserv_id(value: str, authserv_id: str) -> bool:
    return authresults.claims_authserv_id(value, authserv_id)
