"""deliver end to end: stock Postfix -> deliver (LMTP, unix socket) -> Maildir -> stock Dovecot IMAP.

One rig per module: a private Postfix whose ``virtual_transport`` is deliver's socket, deliver
itself (``mailplugins serve deliver``), and a private Dovecot reading the same Maildirs with a
static passdb/userdb whose ``mail_location`` is deliver's ``mail.location``.
"""

from __future__ import annotations

import imaplib
import os
import re
import smtplib
import socket as socketlib
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devrig.instances import dovecot_mail_location, dovecot_static_auth
from devrig.release import Release
from tests.rig import (
    Daemons,
    Dovecot,
    Postfix,
    RigFactory,
    free_port,
    unix_socket_open,
    wait_until,
)

pytestmark = pytest.mark.e2e

NOBODY = 65534
PASSWORD = "imap-secret"


@dataclass
class Rig:
    metrics_port: int
    root: Path
    mail_root: Path
    socket: Path
    postfix: Postfix
    dovecot: Dovecot
    daemons: Daemons

    def maildir(self, user: str) -> Path:
        local, domain = user.split("@")
        return self.mail_root / domain / local / "Maildir"

    def send(self, sender: str, recipients: list[str], message: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.postfix.smtp_port, timeout=30) as smtp:
            smtp.sendmail(sender, recipients, message)

    def new_files(self, user: str, folder: str = "") -> list[Path]:
        directory = self.maildir(user) / folder / "new" if folder else self.maildir(user) / "new"
        return sorted(directory.iterdir()) if directory.is_dir() else []

    def status(self, recipient: str) -> str | None:
        found = re.findall(rf"to=<{re.escape(recipient)}>.*status=(\w+)", self.postfix.log_text())
        return found[-1] if found else None

    def wait_status(self, recipient: str, status: str, timeout: float = 30) -> None:
        wait_until(lambda: self.status(recipient) == status, timeout=timeout,
                   what=f"{recipient} status={status}\n{self.postfix.log_text()[-3000:]}")

    def restart_deliver(self) -> None:
        self.daemons.stop()
        self.daemons.start()
        wait_until(lambda: unix_socket_open(self.socket), what="deliver socket")


@pytest.fixture(scope="module")
def rig(release: Release) -> Iterator[Rig]:
    factory = RigFactory(release, "mpd-")
    root = factory.root
    mail_root = root / "vmail"
    mail_root.mkdir()
    os.chown(mail_root, NOBODY, NOBODY)
    socket = root / "lmtp.sock"
    metrics_port = free_port()
    daemons = factory.daemons({
        "mail": {"location": f"{mail_root}/%d/%n/Maildir", "uid": NOBODY, "gid": NOBODY},
        "deliver": {
            "listen": f"unix:{socket}:mode=666",
            "hostname": "deliver.test",
            "quota_tempfail": True,
            "autocreate_detail_folders": True,
            "memory_spool_limit": 4096,
            "stale_tmp_interval": 1,
            "metrics": f"tcp:{metrics_port}:interface=127.0.0.1",
        },
    }, ["deliver"])
    store = daemons.store
    store.add_domain("example.org")
    for user in ("alice", "bob", "sender", "carol", "erin", "broken", "jösé"):
        store.add_mailbox(f"{user}@example.org", "{PLAIN}unused")
    store.add_mailbox("full@example.org", "{PLAIN}unused", quota_bytes=100)
    store.add_alias("team@example.org", ["alice@example.org", "bob@example.org"])
    postfix = factory.postfix(main={
        "virtual_mailbox_domains": "example.org",
        "virtual_transport": f"lmtp:unix:{socket}",
        "smtpd_reject_unlisted_recipient": "no",
        "message_size_limit": "52428800",
    })
    dovecot = factory.dovecot(
        lmtp_port=free_port(),
        conf=dovecot_mail_location(release, f"maildir:{mail_root}/%d/%n/Maildir")
        + f"mail_uid = {NOBODY}\nmail_gid = {NOBODY}\nfirst_valid_uid = 1\n"
        + dovecot_static_auth(release, PASSWORD, uid=str(NOBODY), gid=str(NOBODY),
                              home=f"{mail_root}/%d/%n"),
    )
    rig = Rig(metrics_port, root, mail_root, socket, postfix, dovecot, daemons)
    # broken@'s Maildir cannot be created (a file is in the way): an I/O error after DATA.
    (mail_root / "example.org").mkdir()
    os.chown(mail_root / "example.org", NOBODY, NOBODY)
    (mail_root / "example.org" / "broken").write_bytes(b"")
    try:
        factory.start(daemons)
        factory.start(dovecot)
        factory.start(postfix)
        yield rig
    finally:
        factory.close()


def imap_fetch_all(rig: Rig, user: str, mailbox: str = "INBOX") -> list[tuple[bytes, int]]:
    """(RFC822 bytes, RFC822.SIZE) of every message in ``mailbox``."""
    imap = imaplib.IMAP4("127.0.0.1", rig.dovecot.imap_port)
    try:
        imap.login(user, PASSWORD)
        status, data = imap.select(mailbox, readonly=True)
        assert status == "OK", data
        count = int(data[0] or 0)
        messages: list[tuple[bytes, int]] = []
        for number in range(1, count + 1):
            status, parts = imap.fetch(str(number), "(RFC822.SIZE RFC822)")
            assert status == "OK"
            header, content = parts[0]  # type: ignore[misc]
            size = int(re.search(rb"RFC822\.SIZE (\d+)", header).group(1))
            messages.append((content, size))
        return messages
    finally:
        imap.logout()


MESSAGE = (
    "From: Sender <sender@example.org>\r\n"
    "To: alice@example.org\r\n"
    "Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
    "Message-ID: <e2e-1@example.org>\r\n"
    "Date: Sun, 22 Nov 2026 04:00:00 +0000\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Grüße aus dem Test.\r\n"
    ".a line starting with a dot\r\n"
    "..two dots\r\n"
    "\r\n"
    + "x" * 990 + "\r\n"
    "last line\r\n"
).encode()


def test_message_is_fetched_byte_correct_over_imap_and_results_are_mixed(rig: Rig) -> None:
    rig.send("sender@example.org",
             ["alice@example.org", "nouser@example.org", "full@example.org", "broken@example.org"],
             MESSAGE)
    rig.wait_status("alice@example.org", "sent")
    rig.wait_status("nouser@example.org", "bounced")
    rig.wait_status("full@example.org", "deferred")
    rig.wait_status("broken@example.org", "deferred")
    log = rig.postfix.log_text()
    assert re.search(r"to=<nouser@example.org>.*dsn=5\.1\.1.*550 5\.1\.1", log)
    assert re.search(r"to=<full@example.org>.*dsn=4\.2\.2.*452 4\.2\.2", log)
    assert re.search(r"to=<alice@example.org>.*dsn=2\.0\.0.*250 2\.0\.0", log)
    assert re.search(r"to=<broken@example.org>.*dsn=4\.3\.0.*451 4\.3\.0 .*"
                     r"in reply to end of DATA command", log)

    (path,) = rig.new_files("alice@example.org")
    stored = path.read_bytes()
    assert b"\r" not in stored
    match = re.search(r",S=(\d+),W=(\d+)$", path.name)
    assert match is not None
    assert int(match.group(1)) == len(stored) == path.stat().st_size
    assert int(match.group(2)) == len(stored) + stored.count(b"\n")
    assert path.stat().st_mode & 0o777 == 0o600
    assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY, NOBODY)
    assert stored.startswith(b"Return-Path: <sender@example.org>\nDelivered-To: alice@example.org\n")

    ((content, size),) = imap_fetch_all(rig, "alice@example.org")
    assert content == stored.replace(b"\n", b"\r\n")
    assert size == int(match.group(2)) == len(content)
    # The original message arrives unchanged after the trace headers Postfix and deliver added.
    original = MESSAGE[MESSAGE.index(b"From: Sender"):]
    assert content[-len(original):] == original
    assert b"\r\n.a line starting with a dot\r\n..two dots\r\n" in content

    # The bounce for nouser reached the sender's mailbox through deliver too.
    rig.wait_status("sender@example.org", "sent")
    assert len(rig.new_files("sender@example.org")) == 1


def test_maildir_layout_folders_and_detail(rig: Rig) -> None:
    rig.send("sender@example.org", ["bob+Lists@example.org", "bob+.hidden@example.org"],
             b"Subject: detail\r\n\r\nhello\r\n")
    rig.wait_status("bob+Lists@example.org", "sent")
    rig.wait_status("bob+.hidden@example.org", "sent")
    maildir = rig.maildir("bob@example.org")
    for folder in (".Drafts", ".Sent", ".Trash", ".Templates", ".Lists"):
        assert (maildir / folder / "maildirfolder").is_file(), folder
        assert (maildir / folder).stat().st_mode & 0o777 == 0o700
        assert (maildir / folder).stat().st_uid == NOBODY
    assert len(rig.new_files("bob@example.org", ".Lists")) == 1
    assert len(rig.new_files("bob@example.org")) == 1  # the unsafe detail fell back to INBOX
    assert not (maildir / ".hidden").exists()
    messages = imap_fetch_all(rig, "bob@example.org", "Lists")
    assert len(messages) == 1
    assert messages[0][0].endswith(b"\r\n\r\nhello\r\n")


def test_alias_expansion_hardlinks_one_file(rig: Rig) -> None:
    before_alice = set(rig.new_files("alice@example.org"))
    before_bob = set(rig.new_files("bob@example.org"))
    rig.send("sender@example.org", ["team@example.org"], b"Subject: team\r\n\r\nfor all\r\n")
    rig.wait_status("team@example.org", "sent")
    (alice,) = set(rig.new_files("alice@example.org")) - before_alice
    (bob,) = set(rig.new_files("bob@example.org")) - before_bob
    assert alice.stat().st_ino == bob.stat().st_ino
    assert alice.stat().st_nlink == 2
    assert alice.name == bob.name


def test_kill_during_data_then_retry_leaves_exactly_one_copy(rig: Rig) -> None:
    body = (b"y" * 76 + b"\r\n") * 200_000  # ~15 MB: DATA takes a while
    message = b"Subject: crash\r\n\r\n" + body

    def spooling() -> int | None:
        """The deliver process (the worker, with several) writing into carol's tmp/."""
        for pid in rig.daemons.pids():
            try:
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except OSError:
                continue
            # A large message spools straight into the first destination's Maildir tmp/.
            if any("/carol/Maildir/tmp/" in link for link in links):
                return pid
        return None

    rig.send("sender@example.org", ["carol@example.org"], message)
    pid = wait_until(spooling, timeout=30, interval=0.002, what="deliver to spool DATA")
    rig.daemons.kill()
    wait_until(lambda: "lost connection" in rig.postfix.log_text()
               or rig.status("carol@example.org") == "deferred", timeout=30, what="postfix to notice")
    assert rig.new_files("carol@example.org") == []
    rig.restart_deliver()
    rig.postfix.flush()
    rig.wait_status("carol@example.org", "sent", timeout=60)
    time.sleep(1)
    files = rig.new_files("carol@example.org")
    assert len(files) == 1
    stored = files[0].read_bytes()
    assert stored.count(b"Subject: crash") == 1
    assert stored.endswith(b"\n\n" + (b"y" * 76 + b"\n") * 200_000)
    # What the killed process was writing stays in tmp/ (never in new/) until the stale-tmp
    # sweep, as with Dovecot; the retry's own tmp file is gone.
    leftovers = list((rig.maildir("carol@example.org") / "tmp").iterdir())
    assert [f.name for f in leftovers if f"P{pid}Q" not in f.name] == []
    assert len(leftovers) <= 1


def lmtp_session(connect: tuple[str, int] | str, recipient: str, data: bytes) -> bytes:
    """A plain pipelined LMTP transaction; returns everything the server said."""
    family = socketlib.AF_UNIX if isinstance(connect, str) else socketlib.AF_INET
    with socketlib.socket(family, socketlib.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(connect)
        sock.sendall(b"LHLO client.test\r\nMAIL FROM:<s@origin.test>\r\n"
                     + f"RCPT TO:<{recipient}>\r\nDATA\r\n".encode())
        received = b""
        while received.count(b"\r\n354 ") == 0 and not received.startswith(b"354"):
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        sock.sendall(data + b"QUIT\r\n")
        while b"\r\n221 " not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


EDGE_DATA = (
    b"Subject: edges\r\n\r\n"
    b"lone LF here\nand CR here\r then\r\r\n"
    b"..dot-stuffed\r\n"
    b"trailing spaces   \r\n"
    + b"w" * 998 + b"\r\n"
    b"\r\n.\r\n"
)


def test_same_bytes_and_sizes_as_dovecot_lmtp(rig: Rig) -> None:
    """The same DATA through deliver and through Dovecot's own LMTP: identical message bytes
    after each server's trace headers, and S=/W= computed the same way."""
    ours = lmtp_session(str(rig.socket), "carol@example.org", EDGE_DATA)
    assert re.search(rb"250 2\.0\.0 <carol@example\.org> \S{22} Saved", ours), ours
    assert rig.dovecot.lmtp_port is not None
    theirs = lmtp_session(("127.0.0.1", rig.dovecot.lmtp_port), "dave@example.org", EDGE_DATA)
    assert b"250 2.0.0 <dave@example.org>" in theirs, theirs
    (our_file,) = [p for p in rig.new_files("carol@example.org") if b"Subject: edges" in p.read_bytes()]
    (their_file,) = rig.new_files("dave@example.org")
    our_bytes, their_bytes = our_file.read_bytes(), their_file.read_bytes()
    start = b"Subject: edges"
    assert our_bytes[our_bytes.index(start):] == their_bytes[their_bytes.index(start):]
    for path, content in ((our_file, our_bytes), (their_file, their_bytes)):
        match = re.search(r",S=(\d+),W=(\d+)", path.name)
        assert match is not None, path.name
        bare = len(re.findall(rb"(?<!\r)\n", content))
        assert (int(match.group(1)), int(match.group(2))) == (len(content), len(content) + bare)


def test_kill_during_the_write_phase_leaves_one_copy_and_tmp_garbage_is_cleaned(rig: Rig) -> None:
    tmp = rig.maildir("erin@example.org") / "tmp"
    rig.send("sender@example.org", ["erin@example.org"], b"Subject: first\r\n\r\nhello\r\n")
    rig.wait_status("erin@example.org", "sent")
    body = (b"w" * 998 + b"\r\n") * 40_000  # 40 MB: copying and fsyncing take a while
    rig.send("sender@example.org", ["erin@example.org"], b"Subject: write phase\r\n\r\n" + body)
    wait_until(lambda: any(tmp.iterdir()), timeout=60, interval=0.001, what="a file in erin's tmp/")
    rig.daemons.kill()
    new_after_kill = [p for p in rig.new_files("erin@example.org") if p.stat().st_size > 1_000_000]
    assert new_after_kill == []
    (garbage,) = list(tmp.iterdir())
    rig.restart_deliver()
    rig.postfix.flush()
    wait_until(lambda: len(rig.new_files("erin@example.org")) == 2, timeout=60, what="the retry")
    time.sleep(1)
    big = [p for p in rig.new_files("erin@example.org") if p.stat().st_size > 1_000_000]
    assert len(big) == 1
    assert big[0].read_bytes().endswith((b"w" * 998 + b"\n") * 40_000)
    # The partial tmp file stays until it is stale (36 h), then the next delivery removes it.
    assert garbage.exists()
    os.utime(garbage, (time.time() - 40 * 3600, time.time() - 40 * 3600))
    time.sleep(1.1)  # stale_tmp_interval is 1 s in this rig
    rig.send("sender@example.org", ["erin@example.org"], b"Subject: third\r\n\r\nx\r\n")
    wait_until(lambda: len(rig.new_files("erin@example.org")) == 3, timeout=30, what="third")
    assert not garbage.exists()
    assert list(tmp.iterdir()) == []


def test_postfix_connection_reuse_many_messages_exactly_once(rig: Rig) -> None:
    """Postfix caches LMTP connections (RSET probes, no QUIT): every message arrives once."""
    before = len(rig.new_files("bob@example.org"))
    with smtplib.SMTP("127.0.0.1", rig.postfix.smtp_port, timeout=30) as smtp:
        for number in range(15):
            smtp.sendmail("sender@example.org", ["bob@example.org"],
                          f"Subject: reuse {number}\r\n\r\nbody {number}\r\n".encode())
    wait_until(lambda: len(rig.new_files("bob@example.org")) == before + 15, timeout=60,
               what="15 messages for bob")
    time.sleep(0.5)
    subjects = sorted(
        line for path in rig.new_files("bob@example.org")
        for line in path.read_bytes().split(b"\n") if line.startswith(b"Subject: reuse")
    )
    assert subjects == sorted(f"Subject: reuse {n}".encode() for n in range(15))
    assert re.search(r"to=<bob@example.org>.*conn_use=\d+", rig.postfix.log_text())


def test_metrics_endpoint_counts_deliveries(rig: Rig) -> None:
    rig.send("sender@example.org", ["alice+metrics@example.org", "nouser.metrics@example.org"],
             b"Subject: m\r\n\r\nx\r\n")
    rig.wait_status("alice+metrics@example.org", "sent")
    rig.wait_status("nouser.metrics@example.org", "bounced")
    url = f"http://127.0.0.1:{rig.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    delivered = re.search(r'^mailplugins_deliver_recipients_total\{result="delivered"\} (\S+)$', text, re.M)
    unknown = re.search(r'^mailplugins_deliver_recipients_total\{result="unknown"\} (\S+)$', text, re.M)
    assert delivered is not None and float(delivered.group(1)) >= 1
    assert unknown is not None and float(unknown.group(1)) >= 1
    assert "mailplugins_deliver_message_size_bytes_bucket" in text
    assert 'mailplugins_deliver_delivery_duration_seconds_count{stage="write"}' in text
    assert "mailplugins_deliver_bytes_written_total" in text


def test_utf8_mailbox_through_postfix_with_smtputf8(rig: Rig) -> None:
    """Issue #15 item 7: deliver advertises SMTPUTF8, so Postfix hands it a UTF-8 recipient
    with SMTPUTF8 on MAIL, and the message lands in that mailbox (without SMTPUTF8 the same
    address gets 553 5.6.7, see the unit and differential tests)."""
    with smtplib.SMTP("127.0.0.1", rig.postfix.smtp_port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.sendmail("sender@example.org", ["jösé@example.org"],
                      "Subject: utf8\r\n\r\nGrüße\r\n".encode(), mail_options=["SMTPUTF8"])
    rig.wait_status("jösé@example.org", "sent")
    assert re.search(r"to=<jösé@example.org>.*dsn=2\.0\.0.*250 2\.0\.0", rig.postfix.log_text())
    (path,) = rig.new_files("jösé@example.org")
    stored = path.read_bytes()
    assert "Delivered-To: jösé@example.org\n".encode() in stored
    assert stored.endswith("\n\nGrüße\n".encode())
