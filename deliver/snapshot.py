# -*- test-case-name: tests.unit.test_deliver_service -*-
"""Everything one delivery reads from the configuration, built whole from one config."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from deliver.maildir import MaildirWriter
from deliver.quota import QuotaTracker
from deliver.recipients import Target
from mailplugins.config import Config, DeliverConfig
from mailplugins.ttlcache import TTLCache

#: Entries in the recipient cache at most (the oldest stored go first).
CACHE_LIMIT = 10_000


@dataclass(frozen=True)
class Snapshot:
    """Everything one delivery reads from the configuration, built whole by a reload.

    A delivery (or a recipient check) takes the service's current snapshot once, on the
    reactor, and passes it down to its disk work: a reload in between swaps the service's
    reference and never changes what that delivery sees.
    """

    config: Config
    settings: DeliverConfig
    writer: MaildirWriter
    quota: QuotaTracker
    authserv_id: str
    cache: TTLCache[str, tuple[Target, ...]]


def build_snapshot(config: Config, clock: Callable[[], float], journal_lock: threading.Lock) -> Snapshot:
    """A new snapshot for ``config``; ``journal_lock`` is the one lock every snapshot's writer
    shares (the writers of two snapshots must not append to a journal at once)."""
    settings = config.deliver
    assert settings is not None
    owner = (config.mail.uid, config.mail.gid)
    writer = MaildirWriter(
        hostname=settings.hostname,
        uid=config.mail.uid,
        gid=config.mail.gid,
        default_folders=settings.default_folders,
        clock=clock,
        stale_tmp_age=settings.stale_tmp_age,
        stale_tmp_interval=settings.stale_tmp_interval,
        journal_lock=journal_lock,
    )
    milterd = getattr(config, "milterd", None)
    authserv_id = settings.authserv_id or (
        milterd.authserv_id if milterd is not None else socket.getfqdn()
    )
    return Snapshot(
        config=config,
        settings=settings,
        writer=writer,
        quota=QuotaTracker(owner if os.geteuid() == 0 else None),
        authserv_id=authserv_id,
        cache=TTLCache(CACHE_LIMIT),
    )
