# -*- test-case-name: tests.unit.test_deliver_service -*-
"""The delivery logic behind the LMTP protocol: recipient checks, spools, deliveries, replies.

The protocol only parses and sequences; everything it asks goes through
:class:`DeliveryService`, which returns Deferreds firing with :class:`Reply` objects. Database
calls go to the database pool, disk work (:mod:`deliver.spool`, :mod:`deliver.store_one`) to
the disk pool; nothing here blocks the reactor. The layers: :mod:`deliver.envelope` (one
transaction's data and headers), :mod:`deliver.snapshot` (the settings one delivery uses),
:mod:`deliver.metrics`.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from deliver.envelope import Envelope, Recipient
from deliver.lmtp_codec import Reply
from deliver.maildir import Body, MaildirWriter, TmpFile
from deliver.metrics import DeliverMetrics
from deliver.quota import QuotaTracker
from deliver.recipients import Rejection, Target, resolve_recipient
from deliver.snapshot import Snapshot, build_snapshot
from deliver.spool import Spool
from deliver.store_one import directory_for, header_for, quota_reply, reply_for_error, store
from mailplugins.config import Config, DeliverConfig
from mailplugins.database import Database
from mailplugins.threads import WorkerPool

__all__ = ["DeliveryService", "mail_root"]

log = Logger(namespace="deliver")


class DeliveryService:
    """Recipient checks and deliveries for every connection of one deliver daemon."""

    def __init__(
        self,
        reactor: Any,
        config: Config,
        db: Database,
        disk: WorkerPool,
        metrics: DeliverMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reactor = reactor
        self.db = db
        self.disk = disk
        self.metrics = metrics
        self._clock = clock
        self.in_flight: set[Deferred[Any]] = set()
        #: One lock for the redelivery journals across reloads: the writers of two
        #: snapshots (one finishing a delivery, one starting) must not append at once.
        self._journal_lock = threading.Lock()
        self.current: Snapshot = self._snapshot(config)

    def reload(self, config: Config) -> None:
        """Build the new snapshot whole, then swap the one reference: a delivery in flight
        keeps the snapshot it started with (settings, writer and quota never mix)."""
        self.current = self._snapshot(config)

    def _snapshot(self, config: Config) -> Snapshot:
        return build_snapshot(config, self._clock, self._journal_lock)

    # Read-only views of the current snapshot (for callers outside one delivery).
    @property
    def config(self) -> Config:
        return self.current.config

    @property
    def settings(self) -> DeliverConfig:
        return self.current.settings

    @property
    def writer(self) -> MaildirWriter:
        return self.current.writer

    @property
    def quota(self) -> QuotaTracker:
        return self.current.quota

    @property
    def authserv_id(self) -> str:
        return self.current.authserv_id

    @property
    def spool_directory(self) -> str:
        snap = self.current
        if snap.settings.spool_directory:
            return snap.settings.spool_directory
        return os.path.join(mail_root(snap.config.mail.location), ".mailplugins-spool")

    def new_spool(self, envelope: Envelope | None = None) -> Spool:
        """A spool for one DATA; a large message spools straight into the Maildir tmp/ of
        the envelope's first destination, which then costs no copy (see MaildirWriter.write)."""
        snap = self.current
        destination = None
        if envelope is not None:
            envelope.snapshot = snap
            if envelope.recipients:
                destination = functools.partial(self._open_destination, snap, envelope)
        return Spool(self.spool_directory, snap.settings.memory_spool_limit, self.disk, destination)

    def _open_destination(self, snap: Snapshot, envelope: Envelope) -> tuple[TmpFile, IO[bytes]]:
        recipient = envelope.recipients[0]
        header = header_for(snap, envelope, recipient)
        return snap.writer.open_tmp(directory_for(snap, recipient.targets[0]), header)

    def _track(self, d: Deferred[Any]) -> None:
        self.in_flight.add(d)

        def forget(result: object) -> object:
            self.in_flight.discard(d)
            return result

        d.addBoth(forget)

    # -- RCPT ---------------------------------------------------------------------------

    def check_recipient(
        self, path: str, original: str | None, declared_size: int | None
    ) -> Deferred[Recipient | Reply]:
        snap = self.current
        started = time.monotonic()
        now = self.reactor.seconds()
        cached = snap.cache.get(path, now)
        d: Deferred[Any]
        if cached is not None:
            d = succeed(cached)
        else:
            d = self.db.run(
                resolve_recipient,
                self.db.store,
                path,
                location=snap.config.mail.location,
                delimiters=snap.config.mail.recipient_delimiter,
                disabled_action=snap.settings.disabled,
                postmaster=snap.settings.postmaster,
            )
            d.addTimeout(self.db.timeout, self.reactor)
            d.addCallback(self._remember, snap, path)

        def resolved(result: tuple[Target, ...] | Rejection) -> Any:
            self.metrics.duration["resolve"].observe(time.monotonic() - started)
            if isinstance(result, Rejection):
                self.metrics.recipients[result.result].inc()
                return result.reply
            recipient = Recipient(path, original, result)
            limited = [t for t in result if t.quota_bytes > 0]
            if declared_size is None or not limited:
                self.metrics.recipients["accepted"].inc()
                return recipient
            return self.disk.run(self._rcpt_quota, snap, recipient, limited, declared_size)

        def failed(failure: Failure) -> Reply:
            if failure.check(TimeoutError):
                log.warn("recipient lookup timed out after {timeout}s", timeout=self.db.timeout)
            else:
                log.failure("recipient lookup failed", failure)
            self.metrics.recipients["temp_error"].inc()
            return Reply(451, "4.3.0", f"<{path}> Temporary lookup failure, try again later")

        d.addCallback(resolved)
        d.addErrback(failed)
        return d

    def _remember(self, result: tuple[Target, ...] | Rejection, snap: Snapshot, path: str) -> Any:
        """Cache found mailboxes briefly: a busy MX sees the same recipients again and again.

        Rejections are not cached, so a mailbox added a moment ago gets mail at once.
        """
        ttl = snap.settings.lookup_cache_ttl
        if ttl > 0 and not isinstance(result, Rejection):
            snap.cache.put(path, result, expires=self.reactor.seconds() + ttl)
        return result

    def _rcpt_quota(
        self, snap: Snapshot, recipient: Recipient, limited: Sequence[Target], size: int
    ) -> Recipient | Reply:
        """Blocking: refuse at RCPT when the declared SIZE is already over the room left."""
        for target in limited:
            try:
                check = snap.quota.check(target.maildir, target.quota_bytes, size)
            except OSError:
                continue  # decide after DATA
            if not check.fits(size):
                self.metrics.quota_rejections["rcpt"].inc()
                self.metrics.recipients["over_quota"].inc()
                return quota_reply(snap, recipient.path)
        self.metrics.recipients["accepted"].inc()
        return recipient


    def deliver(self, envelope: Envelope, body: Body) -> Deferred[list[Reply]]:
        """Write the message for every accepted recipient; one reply each, in RCPT order.

        The snapshot is the one taken when DATA started (or the current one, for a body that
        did not come through new_spool), once: the disk work uses only it."""
        snap = envelope.snapshot or self.current
        self.metrics.message_size.observe(body.size)
        started = time.monotonic()
        d = self.disk.run(self._deliver_then_close, snap, envelope, body)

        def done(replies: list[Reply]) -> list[Reply]:
            self.metrics.duration["write"].observe(time.monotonic() - started)
            return replies

        def failed(failure: Failure) -> list[Reply]:
            log.failure("delivery failed", failure)
            self.metrics.recipients["io_error"].inc(len(envelope.recipients))
            error: BaseException = failure.value or Exception()
            return [reply_for_error(error, r.path)[0] for r in envelope.recipients]

        d.addCallbacks(done, failed)

        def close(result: object) -> object:
            body.close()  # a no-op unless the disk pool never ran the delivery
            return result

        d.addBoth(close)
        self._track(d)
        return d

    def _deliver_then_close(self, snap: Snapshot, envelope: Envelope, body: Body) -> list[Reply]:
        """Closing a spool file frees its pages: disk work, so it stays off the reactor."""
        try:
            return store(snap, self.metrics, envelope, body)
        finally:
            body.close()

    def too_big(self, envelope: Envelope) -> list[Reply]:
        self.metrics.recipients["too_big"].inc(len(envelope.recipients))
        return [Reply(552, "5.3.4", f"<{r.path}> Message too big") for r in envelope.recipients]

    def spool_failed(self, envelope: Envelope, error: BaseException) -> list[Reply]:
        log.error("cannot spool message: {error}", error=str(error))
        results = [reply_for_error(error, r.path) for r in envelope.recipients]
        for _reply, result in results:
            self.metrics.recipients[result].inc()
        return [reply for reply, _ in results]


def mail_root(location: str) -> str:
    """The directory above the first ``%`` component of a location template."""
    path = location.removeprefix("maildir:")
    head = path.split("%", 1)[0]
    return head if head.endswith("/") and len(head) > 1 else os.path.dirname(head) or "/"
