# -*- test-case-name: tests.unit.test_deliver_service -*-
"""Storing one message for its recipients: the blocking part of a delivery (disk pool only).

Given the snapshot a delivery took and the spooled body, decide each target's folder, skip a
redelivery the journal knows, check quota, write one file per distinct header with
:class:`~deliver.maildir.MaildirWriter` (hard links for the other folders) and turn the
outcome into one LMTP reply per recipient. Nothing here touches the reactor.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.logger import Logger

from deliver.envelope import Envelope, Recipient, build_header, received_line, redelivery_key
from deliver.files import DeliveryError
from deliver.junk import HEAD_LIMIT, quarantined
from deliver.lmtp_codec import Reply
from deliver.maildir import FULL_ERRNOS, Body
from deliver.maildir_names import folder_for_detail
from deliver.metrics import DeliverMetrics
from deliver.recipients import Target
from deliver.snapshot import Snapshot

log = Logger(namespace="deliver")

def reply_for_error(exc: BaseException, path: str) -> tuple[Reply, str]:
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

def header_for(snap: Snapshot, envelope: Envelope, recipient: Recipient) -> bytes:
    mode = snap.settings.delivered_to
    single = len(envelope.recipients) == 1
    delivered_to = mode == "always" or (mode == "single" and single)
    received = ""
    if snap.settings.received_header:
        received = received_line(envelope, snap.settings.hostname, recipient.path if single else None)
    return build_header(envelope.sender, recipient, delivered_to, received)

def directory_for(snap: Snapshot, target: Target, junk: bool = False) -> str:
    """The folder directory a target's copy goes to, creating the Maildir on first use."""
    snap.writer.ensure_maildir(target.maildir)
    if junk:
        return snap.writer.folder_dir(target.maildir, snap.settings.junk_folder, create=True)
    folder = None
    if snap.settings.detail_folders and target.detail:
        folder = folder_for_detail(target.detail)
    return snap.writer.folder_dir(target.maildir, folder, create=snap.settings.autocreate_detail_folders)

def quota_reply(snap: Snapshot, path: str) -> Reply:
    if snap.settings.quota_tempfail:
        return Reply(452, "4.2.2", f"<{path}> Mailbox is full, try again later")
    return Reply(552, "5.2.2", f"<{path}> Mailbox is full")

def is_junk(snap: Snapshot, body: Body) -> bool:
    """milterd's DMARC verdict says quarantine (see deliver.junk): file into Junk."""
    if not snap.settings.junk_folder:
        return False
    if body.spool is None:
        head = body.data[:HEAD_LIMIT]
    else:
        head = os.pread(body.spool.fileno(), HEAD_LIMIT, body.offset)
    return quarantined(head, snap.authserv_id)

def store(snap: Snapshot, metrics: DeliverMetrics, envelope: Envelope, body: Body) -> list[Reply]:
    """Blocking (disk pool): write the message for every accepted recipient durably, one
    reply each in RCPT order; every copy is in ``new/`` and fsynced before a 250."""
    junk = is_junk(snap, body)
    if junk:
        metrics.junk.inc()
    # Per recipient, per target: None (fine so far) or a (reply, metric result) failure.
    failures: list[list[tuple[Reply, str] | None]] = []
    groups: dict[bytes, list[_Member]] = {}
    for index, recipient in enumerate(envelope.recipients):
        header = header_for(snap, envelope, recipient)
        size = len(header) + body.size
        outcome: list[tuple[Reply, str] | None] = []
        failures.append(outcome)
        key = redelivery_key(envelope, recipient, body.size)
        for target in recipient.targets:
            try:
                directory = directory_for(snap, target, junk)
                if key is not None and snap.writer.delivered_before(target.maildir, key):
                    log.info("{path}: queue ID {ident} already saved in {maildir}: a redelivery "
                             "after a lost reply, not saved again", path=recipient.path,
                             ident=envelope.ident, maildir=target.maildir)
                    metrics.recipients["redelivery"].inc()
                    outcome.append(None)
                    continue
                if target.quota_bytes > 0:
                    check = snap.quota.check(target.maildir, target.quota_bytes, size)
                    if not check.fits(size):
                        metrics.quota_rejections["data"].inc()
                        outcome.append((quota_reply(snap, recipient.path), "over_quota"))
                        continue
            except OSError as exc:
                log.error("cannot prepare Maildir {maildir}: {error}", maildir=target.maildir,
                          error=exc.strerror or str(exc))
                outcome.append(reply_for_error(exc, recipient.path))
                continue
            outcome.append(None)
            groups.setdefault(header, []).append(_Member(index, target, directory, size, key))
    for header, members in groups.items():
        directories = list(dict.fromkeys(m.directory for m in members))
        try:
            written, errors = snap.writer.write(header, body, directories,
                                                functools.partial(_journal, snap, members))
        except (OSError, DeliveryError) as exc:
            log.error("cannot write message: {error}", error=str(exc))
            errors = dict.fromkeys(directories, exc)
            written = None
        if written is not None:
            metrics.bytes_written.inc(written.size)
        recorded: set[str] = set()
        for member in members:
            error = errors.get(member.directory)
            recipient = envelope.recipients[member.index]
            position = recipient.targets.index(member.target)
            if error is not None:
                failures[member.index][position] = reply_for_error(error, recipient.path)
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
            metrics.recipients["delivered"].inc()
            replies.append(Reply(250, "2.0.0", f"<{recipient.path}> {envelope.id} Saved"))
            continue
        reply, result = (temporary or bad)[0]
        metrics.recipients[result].inc()
        replies.append(reply)
    return replies

def _journal(snap: Snapshot, members: Sequence[_Member], directory: str, name: str) -> None:
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
