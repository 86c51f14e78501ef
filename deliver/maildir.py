# -*- test-case-name: tests.unit.test_deliver_maildir -*-
"""Durable Maildir writes as Dovecot expects them: names, folders, ownership, fsync.

All of it blocks and runs in the disk thread pool, never on the reactor. A message is written
to ``tmp/`` (``O_EXCL``, 0600), fsynced, hard-linked into ``new/`` of every target folder under
a Dovecot-compatible name ``<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<vsize>``, the tmp name is
unlinked and every ``new/`` directory fsynced (one fsync shared by concurrent deliveries into
the same directory, :mod:`deliver.groupsync`); only then may the caller answer 250. A crash at
any moment leaves either nothing in ``new/`` or the whole message (and maybe a stale tmp file,
removed after :attr:`MaildirWriter.stale_tmp_age`).

Dovecot's own files (``dovecot-uidlist``, ``dovecot.index*``, ``dovecot-keywords``, ...) are
never opened. Names live in :mod:`deliver.maildir_names`, the file primitives under the writer
in :mod:`deliver.files`.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from deliver.files import (
    DeliveryError,
    clean_stale,
    copy_spool,
    replace_file,
    unlink_quietly,
    write_all,
    write_both,
)
from deliver.groupsync import DIRECTORY_SYNC, fsync_directory
from deliver.maildir_names import NameGenerator, folder_path, maildir_name

__all__ = [
    "FULL_ERRNOS",
    "JOURNAL",
    "JOURNAL_LIMIT",
    "Body",
    "MaildirWriter",
    "TmpFile",
    "Written",
]

SUBDIRS = ("tmp", "new", "cur")
#: Per Maildir, the recent deliveries that came with a Postfix queue ID (see
#: MaildirWriter.delivered_before); Dovecot ignores files it does not know.
JOURNAL = "mailplugins-delivered"
#: Past this size the journal keeps its newer half (thousands of deliveries: Postfix's retries
#: of one message come within its queue lifetime, far fewer deliveries apart on most mailboxes).
JOURNAL_LIMIT = 64 * 1024
#: errno values that mean "the disk or the user's disk quota is full" (-> 452 4.2.2).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Seconds a Maildir found complete (tmp/, new/, cur/) is trusted without looking again.
MAILDIR_RECHECK = 60.0
#: Past this many remembered Maildirs the memory starts afresh.
MAILDIR_MEMORY = 100_000


@dataclass
class TmpFile:
    """A message being written straight into ``directory/tmp/base``: ``header`` then the body.

    Large messages spool there instead of in a file of their own, so the first destination
    costs no copy: the file is fsynced and linked into ``new/`` as it is.
    """

    directory: str
    header: bytes
    base: str
    path: str


@dataclass
class Body:
    """A decoded message: in memory, or in a spool file, plus its counts.

    A large message's spool file may already be a Maildir tmp file (see :class:`TmpFile`).
    """

    size: int
    #: LFs not preceded by CR (each adds one octet to the CRLF size, W=).
    bare_newlines: int
    data: bytes = b""
    spool: IO[bytes] | None = None
    #: Where the body starts in ``spool`` (after the header of a Maildir tmp file).
    offset: int = 0
    #: Set while ``spool`` is a Maildir tmp file not yet linked into ``new/``.
    tmp: TmpFile | None = None

    def close(self) -> None:
        """Close the spool; a Maildir tmp file nobody linked into ``new/`` is removed."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.tmp is not None:
            unlink_quietly(self.tmp.path)
            self.tmp = None


_fsync_dir = fsync_directory


def _locked_journal(path: str) -> int:
    """The journal opened for appending under an exclusive ``flock``.

    A trim replaces the file by a rename: whoever opened the old file and then waited for the
    lock finds it no longer at ``path`` and opens the new one.
    """
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@dataclass(frozen=True)
class Written:
    """Where one message landed: ``new/`` file names by folder directory."""

    names: dict[str, str]
    size: int
    vsize: int


class MaildirWriter:
    """Creates Maildirs and folders and writes messages durably (blocking; run in a pool)."""

    def __init__(
        self,
        *,
        hostname: str,
        uid: int,
        gid: int,
        default_folders: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        stale_tmp_age: float = 36 * 3600,
        stale_tmp_interval: float = 3600,
        journal_lock: threading.Lock | None = None,
    ) -> None:
        self.names = NameGenerator(hostname, clock)
        self.uid = uid
        self.gid = gid
        self.default_folders = tuple(default_folders)
        self._clock = clock
        self.stale_tmp_age = stale_tmp_age
        self.stale_tmp_interval = stale_tmp_interval
        self._chown = os.geteuid() == 0
        self._last_clean: dict[str, float] = {}
        self._clean_lock = threading.Lock()
        # Shared by the writers a reload replaces, so two never append to a journal at once.
        self._journal_lock = journal_lock if journal_lock is not None else threading.Lock()
        #: Maildirs found complete, and when: a delivery to a known one skips three stat()
        #: calls (each one releases and retakes the GIL the reactor is using). One that was
        #: removed since is found at the first create or link (ENOENT), remade and retried.
        self._maildirs: dict[str, float] = {}

    # -- ownership and directories -------------------------------------------------------

    def _own_fd(self, fd: int) -> None:
        if self._chown:
            os.fchown(fd, self.uid, self.gid)

    def _own(self, path: str) -> None:
        if self._chown:
            os.chown(path, self.uid, self.gid)

    def _mkdir(self, path: str) -> bool:
        """Create one directory 0700 owned by the mail user; False if it existed."""
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return False
        self._own(path)
        return True

    def _makedirs(self, path: str) -> bool:
        """Create ``path`` and missing parents (each 0700, mail user); fsync what changed."""
        if os.path.isdir(path):
            return False
        parent = os.path.dirname(path)
        if parent and parent != path:
            self._makedirs(parent)
        created = self._mkdir(path)
        if created and parent:
            _fsync_dir(parent)
        return created

    def _make_folder_dirs(self, path: str, *, subfolder: bool) -> None:
        self._makedirs(path)
        for sub in SUBDIRS:
            self._mkdir(os.path.join(path, sub))
        if subfolder:
            marker = os.path.join(path, "maildirfolder")
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                self._own_fd(fd)
            finally:
                os.close(fd)
        _fsync_dir(path)

    @staticmethod
    def is_folder(path: str) -> bool:
        return all(os.path.isdir(os.path.join(path, sub)) for sub in SUBDIRS)

    def ensure_maildir(self, maildir: str) -> bool:
        """Create the Maildir and its default folders on first delivery; True if created.

        A Maildir found complete in the last :data:`MAILDIR_RECHECK` seconds is not looked at
        again (see :meth:`_remake`, which covers one removed in between).
        """
        now = self._clock()
        seen = self._maildirs.get(maildir)
        if seen is not None and 0 <= now - seen < MAILDIR_RECHECK:
            return False
        created = False
        if not self.is_folder(maildir):
            self._make_folder_dirs(maildir, subfolder=False)
            for folder in self.default_folders:
                path = folder_path(maildir, folder)
                if not self.is_folder(path):
                    self._make_folder_dirs(path, subfolder=True)
            created = True
        if len(self._maildirs) >= MAILDIR_MEMORY:
            self._maildirs.clear()
        self._maildirs[maildir] = now
        return created

    def _remake(self, directory: str) -> bool:
        """After ENOENT in ``directory``: if it is a Maildir trusted from memory (removed since
        it was last looked at), look again and create what is missing, as on a first delivery.
        True if the caller should retry.

        Concurrent deliveries all meet the ENOENT: each one looks again (creating is
        idempotent), none gives up because another one is already at it.
        """
        if directory not in self._maildirs:
            return False
        self._maildirs[directory] = -math.inf  # whoever asks next looks again
        self.ensure_maildir(directory)
        return True

    def folder_dir(self, maildir: str, folder: str | None, *, create: bool) -> str:
        """The directory to deliver into: the folder if it exists (or may be created), else INBOX."""
        path = folder_path(maildir, folder)
        if folder is None or self.is_folder(path):
            return path
        if not create:
            return maildir
        # Maildir++ parents need not exist ("a.b" is just ".a.b"), as in Dovecot.
        self._make_folder_dirs(path, subfolder=True)
        return path

    # -- writing -------------------------------------------------------------------------

    def _create_tmp(self, directory: str, access: int = os.O_WRONLY) -> tuple[str, str, int]:
        for _attempt in range(100):
            base = self.names.next()
            path = os.path.join(directory, "tmp", base)
            try:
                fd = os.open(path, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            return base, path, fd
        raise DeliveryError("cannot create a unique file name in tmp/")

    def open_tmp(self, directory: str, header: bytes) -> tuple[TmpFile, IO[bytes]]:
        """A new ``directory/tmp`` file (O_EXCL, 0600, mail user) holding ``header``, open for
        the body to be appended (unbuffered)."""
        try:
            base, path, fd = self._create_tmp(directory, os.O_RDWR)  # read back for other copies
        except FileNotFoundError:
            if not self._remake(directory):
                raise
            base, path, fd = self._create_tmp(directory, os.O_RDWR)
        try:
            self._own_fd(fd)
            write_all(fd, header)
            file = os.fdopen(fd, "r+b", buffering=0)
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        return TmpFile(directory, header, base, path), file

    def _write_file(self, directory: str, header: bytes, body: Body) -> tuple[str, str]:
        """Write header + body into ``directory/tmp``, fsynced; returns (base, tmp path)."""
        base, path, fd = self._create_tmp(directory)
        try:
            try:
                self._own_fd(fd)
                if body.spool is not None:
                    write_all(fd, header)
                    copy_spool(body.spool, fd, body.size, body.offset)
                else:
                    write_both(fd, header, body.data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            unlink_quietly(path)
            raise
        return base, path

    def _adopt(self, body: Body, header: bytes, directories: list[str]) -> tuple[str, str] | None:
        """The spool file itself as this group's tmp file, when it already is one with this
        header in one of these directories (moved first): fsynced, returns (base, tmp path)."""
        tmp = body.tmp
        if tmp is None or body.spool is None or tmp.header != header or tmp.directory not in directories:
            return None
        fd = body.spool.fileno()
        if os.fstat(fd).st_size != body.offset + body.size:
            raise DeliveryError("spool file is not the size the DATA decoded to")
        os.fsync(fd)
        directories.remove(tmp.directory)
        directories.insert(0, tmp.directory)
        body.tmp = None  # linked (or unlinked) below, no longer Body.close's business
        return tmp.base, tmp.path

    def _link_new(
        self,
        tmp_path: str,
        directory: str,
        base: str,
        size: int,
        vsize: int,
        before_link: Callable[[str, str], None] | None = None,
    ) -> str:
        """Link into ``directory/new`` (a fresh name on EEXIST); returns the new/ name.

        ``before_link(directory, name)`` runs before every link attempt: whatever it records
        (the redelivery journal) knows the name before the file can appear in ``new/``.
        """
        for _attempt in range(100):
            name = maildir_name(base, size, vsize)
            if before_link is not None:
                before_link(directory, name)
            try:
                os.link(tmp_path, os.path.join(directory, "new", name))
            except FileExistsError:
                base = self.names.next()
                continue
            return name
        raise DeliveryError("cannot create a unique file name in new/")

    def write(
        self,
        header: bytes,
        body: Body,
        directories: Sequence[str],
        before_link: Callable[[str, str], None] | None = None,
    ) -> tuple[Written, dict[str, OSError | DeliveryError]]:
        """One file (header + body) into ``new/`` of every directory, hard-linked.

        Returns the names written and, per directory that failed, the error. Raises only if the
        file could not be written at all (then every directory failed the same way).
        ``before_link(directory, name)`` is called before each link into ``directory/new``
        (see :meth:`_link_new`); an exception from it fails that directory.
        """
        size = len(header) + body.size
        vsize = size + header.count(b"\n") - header.count(b"\r\n") + body.bare_newlines
        failures: dict[str, OSError | DeliveryError] = {}
        names: dict[str, str] = {}
        directories = list(directories)
        adopted = self._adopt(body, header, directories)
        if adopted is not None:
            base, tmp_path = adopted
        else:
            try:
                base, tmp_path = self._write_file(directories[0], header, body)
            except FileNotFoundError:
                if not self._remake(directories[0]):
                    raise
                base, tmp_path = self._write_file(directories[0], header, body)
        tmp_dir = directories[0]
        try:
            for directory in directories:
                try:
                    try:
                        try:
                            names[directory] = self._link_new(tmp_path, directory, base, size,
                                                              vsize, before_link)
                        except FileNotFoundError:
                            # new/ gone since this Maildir was last looked at: remade, once.
                            if not os.path.exists(tmp_path) or not self._remake(directory):
                                raise
                            names[directory] = self._link_new(tmp_path, directory, base, size,
                                                              vsize, before_link)
                    except OSError as exc:
                        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                            raise
                        # Another filesystem (or no hard links): a copy of its own.
                        own_base, own_tmp = self._write_file(directory, header, body)
                        try:
                            names[directory] = self._link_new(own_tmp, directory, own_base, size,
                                                              vsize, before_link)
                        finally:
                            unlink_quietly(own_tmp)
                except (OSError, DeliveryError) as exc:
                    failures[directory] = exc
        finally:
            unlink_quietly(tmp_path)
        for directory in list(names):
            try:
                # Shared with concurrent deliveries into the same new/ (deliver.groupsync).
                DIRECTORY_SYNC.sync(os.path.join(directory, "new"))
            except OSError as exc:
                failures[directory] = exc
                del names[directory]
        self.maybe_clean_tmp(tmp_dir)
        return Written(names, size, vsize), failures

    # -- redeliveries -------------------------------------------------------------------
    #
    # LMTP is at-least-once where the reply is lost: killed after the file reached new/ but
    # before Postfix read the 250 (or Postfix timed out), Postfix logs "message may be sent
    # more than once" and sends it again. A journal line per delivery (key, new/ name, folder)
    # lets that retry be recognised: if the file it names is still in new/ or cur/, the
    # message is not saved twice. The line is written before the link into new/ (a kill
    # between the two leaves a line naming a file that is not there: the retry stores it),
    # without fsync: it only has to survive the process, not the machine (after a power loss
    # the worst case is the old duplicate).

    def delivered_before(self, maildir: str, key: str) -> bool:
        try:
            with open(os.path.join(maildir, JOURNAL), "rb") as journal:
                lines = journal.read(JOURNAL_LIMIT * 2).decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return False
        prefix = key + " "
        for line in reversed(lines):
            if line.startswith(prefix):
                parts = line.split(" ", 2)
                return len(parts) == 3 and self._still_there(os.path.join(maildir, parts[2]), parts[1])
        return False

    @staticmethod
    def _still_there(directory: str, name: str) -> bool:
        if os.path.exists(os.path.join(directory, "new", name)):
            return True
        base = name.split(",", 1)[0].split(":", 1)[0]
        try:
            # Dovecot moved it to cur/ and may have added flags (":2,S") or fields.
            return any(entry.startswith(base) for entry in os.listdir(os.path.join(directory, "cur")))
        except FileNotFoundError:
            return False

    def record_delivery(self, maildir: str, key: str, directory: str, name: str) -> None:
        folder = os.path.relpath(directory, maildir)
        line = f"{key} {name} {folder}\n".encode("utf-8", "surrogateescape")
        path = os.path.join(maildir, JOURNAL)
        with self._journal_lock:
            # Other processes (deliver's workers, another host on shared storage) append and
            # trim too: the file lock makes "append, maybe trim" one step, so a trim never
            # drops a line appended between its read and its rename.
            fd = _locked_journal(path)
            try:
                self._own_fd(fd)
                write_all(fd, line)
                if os.fstat(fd).st_size > JOURNAL_LIMIT:
                    # Keep the newer half.
                    with open(path, "rb") as journal:
                        data = journal.read()
                    keep = data[len(data) // 2 :]
                    owner = (self.uid, self.gid) if self._chown else None
                    replace_file(maildir, JOURNAL, keep[keep.find(b"\n") + 1 :], owner)
            finally:
                os.close(fd)  # releases the lock

    # -- stale tmp files ---------------------------------------------------------------

    def maybe_clean_tmp(self, directory: str) -> int:
        """Remove stale files from ``directory/tmp`` if not done within the interval."""
        now = self._clock()
        with self._clean_lock:
            last = self._last_clean.get(directory)
            if last is not None and now - last < self.stale_tmp_interval:
                return 0
            self._last_clean[directory] = now
            if len(self._last_clean) > 100_000:
                self._last_clean.clear()
        return clean_stale(os.path.join(directory, "tmp"), now - self.stale_tmp_age)
