# -*- test-case-name: tests.unit.test_dkim_keys -*-
"""The keys milterd signs with, read from the database (blocking: run it in the DB pool).

A thin adapter: the choice of keys (the rotation rule: per key type, the active key activated
last) is the core's :meth:`mailplugins.dkim_keys.DkimKeys.signing_keys`, shared with ``dkim list``
and ``dns-records``; this turns its rows into the signer's :class:`milterd.dkim.SigningKey`.
Nothing is cached here; the daemon reuses a domain's keys for ``milterd.key_cache_ttl``, so an
``activate`` or ``retire`` applies within that time.
"""

from __future__ import annotations

from sqlalchemy import Engine

from mailplugins.dkim_keys import DkimKeys
from milterd.dkim import SigningKey


class KeyStore:
    """Built from the engine the daemon already has (``Database.engine``)."""

    def __init__(self, engine: Engine) -> None:
        self._keys = DkimKeys(engine)

    def signing_keys(self, domain: str) -> list[SigningKey]:
        """The keys to sign ``domain``'s mail with now, RSA first; [] when it has none. Blocking."""
        return [SigningKey(domain=key.record.domain, selector=key.record.selector,
                           algorithm=key.record.algorithm, private_key_pem=key.private_key_pem)
                for key in self._keys.signing_keys(domain)]
