# -*- test-case-name: tests.unit.test_deliver_service -*-
"""DATA while it streams: memory first, then a Maildir tmp file (or a spool file) on disk."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from deliver.files import DeliveryError, unlink_quietly, write_all
from deliver.maildir import Body, TmpFile
from mailplugins.threads import WorkerPool


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

