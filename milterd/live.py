# -*- test-case-name: tests.unit.test_milterd_live -*-
"""The real :class:`~milterd.checks.Checks`: database, DNS, SPF and crypto, each in its pool.

- Keys: ``milterd.keys.KeyStore.signing_keys`` (the core's rotation rule) in the database pool.
- The login/``From:`` rule: :func:`mailplugins.senders.login_owns` over the store (database
  pool); the answer per (login, address) is reused for ``milterd.cache_ttl`` seconds.
- Signing: ``MessageSigner.finish`` (the RSA/Ed25519 signature) on the reactor when it is
  quick (Ed25519, RSA up to 2048 bits: about 0.3 ms, like one 64 KiB body step), in the CPU
  pool for bigger RSA keys or with ``milterd.sign_in_pool``; the body hashing happens as chunks
  arrive, a 64 KiB SHA-256 step at a time.
- DNS: :class:`~milterd.resolver.TxtResolver` over :func:`mailplugins.dns.txt_records` in a
  DNS pool, with ``milterd.dns_timeout``; a timeout or failure is a temperror.
- SPF: :func:`mailplugins.spf.spf_lookup` in the DNS pool, its DNS answers cached for their
  TTL (``dns_cache_size`` of them), its results for ``dns_cache_ttl`` per client, sender and
  HELO name.
- DMARC: ``milterd.dmarc.evaluate``, its lookups through a thread-safe cache
  (:class:`~milterd.resolver.CachedLookup`) with the same size and TTL: on the reactor when
  every record it needs is cached (the usual case: a few pure-Python steps, where a trip
  through the DNS pool cost more than the evaluation), else in the DNS pool.
- Authentication-Results: ``milterd.authresults``.

This is the one place where the daemon meets the DKIM, DMARC, SPF, DNS and key code, which are
pure logic or blocking calls; the small adapters to :mod:`milterd.checks`' structural types
(``_finish_verifier``, ``evaluate_dmarc``, ``_compose``) live at the end of this module.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from mailplugins import dns as core_dns
from mailplugins import spf as core_spf
from mailplugins.addresses import Address
from mailplugins.config.milterd import MilterdConfig
from mailplugins.records import MailboxRecord, Resolution
from mailplugins.senders import login_owns
from mailplugins.store import Store
from mailplugins.threads import RunInPool
from mailplugins.ttlcache import TTLCache
from milterd import authresults
from milterd import dmarc as dmarc_module
from milterd.checks import DkimLike, DmarcLike, Headers, SignerLike, SpfLike, VerifierLike
from milterd.dkim import DkimResult, MessageSigner, MessageVerifier
from milterd.keys import KeyStore
from milterd.resolver import CachedLookup, NotCached, Result, TxtResolver


def _not_cached(name: str) -> bool:
    """``exists`` for DMARC on the reactor: never known there (``np=`` goes to the pool)."""
    raise NotCached(name)


def name_exists(name: str, *, nameservers: Sequence[tuple[str, int]], timeout: float) -> bool:
    """Blocking: does ``name`` exist (DMARC's ``np=``)? A DNS failure counts as existing, so
    the stricter ``np=`` is never applied on a guess."""
    try:
        return core_dns.name_exists(name, nameservers=nameservers, timeout=timeout)
    except core_dns.DnsTempError:
        return True


def spf_check(client: str, sender: str, helo: str, receiver: str, timeout: float) -> SpfLike:
    """Blocking SPF (``mailplugins.spf``) for the envelope sender, in the DNS pool."""
    return core_spf.spf_lookup(client, sender, helo, receiver, timeout)


def evaluate_dmarc(from_values: Sequence[str], dkim: Sequence[DkimLike], spf: SpfLike,
                   spf_domain: str, lookup: Callable[[str], list[bytes] | None],
                   exists: Callable[[str], bool]) -> DmarcLike:
    """``milterd.dmarc.evaluate`` (blocking when ``lookup``/``exists`` ask DNS)."""
    results = cast(list[DkimResult], list(dkim))
    return dmarc_module.evaluate(list(from_values), results, spf.result, spf_domain, lookup, exists)


class StoreSenderLookups:
    """:class:`mailplugins.senders.SenderLookups` over the store, each call in the pool."""

    def __init__(self, store: Store, run: RunInPool, delimiters: str) -> None:
        self._store = store
        self._run = run
        self.delimiters = delimiters

    def mailbox(self, address: Address) -> Deferred[MailboxRecord | None]:
        return self._run(self._store.get_mailbox, address)

    def granted_senders(self, mailbox_id: int) -> Deferred[frozenset[str]]:
        return self._run(self._store.granted_senders, mailbox_id)

    def resolve(self, address: Address) -> Deferred[Resolution | None]:
        return self._run(self._store.resolve, address, self.delimiters)


class LiveChecks:
    def __init__(
        self,
        config: MilterdConfig,
        *,
        store: Store,
        db_run: RunInPool,
        cpu_run: RunInPool,
        dns_run: RunInPool,
        clock: Any,
        delimiters: str,
        key_store: Any = None,
        txt_lookup: Callable[[str], list[bytes] | None] | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._store = store
        self._db_run = db_run
        self._cpu_run = cpu_run
        self._dns_run = dns_run
        self._clock = clock
        self._now = now
        self._senders = StoreSenderLookups(store, db_run, delimiters)
        self._owned: TTLCache[tuple[str, str], bool] = TTLCache(10_000, config.cache_ttl, clock.seconds)
        #: domain -> (expiry, its signing keys): a database query per message was most of the
        #: time spent signing (the key choice and PEM rows, ~2 ms against ~0.7 ms for RSA).
        self._signing: TTLCache[str, list[Any]] = TTLCache(10_000, config.key_cache_ttl, clock.seconds)
        self._keys = key_store if key_store is not None else KeyStore(store.engine)
        self._txt_lookup = txt_lookup
        self._build_dns(config)

    def _build_dns(self, config: MilterdConfig) -> None:
        lookup = self._txt_lookup or partial(core_dns.txt_records, nameservers=config.nameservers,
                                             timeout=config.dns_timeout)
        self._exists = partial(name_exists, nameservers=config.nameservers,
                               timeout=config.dns_timeout)
        self.resolver = TxtResolver(self._dns_run, lookup, self._clock, timeout=config.dns_timeout,
                                    ttl=config.dns_cache_ttl, size=config.dns_cache_size)
        self.dmarc_lookup = CachedLookup(lookup, ttl=config.dns_cache_ttl, size=config.dns_cache_size)
        self._spf: TTLCache[tuple[str, str, str], SpfLike] = TTLCache(
            config.dns_cache_size, config.dns_cache_ttl, self._clock.seconds)
        if self._txt_lookup is None:  # pyspf asks dnspython's process-wide resolver
            core_spf.use_nameservers(config.nameservers, cache_size=config.dns_cache_size)

    @property
    def authserv_id(self) -> str:
        return self.config.authserv_id

    def renewed(self, config: MilterdConfig, delimiters: str) -> LiveChecks:
        """A new instance for a reloaded config (empty caches, the same pools, key store and
        clock): a reload swaps it in whole, and connections open before it keep this one."""
        return LiveChecks(
            config, store=self._store, db_run=self._db_run, cpu_run=self._cpu_run,
            dns_run=self._dns_run, clock=self._clock, delimiters=delimiters, key_store=self._keys,
            txt_lookup=self._txt_lookup, now=self._now,
        )

    # -- outgoing --------------------------------------------------------------------------

    def may_send_as(self, login: str, address: str) -> Deferred[bool]:
        key = (login.lower(), address.lower())
        entry = self._owned.entry(key)
        if entry is not None:
            return succeed(entry[1])
        decided: Deferred[bool] = Deferred.fromCoroutine(login_owns(self._senders, login, address))

        def remember(owned: bool) -> bool:
            self._owned.put(key, owned)
            return owned

        return decided.addCallback(remember)

    def signer(self, domain: str, headers: Headers) -> Deferred[SignerLike | None]:
        now = int(self._now())

        def build(keys: Sequence[Any]) -> SignerLike | None:
            if not keys:
                return None
            return MessageSigner(keys, headers, now=now)

        keys = self._signing.get(domain)
        if keys is not None:
            return succeed(build(keys))

        def remember(keys: list[Any]) -> list[Any]:
            self._signing.put(domain, keys)
            return keys

        return self._db_run(self._keys.signing_keys, domain).addCallback(remember).addCallback(build)

    def sign(self, signer: SignerLike) -> Deferred[list[str]]:
        """The signatures, on the reactor when they are quick (``sign_in_pool: false``, the
        default: Ed25519 and RSA up to 2048 bits, about 0.3 ms of CPU, less than the trip
        through the CPU pool and back cost in ``bench/milterd``), else in the CPU pool."""
        if self.config.sign_in_pool or not signer.quick:
            return self._cpu_run(signer.finish)
        return maybeDeferred(signer.finish)

    # -- incoming --------------------------------------------------------------------------

    def verifier(self, headers: Headers) -> VerifierLike:
        return MessageVerifier(headers, now=int(self._now()))  # now: x= (expiry) is checked

    def verify(self, verifier: VerifierLike) -> Deferred[list[DkimLike]]:
        names = verifier.key_names()
        if not names:
            return succeed(_finish_verifier(verifier, {}))

        def finish(answers: dict[str, Result]) -> list[DkimLike]:
            return _finish_verifier(verifier, answers)

        # finish() checks the signatures (RSA/Ed25519 verify: fast, on the reactor).
        return self.resolver.many(names).addCallback(finish)

    def spf(self, client_address: str, helo: str, sender: str) -> Deferred[SpfLike]:
        """SPF in the DNS pool; a result (not a temperror) is reused for ``dns_cache_ttl`` for
        the same client, sender and HELO name: pyspf keeps no cache of its own and asks DNS
        several times per check."""
        config = self.config
        key = (client_address, sender.lower(), helo.lower())
        cached = self._spf.get(key)
        if cached is not None:
            return succeed(cached)

        def remember(result: SpfLike) -> SpfLike:
            if result.result != "temperror":
                self._spf.put(key, result)
            return result

        return self._dns_run(spf_check, client_address, sender, helo, config.authserv_id,
                             config.dns_timeout).addCallback(remember)

    def dmarc(self, from_values: Sequence[str], dkim: Sequence[DkimLike], spf: SpfLike,
              spf_domain: str) -> Deferred[DmarcLike]:
        try:
            return succeed(evaluate_dmarc(from_values, dkim, spf, spf_domain,
                                          self.dmarc_lookup.cached, _not_cached))
        except NotCached:
            pass
        return self._dns_run(evaluate_dmarc, from_values, dkim, spf, spf_domain, self.dmarc_lookup,
                             self._exists)

    def authentication_results(self, dkim: Sequence[DkimLike], spf: SpfLike, dmarc: DmarcLike,
                               disposition: str, *, mailfrom: str, helo: str) -> str:
        return _compose(self.config.authserv_id, dkim, spf, dmarc, disposition,
                        mailfrom=mailfrom, helo=helo)

    def claims_our_id(self, value: str) -> bool:
        return authresults.claims_authserv_id(value, self.config.authserv_id)


def _finish_verifier(verifier: VerifierLike, answers: Mapping[str, object]) -> list[DkimLike]:
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


def _compose(authserv_id: str, dkim: Sequence[DkimLike], spf: SpfLike, verdict: DmarcLike,
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
