"""DKIM (RFC 6376, RFC 8463, RFC 8301) for milterd: signing and verification, no I/O.

The milter calls these from its protocol: a :class:`MessageSigner` or :class:`MessageVerifier`
per message, fed the body chunks as they arrive; DNS is the caller's (``key_names()`` to look
up through :mod:`mailplugins.dns` in a pool, the answers given to ``finish``).
"""

from milterd.dkim.sign import MessageSigner, SigningKey
from milterd.dkim.verify import DkimResult, MessageVerifier

__all__ = ["DkimResult", "MessageSigner", "MessageVerifier", "SigningKey"]
