"""deliver on a full disk: ``452 4.2.2`` per recipient, nothing partial, and back once there is room.

The mail root is a 2 MiB tmpfs mounted for the test (we run as root), so deliver's Maildirs and
its spool directory (``.mailplugins-spool`` in the mail root, by default) share one small
filesystem, as on a real server. Messages go in over LMTP until the disk is full. What must
hold, since Postfix retries a 4xx and a 250 means the message is safe:

- the message that does not fit gets ``452 4.2.2`` (insufficient storage, temporary) for each
  of its recipients, never 250 and never a generic ``451 4.3.0``;
- no partial file in any ``new/`` or ``cur/``, nothing left in ``tmp/`` or the spool;
- every message answered 250 is there byte for byte;
- that also when the disk fills while DATA is being spooled (messages larger than
  ``memory_spool_limit`` stream to disk), and when the disk is so full that even the first
  bytes of the spool cannot be written (the spool then falls back to its own directory);
- once space is freed, the same process delivers again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devrig.instances import short_tempdir, wait_until
from tests.rig import Daemons

pytestmark = pytest.mark.e2e

#: The Received: header deliver adds (one line plus its folded continuation lines).
RECEIVED = re.compile(rb"^Received: [^\n]*\n(?:[ \t][^\n]*\n)*", re.MULTILINE)
NOBODY = 65534
FS_SIZE = "2m"
#: DATA above this streams to disk while it arrives (deliver's minimum is 4 KiB).
MEMORY_SPOOL_LIMIT = 16 * 1024
USERS = ("alice@example.org", "bob@example.org")
FULL = "452 4.2.2"


@dataclass
class Rig:
    root: Path
    mail_root: Path
    socket: Path
    daemons: Daemons
    #: Maildir file content expected for each message answered 250, by (user, subject).
    saved: dict[tuple[str, str], bytes] = field(default_factory=dict)
    counter: int = 0

    def maildir(self, user: str) -> Path:
        local, domain = user.split("@")
        return self.mail_root / domain / local / "Maildir"

    def files(self, user: str, sub: str) -> list[Path]:
        directory = self.maildir(user) / sub
        return sorted(directory.iterdir()) if directory.is_dir() else []

    def message(self, size: int) -> tuple[str, bytes]:
        """A message of about ``size`` octets, distinct lines (no leading dots), CRLF."""
        self.counter += 1
        subject = f"fill {self.counter}"
        seed = hashlib.sha256(subject.encode()).hexdigest()
        line = (seed * 2)[:76].encode() + b"\r\n"
        body = line * max(1, size // len(line))
        return subject, f"Subject: {subject}\r\n\r\n".encode() + body

    def send(self, recipients: tuple[str, ...], size: int) -> list[str]:
        """One LMTP transaction; the per-recipient replies after DATA (RCPT must accept)."""
        subject, data = self.message(size)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(self.socket))
            reader = sock.makefile("rb")

            def reply() -> str:
                while True:
                    line = reader.readline().decode()
                    assert line, "deliver closed the connection"
                    if line[3:4] != "-":
                        return line.rstrip("\r\n")

            def command(text: str) -> str:
                sock.sendall(text.encode() + b"\r\n")
                return reply()

            reply()
            assert command("LHLO client.test").startswith("250")
            assert command("MAIL FROM:<sender@remote.example>").startswith("250")
            for user in recipients:
                answer = command(f"RCPT TO:<{user}>")
                assert answer.startswith("250 2.1.5"), answer
            assert command("DATA").startswith("354")
            sock.sendall(data + b".\r\n")
            replies = [reply() for _ in recipients]
            command("QUIT")
        for user, answer in zip(recipients, replies, strict=True):
            if answer.startswith("250"):
                header = f"Return-Path: <sender@remote.example>\nDelivered-To: {user}\n".encode()
                self.saved[(user, subject)] = header + data.replace(b"\r\n", b"\n")
        return replies

    def fill_with(self, recipients: tuple[str, ...], size: int, limit: int = 200) -> list[str]:
        """Send until a transaction is not answered 250 throughout; returns those replies."""
        for _ in range(limit):
            replies = self.send(recipients, size)
            if not all(r.startswith("250") for r in replies):
                return replies
        raise AssertionError(f"{limit} messages of {size} octets fit on a {FS_SIZE} filesystem")

    def assert_nothing_partial(self) -> None:
        """Every file in new/ and cur/ is a message answered 250, whole; tmp/ and the spool
        are empty (removal may finish just after the reply: waited for briefly)."""
        found: dict[tuple[str, str], bytes] = {}
        for user in USERS:
            assert self.files(user, "cur") == []
            for path in self.files(user, "new"):
                content = path.read_bytes()
                subject = next(line for line in content.split(b"\n")
                               if line.startswith(b"Subject: "))[len(b"Subject: "):].decode()
                key = (user, subject)
                assert key not in found, f"{key} twice"
                found[key] = content
                size = int(path.name.split(",S=")[1].split(",")[0])
                assert size == len(content), path.name
        assert found.keys() == self.saved.keys()
        for key, content in found.items():
            # deliver's own trace line (Dovecot's form) comes after Delivered-To; the rest is
            # exactly what was sent.
            content, traces = RECEIVED.subn(b"", content, count=1)
            assert traces == 1, f"{key}: no Received: line"
            assert content == self.saved[key], f"{key}: {len(content)} octets on disk"

        def clean() -> bool:
            leftovers = [p for user in USERS for p in self.files(user, "tmp")]
            spool = self.mail_root / ".mailplugins-spool"
            if spool.is_dir():
                leftovers += list(spool.iterdir())
            return not leftovers

        wait_until(clean, timeout=5, what="tmp/ and the spool directory to be empty")

    def free(self) -> int:
        return os.statvfs(self.mail_root).f_bavail * os.statvfs(self.mail_root).f_frsize


@pytest.fixture
def rig() -> Iterator[Rig]:
    root = short_tempdir("mp-full-")
    mail_root = root / "vmail"
    mail_root.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0750", "tmpfs", str(mail_root)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"cannot mount a {FS_SIZE} tmpfs for the mail root (this test needs root and "
                    f"CAP_SYS_ADMIN): {result.stderr.strip()}")
    daemons: Daemons | None = None
    try:
        os.chown(mail_root, NOBODY, NOBODY)
        socket_path = root / "lmtp.sock"
        daemons = Daemons(root / "mp", {
            "mail": {"location": f"{mail_root}/%d/%n/Maildir", "uid": NOBODY, "gid": NOBODY},
            "deliver": {
                "listen": f"unix:{socket_path}:mode=666",
                "hostname": "deliver.test",
                "memory_spool_limit": MEMORY_SPOOL_LIMIT,
                "default_folders": [],
                "lookup_cache_ttl": 0,
            },
        }, ["deliver"])
        daemons.store.add_domain("example.org")
        for user in USERS:
            daemons.store.add_mailbox(user, "{PLAIN}unused")
        daemons.start()
        yield Rig(root, mail_root, socket_path, daemons)
    finally:
        if daemons is not None:
            daemons.stop()
        subprocess.run(["umount", str(mail_root)], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def take_space(rig: Rig, leave: int) -> Path:
    """A root-owned filler file taking all but ``leave`` octets (whole pages) of the disk."""
    filler = rig.mail_root / f"filler-{rig.counter}"
    with open(filler, "wb", buffering=0) as out:
        while rig.free() > leave:
            try:
                out.write(b"\0" * min(4096, rig.free() - leave))
            except OSError:
                break
    assert rig.free() == leave, (rig.free(), leave)
    return filler


def test_full_disk_452_per_recipient_nothing_partial_then_delivery_resumes(rig: Rig) -> None:
    # Small messages (held in memory during DATA) until one does not fit.
    replies = rig.fill_with(("alice@example.org",), 10_000)
    assert replies[0].startswith(FULL), replies
    assert "<alice@example.org>" in replies[0]
    rig.assert_nothing_partial()

    # A message spooled to disk while it streams (> memory_spool_limit), far larger than what
    # is left: the disk fills during DATA. Both recipients get 452, each with its own address.
    assert rig.free() < 400_000
    replies = rig.send(USERS, 400_000)
    assert [r[:9] for r in replies] == [FULL, FULL], replies
    assert [r.split()[2] for r in replies] == [f"<{u}>" for u in USERS], replies
    rig.assert_nothing_partial()

    # Completely full (a root-owned filler takes the last pages): not even the first spool
    # bytes can be written, in tmp/ nor in the spool directory. Small and spooled messages alike.
    filler = take_space(rig, 0)
    spool = rig.mail_root / ".mailplugins-spool"
    assert not spool.exists()
    for size in (1_000, 100_000):
        replies = rig.send(USERS, size)
        assert [r[:9] for r in replies] == [FULL, FULL], (size, replies)
        rig.assert_nothing_partial()
    # The spooled one met ENOSPC in alice's tmp/ first, then in the spool directory.
    assert spool.is_dir()
    assert "cannot spool message: [Errno 28] No space left on device" in rig.daemons.output()

    # Room again (the filler goes, alice expunges old messages): the same process
    # delivers, small and spooled messages, to both.
    filler.unlink()
    for path in rig.files("alice@example.org", "new"):
        if rig.free() > 500_000:
            break
        subject = next(line for line in path.read_bytes().split(b"\n")
                       if line.startswith(b"Subject: "))[len(b"Subject: "):].decode()
        path.unlink()
        del rig.saved[("alice@example.org", subject)]
    for size in (1_000, 100_000):
        replies = rig.send(USERS, size)
        assert [r[:9] for r in replies] == ["250 2.0.0"] * 2, (size, replies)
    rig.assert_nothing_partial()
    assert rig.daemons.process is not None and rig.daemons.process.poll() is None


def test_disk_fills_during_the_last_spool_write_452_not_a_truncated_250(rig: Rig) -> None:
    """The space runs out inside the final write of a spooled message (one page short).

    The kernel then writes what fits and returns a short count instead of ENOSPC; only a
    further write would fail. Before d4bd5d2 deliver ignored the short count: ``250 2.0.0``
    and a file of 8192 octets in ``new/`` whose name said ``S=39511``; now ``452 4.2.2``
    and no file.
    """
    assert rig.send(("alice@example.org",), 1_000)[0].startswith("250")  # Maildir exists
    size = 40_000  # > memory_spool_limit: spooled straight into alice's tmp/
    stored = len(rig.message(size)[1]) + 100  # upper bound of header + LF body
    pages = -(-stored // 4096)
    take_space(rig, (pages - 1) * 4096)
    replies = rig.send(("alice@example.org",), size)
    rig.assert_nothing_partial()
    assert replies[0].startswith(FULL), replies
