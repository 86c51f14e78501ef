# -*- test-case-name: tests.unit.test_deliver_service -*-
"""The delivery logic behind the LMTP protocol: recipients, spooling, Maildir writes, replies.

The protocol only parses and sequences; everything it asks goes through
:class:`DeliveryService`, which returns Deferreds firing with :class:`Reply` objects. Database
calls go to the database pool, disk work to the disk pool; nothing here blocks the reactor.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import hashlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from deliver.junk import HEAD_LIMIT, quarantined
from deliver.lmtp_codec import Reply
from deliver.maildir import (
    FULL_ERRNOS,
    Body,
    DeliveryError,
    MaildirWriter,
    TmpFile,
    folder_for_detail,
    unlink_quietly,
    write_all,
)
from deliver.quota import QuotaTracker
from deliver.recipients import Rejection, Target, resolve_recipient
from mailplugins.config import Config, DeliverConfig
from mailplugins.database import Database
from mailplugins.metrics import DaemonMetrics
from mailplugins.threads import WorkerPool
from mailplugins.ttlcache import TTLCache

log = Logger(namespace="deliver")

#: Entries in the recipient cache at most (the oldest stored go first).
CACHE_LIMIT = 10_000
SIZE_BUCKETS = (1024.0, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120,
)


class DeliverMetrics:
    """deliver's own metrics (names get the ``mailplugins_deliver_`` prefix)."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.recipients = metrics.counter(
            "recipients_total",
            "Recipients by outcome (at RCPT: accepted, unknown, ...; after DATA: delivered, ...).",
            ["result"],
        )
        self.message_size = metrics.histogram(
            "message_size_bytes", "Size of messages received (LF line ends).", buckets=SIZE_BUCKETS
        )
        self.duration = metrics.histogram(
            "delivery_duration_seconds", "Time spent per stage (resolve, data, write).", ["stage"],
            buckets=DURATION_BUCKETS,
        )
        self.bytes_written = metrics.counter(
            "bytes_written_total", "Bytes written to Maildir files (hard links not counted)."
        )
        self.quota_rejections = metrics.counter(
            "quota_rejections_total", "Recipients refused for quota, by stage (rcpt, data).",
            ["stage"],
        )
        self.junk = metrics.counter(
            "junk_total", "Messages filed into Junk for milterd's DMARC quarantine verdict."
        )


@dataclass(frozen=True)
class Recipient:
    """An accepted RCPT."""

    path: str
    #: Original recipient from ORCPT (decoded), when the client sent one.
    original: str | None
    targets: tuple[Target, ...]


def transaction_id() -> str:
    """22 characters of base64 (128 random bits), the length of Dovecot's LMTP IDs."""
    return base64.b64encode(os.urandom(16)).decode("ascii").rstrip("=")


@dataclass
class Envelope:
    helo: str
    sender: str
    declared_size: int | None = None
    recipients: list[Recipient] = field(default_factory=list)
    #: Postfix's queue ID from XFORWARD IDENT, when Postfix sends it.
    ident: str | None = None
    #: MAIL said SMTPUTF8 (RFC 6531): UTF-8 addresses are allowed in this transaction.
    smtputf8: bool = False
    #: The LMTP client's IP address (None on a UNIX socket), for the Received: line.
    client_ip: str | None = None
    #: When MAIL was accepted (seconds since the epoch): the Received: line's date, fixed
    #: for the whole transaction so every recipient's header is the same bytes.
    timestamp: float = 0.0
    #: The transaction's ID, in the Received: line and the 250 replies (as Dovecot does).
    id: str = field(default_factory=transaction_id)
    #: The service's snapshot taken when DATA started (new_spool): the spool's Maildir tmp
    #: file and the delivery then use the same settings, writer and quota.
    snapshot: Snapshot | None = None


def _clean_header_value(text: str) -> str:
    return "".join(c for c in text if ord(c) >= 32 and ord(c) != 127)


def received_line(envelope: Envelope, hostname: str, recipient: str | None) -> str:
    """Dovecot's LMTP trace record (``smtp_server_transaction_write_trace_record``): from the
    LHLO name and client IP, by us with LMTP, the transaction ID, the envelope sender, the
    recipient only when the transaction has one, the time of MAIL."""
    text = "Received: from " + _clean_header_value(envelope.helo)
    if envelope.client_ip:
        text += f" ([{envelope.client_ip}])"
    text += f"\n\tby {hostname} with LMTP\n\tid {envelope.id}"
    text += f"\n\t(envelope-from <{_clean_header_value(envelope.sender)}>)"
    if recipient is not None:
        text += f"\n\tfor <{_clean_header_value(recipient)}>"
    return text + "; " + email.utils.formatdate(envelope.timestamp, localtime=True) + "\n"


def build_header(sender: str, recipient: Recipient, delivered_to: bool, received: str = "") -> bytes:
    """Trace headers prepended to the message (LF line ends, like the rest of the file)."""
    lines = [f"Return-Path: <{_clean_header_value(sender)}>\n"]
    if delivered_to:
        lines.append(f"Delivered-To: {_clean_header_value(recipient.path)}\n")
    if recipient.original:
        lines.append(f"X-Original-To: {_clean_header_value(recipient.original)}\n")
    lines.append(received)
    return "".join(lines).encode("utf-8")


def _reply_for_error(exc: BaseException, path: str) -> tuple[Reply, str]:
    full = (isinstance(exc, OSError) and exc.errno in FULL_ERRNOS) or (
        isinstance(exc, DeliveryError) and exc.full
    )
    if full:
        return Reply(452, "4.2.2", f"<{path}> Insufficient disk space, try later"), "disk_full"
    return Reply(451, "4.3.0", f"<{path}> Local error in processing, try again later"), "io_error"


@dataclass
class _Member:
    index: int
    target: Target
    directory: str
    size: int
    key: str | None = None


def redelivery_key(envelope: Envelope, recipient: Recipient, size: int) -> str | None:
    """What identifies one message for one recipient across Postfix's retries: its queue ID
    (XFORWARD IDENT), the RCPT address and the size. None without a queue ID: a client that
    does not say which message this is never has a delivery skipped."""
    if not envelope.ident:
        return None
    text = f"{envelope.ident}\0{envelope.sender}\0{recipient.path}\0{size}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


class Spool:
    """DATA while it streams: in memory up to a limit, then in a file on the mail disk.

    That file is a Maildir ``tmp/`` file of the first destination, after its trace headers
    (``destination``), so the delivery can link it instead of copying it; a crash leaves a
    partial tmp file for the stale-tmp sweep, never anything in ``new/``. When that Maildir
    cannot be prepared, an unnamed file in ``directory`` (``O_TMPFILE``) is used instead.
    Every disk operation runs in the disk pool, one after the
    other; :meth:`add` returns a Deferred when the disk falls behind (a batch is still queued
    behind the one being written), and the protocol stops reading until it fires: backpressure
    instead of buffering, without a pause and resume for every batch.
    """

    def __init__(
        self,
        directory: str,
        memory_limit: int,
        disk: WorkerPool,
        destination: Callable[[], tuple[TmpFile, IO[bytes]]] | None = None,
    ) -> None:
        self._directory = directory
        self._memory_limit = memory_limit
        self._disk = disk
        self._destination = destination
        self._tmp: TmpFile | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._file: IO[bytes] | None = None
        self._tail: Deferred[None] = succeed(None)
        self.error: BaseException | None = None
        self._discarded = False
        self._spooled = False
        self._last_write: Deferred[None] | None = None

    def _open(self) -> IO[bytes]:
        if self._destination is not None:
            try:
                self._tmp, file = self._destination()
            except (OSError, DeliveryError):
                pass  # the delivery itself will meet (and report) this; spool aside meanwhile
            else:
                return file
        # Only the leaf: a missing mail root must not appear root-owned behind Dovecot's back.
        with contextlib.suppress(FileExistsError):
            os.mkdir(self._directory, 0o700)
        return tempfile.TemporaryFile(dir=self._directory, buffering=0)

    def _write(self, data: bytes) -> None:
        if self._file is None:
            self._file = self._open()
        write_all(self._file.fileno(), data)

    def _chain(self, fn: Callable[..., Any], *args: Any) -> Deferred[None]:
        def run(_: object) -> Deferred[None] | None:
            if self.error is not None or self._discarded:
                return None
            return self._disk.run(fn, *args)

        def failed(failure: Failure) -> None:
            self.error = failure.value

        self._tail.addCallback(run).addErrback(failed)
        done: Deferred[None] = Deferred()

        def fire(result: object) -> object:
            done.callback(None)
            return result

        self._tail.addBoth(fire)
        return done

    def add(self, data: bytes) -> Deferred[None] | None:
        if self._discarded or self.error is not None:
            return None
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered < self._memory_limit:
            return None
        pending = b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        self._spooled = True
        previous, self._last_write = self._last_write, self._chain(self._write, pending)
        if previous is None or previous.called:
            return None  # the disk keeps up: go on reading while this batch is written
        # Two batches queued: wait for the older one, so at most three memory_limit's worth of
        # a message (one filling, one queued, one being written) is ever held.
        waiting: Deferred[None] = Deferred()

        def release(result: object) -> object:
            waiting.callback(None)
            return result

        previous.addBoth(release)
        return waiting

    def discard(self) -> None:
        self._discarded = True
        self._chunks = []
        self._tail.addBoth(lambda _: self._close_later())

    def _close_later(self) -> None:
        self._disk.run(self._close).addErrback(lambda _: None)

    def _close(self) -> None:
        """Close the file, removing it if it is a Maildir tmp file (disk work: in the pool)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            unlink_quietly(self._tmp.path)
            self._tmp = None

    def finish(self, size: int, bare_newlines: int) -> Deferred[Body]:
        """The whole message as a Body; errbacks with the spool's write error, if any."""
        rest = b"".join(self._chunks)
        self._chunks = []
        if not self._spooled:
            return succeed(Body(size, bare_newlines, data=rest))
        if rest:
            self._chain(self._write, rest)
        result: Deferred[Body] = Deferred()

        def deliver(_: object) -> None:
            if self.error is not None or self._file is None:
                self._close_later()
                result.errback(self.error or DeliveryError("spool file missing"))
                return
            tmp, self._tmp = self._tmp, None
            offset = len(tmp.header) if tmp is not None else 0
            body = Body(size, bare_newlines, spool=self._file, offset=offset, tmp=tmp)
            self._file = None
            result.callback(body)

        self._tail.addCallback(deliver)
        return result


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
        settings = config.deliver
        assert settings is not None
        owner = (config.mail.uid, config.mail.gid)
        writer = MaildirWriter(
            hostname=settings.hostname,
            uid=config.mail.uid,
            gid=config.mail.gid,
            default_folders=settings.default_folders,
            clock=self._clock,
            stale_tmp_age=settings.stale_tmp_age,
            stale_tmp_interval=settings.stale_tmp_interval,
            journal_lock=self._journal_lock,
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
        header = self._header(snap, envelope, recipient)
        return snap.writer.open_tmp(self._directory(snap, recipient.targets[0]), header)

    def _header(self, snap: Snapshot, envelope: Envelope, recipient: Recipient) -> bytes:
        mode = snap.settings.delivered_to
        single = len(envelope.recipients) == 1
        delivered_to = mode == "always" or (mode == "single" and single)
        received = ""
        if snap.settings.received_header:
            received = received_line(envelope, snap.settings.hostname, recipient.path if single else None)
        return build_header(envelope.sender, recipient, delivered_to, received)

    def _directory(self, snap: Snapshot, target: Target, junk: bool = False) -> str:
        """The folder directory a target's copy goes to, creating the Maildir on first use."""
        snap.writer.ensure_maildir(target.maildir)
        if junk:
            return snap.writer.folder_dir(target.maildir, snap.settings.junk_folder, create=True)
        folder = None
        if snap.settings.detail_folders and target.detail:
            folder = folder_for_detail(target.detail)
        return snap.writer.folder_dir(target.maildir, folder, create=snap.settings.autocreate_detail_folders)

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
            self.metrics.duration.labels("resolve").observe(time.monotonic() - started)
            if isinstance(result, Rejection):
                self.metrics.recipients.labels(result.result).inc()
                return result.reply
            recipient = Recipient(path, original, result)
            limited = [t for t in result if t.quota_bytes > 0]
            if declared_size is None or not limited:
                self.metrics.recipients.labels("accepted").inc()
                return recipient
            return self.disk.run(self._rcpt_quota, snap, recipient, limited, declared_size)

        def failed(failure: Failure) -> Reply:
            if failure.check(TimeoutError):
                log.warn("recipient lookup timed out after {timeout}s", timeout=self.db.timeout)
            else:
                log.failure("recipient lookup failed", failure)
            self.metrics.recipients.labels("temp_error").inc()
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
                self.metrics.quota_rejections.labels("rcpt").inc()
                self.metrics.recipients.labels("over_quota").inc()
                return self._quota_reply(snap, recipient.path)
        self.metrics.recipients.labels("accepted").inc()
        return recipient

    def _quota_reply(self, snap: Snapshot, path: str) -> Reply:
        if snap.settings.quota_tempfail:
            return Reply(452, "4.2.2", f"<{path}> Mailbox is full, try again later")
        return Reply(552, "5.2.2", f"<{path}> Mailbox is full")

    # -- DATA ---------------------------------------------------------------------------

    def deliver(self, envelope: Envelope, body: Body) -> Deferred[list[Reply]]:
        """Write the message for every accepted recipient; one reply each, in RCPT order.

        The snapshot is the one taken when DATA started (or the current one, for a body that
        did not come through new_spool), once: the disk work uses only it."""
        snap = envelope.snapshot or self.current
        self.metrics.message_size.observe(body.size)
        started = time.monotonic()
        d = self.disk.run(self._deliver_then_close, snap, envelope, body)

        def done(replies: list[Reply]) -> list[Reply]:
            self.metrics.duration.labels("write").observe(time.monotonic() - started)
            return replies

        def failed(failure: Failure) -> list[Reply]:
            log.failure("delivery failed", failure)
            self.metrics.recipients.labels("io_error").inc(len(envelope.recipients))
            error: BaseException = failure.value or Exception()
            return [_reply_for_error(error, r.path)[0] for r in envelope.recipients]

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
            return self._deliver_blocking(snap, envelope, body)
        finally:
            body.close()

    def _is_junk(self, snap: Snapshot, body: Body) -> bool:
        """milterd's DMARC verdict says quarantine (see deliver.junk): file into Junk."""
        if not snap.settings.junk_folder:
            return False
        if body.spool is None:
            head = body.data[:HEAD_LIMIT]
        else:
            head = os.pread(body.spool.fileno(), HEAD_LIMIT, body.offset)
        return quarantined(head, snap.authserv_id)

    def _deliver_blocking(self, snap: Snapshot, envelope: Envelope, body: Body) -> list[Reply]:
        junk = self._is_junk(snap, body)
        if junk:
            self.metrics.junk.inc()
        # Per recipient, per target: None (fine so far) or a (reply, metric result) failure.
        failures: list[list[tuple[Reply, str] | None]] = []
        groups: dict[bytes, list[_Member]] = {}
        for index, recipient in enumerate(envelope.recipients):
            header = self._header(snap, envelope, recipient)
            size = len(header) + body.size
            outcome: list[tuple[Reply, str] | None] = []
            failures.append(outcome)
            key = redelivery_key(envelope, recipient, body.size)
            for target in recipient.targets:
                try:
                    directory = self._directory(snap, target, junk)
                    if key is not None and snap.writer.delivered_before(target.maildir, key):
                        log.info("{path}: queue ID {ident} already saved in {maildir}: a redelivery "
                                 "after a lost reply, not saved again", path=recipient.path,
                                 ident=envelope.ident, maildir=target.maildir)
                        self.metrics.recipients.labels("redelivery").inc()
                        outcome.append(None)
                        continue
                    if target.quota_bytes > 0:
                        check = snap.quota.check(target.maildir, target.quota_bytes, size)
                        if not check.fits(size):
                            self.metrics.quota_rejections.labels("data").inc()
                            outcome.append((self._quota_reply(snap, recipient.path), "over_quota"))
                            continue
                except OSError as exc:
                    log.error("cannot prepare Maildir {maildir}: {error}", maildir=target.maildir,
                              error=exc.strerror or str(exc))
                    outcome.append(_reply_for_error(exc, recipient.path))
                    continue
                outcome.append(None)
                groups.setdefault(header, []).append(_Member(index, target, directory, size, key))
        for header, members in groups.items():
            directories = list(dict.fromkeys(m.directory for m in members))
            try:
                written, errors = snap.writer.write(header, body, directories,
                                                    functools.partial(self._journal, snap, members))
            except (OSError, DeliveryError) as exc:
                log.error("cannot write message: {error}", error=str(exc))
                errors = dict.fromkeys(directories, exc)
                written = None
            if written is not None:
                self.metrics.bytes_written.inc(written.size)
            recorded: set[str] = set()
            for member in members:
                error = errors.get(member.directory)
                recipient = envelope.recipients[member.index]
                position = recipient.targets.index(member.target)
                if error is not None:
                    failures[member.index][position] = _reply_for_error(error, recipient.path)
                    continue
                if written is None:
                    continue
                target = member.target
                if member.directory not in recorded:
                    recorded.add(member.directory)
                    try:
                        snap.quota.record(target.maildir, target.quota_bytes, written.size)
                    except OSError as exc:
                        log.warn("cannot update maildirsize: {error}", error=str(exc))
        replies = []
        for recipient, outcome in zip(envelope.recipients, failures, strict=True):
            bad = [item for item in outcome if item is not None]
            temporary = [item for item in bad if item[0].is_temporary]
            # An alias to several mailboxes: a temporary failure anywhere makes Postfix retry
            # (a duplicate beats a loss); permanent failures of some targets do not bounce the
            # copies already saved for the others.
            if not temporary and len(bad) < len(outcome):
                if bad:
                    log.warn("{path}: saved for {ok} of {total} mailboxes: {reason}",
                             path=recipient.path, ok=len(outcome) - len(bad), total=len(outcome),
                             reason=bad[0][0].text)
                self.metrics.recipients.labels("delivered").inc()
                replies.append(Reply(250, "2.0.0", f"<{recipient.path}> {envelope.id} Saved"))
                continue
            reply, result = (temporary or bad)[0]
            self.metrics.recipients.labels(result).inc()
            replies.append(reply)
        return replies

    def _journal(self, snap: Snapshot, members: Sequence[_Member], directory: str, name: str) -> None:
        """Record ``name`` for every member delivering into ``directory`` with a redelivery
        key, before the link makes it visible (MaildirWriter.write calls this): a kill at any
        point leaves a retry either nothing in ``new/`` or the file its line names."""
        for member in members:
            if member.key is None or member.directory != directory:
                continue
            try:
                snap.writer.record_delivery(member.target.maildir, member.key, directory, name)
            except OSError as exc:
                log.warn("cannot record delivery in {maildir}: {error}",
                         maildir=member.target.maildir, error=str(exc))

    def too_big(self, envelope: Envelope) -> list[Reply]:
        self.metrics.recipients.labels("too_big").inc(len(envelope.recipients))
        return [Reply(552, "5.3.4", f"<{r.path}> Message too big") for r in envelope.recipients]

    def spool_failed(self, envelope: Envelope, error: BaseException) -> list[Reply]:
        log.error("cannot spool message: {error}", error=str(error))
        results = [_reply_for_error(error, r.path) for r in envelope.recipients]
        for _reply, result in results:
            self.metrics.recipients.labels(result).inc()
        return [reply for reply, _ in results]


def mail_root(location: str) -> str:
    """The directory above the first ``%`` component of a location template."""
    path = location.removeprefix("maildir:")
    head = path.split("%", 1)[0]
    return head if head.endswith("/") and len(head) > 1 else os.path.dirname(head) or "/"
