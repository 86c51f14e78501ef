"""deliver's Maildir writer: names, S=/W=, permissions, hard links, folders, stale tmp, quota."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from deliver.files import clean_stale, write_both
from deliver.maildir import MAILDIR_RECHECK, Body, MaildirWriter
from deliver.maildir_names import NameGenerator, encode_mutf7, folder_for_detail, folder_path
from deliver.quota import QuotaTracker, add_usage, count_usage, read_usage

UID, GID = os.getuid(), os.getgid()


def writer(**kwargs: Any) -> MaildirWriter:
    options: dict[str, Any] = {"hostname": "vm", "uid": UID, "gid": GID,
                               "default_folders": ("Drafts", "Sent", "Trash", "Templates")}
    options.update(kwargs)
    return MaildirWriter(**options)


def test_names_follow_dovecot_form_with_unpadded_microseconds() -> None:
    names = NameGenerator("host/with:colon", clock=lambda: 1795313566.016384)
    first, second = names.next(), names.next()
    match = re.fullmatch(rf"1795313566\.M16384P{os.getpid()}Q(\d+)\.host\\057with\\072colon", first)
    assert match is not None
    assert second.endswith(f"Q{int(match.group(1)) + 1}.host\\057with\\072colon")
    # A new generator (after a reload) continues the process-wide sequence.
    assert NameGenerator("h", clock=lambda: 1.0).next().endswith(f"Q{int(match.group(1)) + 2}.h")


@pytest.mark.parametrize(
    ("name", "encoded"),
    [("Lists", "Lists"), ("a&b", "a&-b"), ("Grüße", "Gr&APwA3w-e"), ("日本語", "&ZeVnLIqe-"),
     ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-")],
)
def test_modified_utf7(name: str, encoded: str) -> None:
    assert encode_mutf7(name) == encoded


@pytest.mark.parametrize(
    ("detail", "folder"),
    [("Lists", "Lists"), ("lists.python", "lists.python"), ("Grüße", "Grüße"), ("", None),
     (".hidden", None), ("a..b", None), ("a/b", None), ("inbox", None), ("INBOX.x", None),
     ("tab\there", None), ("end.", None), ("~home", None), ("x" * 201, None)],
)
def test_detail_sanitising(detail: str, folder: str | None) -> None:
    assert folder_for_detail(detail) == folder


def test_first_delivery_creates_maildir_and_default_folders(tmp_path: Path) -> None:
    w = writer()
    root = tmp_path / "example.org" / "alice" / "Maildir"
    assert w.ensure_maildir(str(root))
    assert not w.ensure_maildir(str(root))
    for folder in ("", ".Drafts", ".Sent", ".Trash", ".Templates"):
        directory = root / folder if folder else root
        for sub in ("tmp", "new", "cur"):
            assert (directory / sub).stat().st_mode & 0o777 == 0o700
        assert (directory / "maildirfolder").is_file() == bool(folder)
    assert (tmp_path / "example.org").stat().st_mode & 0o777 == 0o700


def test_a_maildir_found_complete_is_not_looked_at_again_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    w = writer(clock=lambda: now[0])
    root = str(tmp_path / "m")
    assert w.ensure_maildir(root)
    looked: list[str] = []
    real_isdir = os.path.isdir

    def isdir(path: Any) -> bool:
        looked.append(str(path))
        return real_isdir(path)

    monkeypatch.setattr("deliver.maildir.os.path.isdir", isdir)
    now[0] += MAILDIR_RECHECK - 1
    assert not w.ensure_maildir(root)
    assert looked == []  # no stat() per delivery
    now[0] += 1
    assert not w.ensure_maildir(root)
    assert sorted(looked) == sorted(os.path.join(root, sub) for sub in ("tmp", "new", "cur"))


@pytest.mark.parametrize("removed", ["Maildir", "new", "tmp"])
def test_a_known_maildir_removed_since_is_made_again_and_delivered_to(
    tmp_path: Path, removed: str
) -> None:
    w = writer()
    root = tmp_path / "m"
    w.ensure_maildir(str(root))
    w.write(b"", Body(size=3, bare_newlines=1, data=b"1\n"), [str(root)])
    shutil.rmtree(root if removed == "Maildir" else root / removed)
    assert not w.ensure_maildir(str(root))  # remembered: not looked at
    written, failures = w.write(b"", Body(size=3, bare_newlines=1, data=b"2\n"), [str(root)])
    assert failures == {}
    assert (root / "new" / written.names[str(root)]).read_bytes() == b"2\n"
    assert (root / ".Sent" / "cur").is_dir()  # made as on a first delivery
    assert list((root / "tmp").iterdir()) == []


def test_concurrent_deliveries_into_a_known_maildir_removed_since_all_succeed(tmp_path: Path) -> None:
    w = writer()
    root = tmp_path / "m"
    for _round in range(5):
        w.ensure_maildir(str(root))
        shutil.rmtree(root)
        start = threading.Barrier(8)
        outcomes: list[dict[str, Any]] = []

        def deliver(start: threading.Barrier = start, outcomes: list[Any] = outcomes) -> None:
            start.wait()
            _written, failures = w.write(b"", Body(size=3, bare_newlines=1, data=b"1\n"), [str(root)])
            outcomes.append(failures)

        threads = [threading.Thread(target=deliver) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert outcomes == [{}] * 8
        assert len(list((root / "new").iterdir())) == 8


def test_a_large_message_spools_into_a_known_maildir_removed_since(tmp_path: Path) -> None:
    w = writer()
    root = tmp_path / "m"
    w.ensure_maildir(str(root))
    shutil.rmtree(root)
    tmp, file = w.open_tmp(str(root), b"H: 1\n")
    with file:
        file.write(b"body\n")
        body = Body(size=5, bare_newlines=1, spool=file, offset=5, tmp=tmp)
        written, failures = w.write(b"H: 1\n", body, [str(root)])
    assert failures == {}
    assert (root / "new" / written.names[str(root)]).read_bytes() == b"H: 1\nbody\n"


def test_an_unknown_directory_missing_is_an_error_not_created(tmp_path: Path) -> None:
    w = writer()
    folder = tmp_path / "m" / ".Lists"
    with pytest.raises(FileNotFoundError):
        w.write(b"", Body(size=3, bare_newlines=1, data=b"1\n"), [str(folder)])
    assert not folder.exists()


def test_write_is_exact_private_and_leaves_no_tmp(tmp_path: Path) -> None:
    w = writer()
    root = str(tmp_path / "m")
    w.ensure_maildir(root)
    header = b"Return-Path: <a@b>\n"
    body = Body(size=12, bare_newlines=2, data=b"Subject: x\n\n")
    written, failures = w.write(header, body, [root])
    assert failures == {}
    name = written.names[root]
    path = Path(root) / "new" / name
    content = path.read_bytes()
    assert content == header + body.data
    lines = content.count(b"\n")
    assert name.endswith(f",S={len(content)},W={len(content) + lines}")
    assert path.stat().st_mode & 0o777 == 0o600
    assert list((Path(root) / "tmp").iterdir()) == []


def test_vsize_counts_only_bare_newlines(tmp_path: Path) -> None:
    w = writer()
    root = str(tmp_path / "m")
    w.ensure_maildir(root)
    data = b"a\r\nb\n"
    written, _ = w.write(b"", Body(size=len(data), bare_newlines=1, data=data), [root])
    assert (written.size, written.vsize) == (5, 6)


def test_one_file_hardlinked_into_every_folder(tmp_path: Path) -> None:
    w = writer()
    roots = [str(tmp_path / name) for name in ("a", "b", "c")]
    for root in roots:
        w.ensure_maildir(root)
    written, failures = w.write(b"H: 1\n", Body(size=3, bare_newlines=1, data=b"hi\n"), roots)
    assert failures == {}
    inodes = {(Path(r) / "new" / written.names[r]).stat().st_ino for r in roots}
    assert len(inodes) == 1
    assert (Path(roots[0]) / "new" / written.names[roots[0]]).stat().st_nlink == 3


def test_cross_device_link_falls_back_to_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = writer()
    roots = [str(tmp_path / "a"), str(tmp_path / "b")]
    for root in roots:
        w.ensure_maildir(root)
    real_link = os.link

    def link(src: str, dst: str) -> None:
        if dst.startswith(roots[1]) and "/a/" in src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst)

    monkeypatch.setattr("deliver.maildir.os.link", link)
    written, failures = w.write(b"", Body(size=3, bare_newlines=1, data=b"hi\n"), roots)
    assert failures == {}
    a, b = ((Path(r) / "new" / written.names[r]) for r in roots)
    assert a.read_bytes() == b.read_bytes() == b"hi\n"
    assert a.stat().st_ino != b.stat().st_ino
    assert list((Path(roots[1]) / "tmp").iterdir()) == []


def test_disk_full_while_writing_raises_and_cleans_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = writer()
    root = str(tmp_path / "m")
    w.ensure_maildir(root)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("deliver.maildir.os.fsync", full)
    with pytest.raises(OSError, match="No space") as info:
        w.write(b"", Body(size=1, bare_newlines=1, data=b"\n"), [root])
    assert info.value.errno == errno.ENOSPC
    assert list((Path(root) / "tmp").iterdir()) == []
    assert list((Path(root) / "new").iterdir()) == []


def test_spooled_body_is_copied(tmp_path: Path) -> None:
    w = writer()
    root = str(tmp_path / "m")
    w.ensure_maildir(root)
    data = b"line\n" * 100_000
    with open(tmp_path / "spool", "w+b") as spool:
        spool.write(data)
        written, _ = w.write(b"X: y\n", Body(size=len(data), bare_newlines=100_000, spool=spool), [root])
    assert (Path(root) / "new" / written.names[root]).read_bytes() == b"X: y\n" + data


def test_folder_dir_falls_back_to_inbox_or_creates(tmp_path: Path) -> None:
    w = writer()
    root = str(tmp_path / "m")
    w.ensure_maildir(root)
    assert w.folder_dir(root, "Sent", create=False) == folder_path(root, "Sent")
    assert w.folder_dir(root, "Lists", create=False) == root
    created = w.folder_dir(root, "Grüße", create=True)
    assert created == os.path.join(root, ".Gr&APwA3w-e")
    assert os.path.isfile(os.path.join(created, "maildirfolder"))


def test_stale_tmp_files_are_removed(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    old, fresh = tmp / "old", tmp / "fresh"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (1000, 1000))
    assert clean_stale(str(tmp), before=fresh.stat().st_mtime - 0.5) == 1
    assert not old.exists()
    assert fresh.exists()
    assert clean_stale(str(tmp), before=fresh.stat().st_mtime + 10) == 1


# -- quota ---------------------------------------------------------------------------------


def test_quota_usage_is_counted_written_and_appended(tmp_path: Path) -> None:
    w = writer()
    root = str(tmp_path / "m")
    w.ensure_maildir(root)
    w.write(b"", Body(size=100, bare_newlines=0, data=b"x" * 100), [root])
    w.write(b"", Body(size=50, bare_newlines=0, data=b"x" * 50), [folder_path(root, "Sent")])
    assert count_usage(root) == (150, 2)
    assert read_usage(root, 1000) == 150
    assert (Path(root) / "maildirsize").read_text() == "1000S\n150 2\n"
    add_usage(root, 25)
    assert read_usage(root, 1000) == 175
    # A different limit means a recount.
    assert read_usage(root, 2000) == 150


def test_quota_refusal_is_confirmed_by_a_recount(tmp_path: Path) -> None:
    w = writer()
    root = str(tmp_path / "m")
    w.ensure_maildir(root)
    (Path(root) / "maildirsize").write_text("1000S\n990 9\n")  # stale: nothing is stored
    clock = [0.0]
    tracker = QuotaTracker(None, clock=lambda: clock[0])
    check = tracker.check(root, 1000, 100)
    assert check.fits(100)
    assert check.used == 0
    (Path(root) / "maildirsize").write_text("1000S\n990 9\n")
    clock[0] = 10
    # Recounted less than a minute ago: the file is believed.
    assert not tracker.check(root, 1000, 100).fits(100)


@pytest.mark.parametrize("accepted", [0, 3, 5, 8, 100])
def test_write_both_finishes_a_short_writev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accepted: int
) -> None:
    """A writev that stops early (a disk filling up) is finished by plain writes, in order."""
    real = os.writev

    def short(fd: int, buffers: list[bytes]) -> int:
        return real(fd, [b"".join(buffers)[:accepted]])

    monkeypatch.setattr("deliver.files.os.writev", short)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        write_both(fd, b"head\n", b"body\n")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head\nbody\n"


def test_a_journal_line_waits_for_another_process_trim_and_lands_in_the_new_file(
    tmp_path: Path,
) -> None:
    """Workers (processes) share a Maildir's redelivery journal: an append that waited for
    another process's lock while that process trimmed (replaced the file) must go to the new
    file, not to the one the trim renamed away."""
    import fcntl
    import threading

    from deliver.maildir import JOURNAL
    from tests.rig import wait_until

    box = tmp_path / "Maildir"
    (box / "tmp").mkdir(parents=True)
    journal = box / JOURNAL
    journal.write_bytes(b"old-key old-name .\n")
    other = os.open(journal, os.O_WRONLY)
    fcntl.flock(other, fcntl.LOCK_EX)  # "another worker" is trimming

    def open_on_journal() -> bool:
        mine = {other}
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if int(fd) not in mine and os.readlink(f"/proc/self/fd/{fd}") == str(journal):
                    return True
        return False

    appending = threading.Thread(
        target=writer().record_delivery, args=(str(box), "new-key", str(box), "new-name")
    )
    appending.start()
    wait_until(open_on_journal, timeout=10, what="the append to open the journal")
    (box / "tmp" / "j").write_bytes(b"kept-key kept-name .\n")
    os.replace(box / "tmp" / "j", journal)
    os.close(other)
    appending.join(timeout=10)
    assert journal.read_bytes() == b"kept-key kept-name .\nnew-key new-name .\n"
