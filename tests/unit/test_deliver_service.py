"""deliver's service: recipient resolution through a real Store, Maildir deliveries, replies."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from deliver.envelope import Envelope, Recipient
from deliver.lmtp_codec import Reply
from deliver.maildir import Body
from deliver.metrics import DeliverMetrics
from deliver.service import DeliveryService, mail_root
from mailplugins.config import parse_config
from mailplugins.database import Database
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from mailplugins.metrics import DaemonMetrics
from mailplugins.store import Store
from tests.support.sync import SyncPool, result_of


@pytest.fixture
def make(tmp_path: Path) -> Any:
    def build(**deliver: Any) -> tuple[DeliveryService, Store]:
        data = {
            "database": {"url": f"sqlite:///{tmp_path}/mail.db"},
            "mail": {"location": f"{tmp_path}/vmail/%d/%n/Maildir", "uid": os.getuid(), "gid": os.getgid()},
            # The exact-bytes tests leave out the Received: line (its own tests turn it on).
            "deliver": {"listen": "tcp:0", "hostname": "vm", "received_header": False, **deliver},
        }
        config = parse_config(data)
        engine = make_engine(config.database)
        schema.upgrade(engine)
        store = Store(engine)
        if not store.is_local_domain("example.org"):
            store.add_domain("example.org")
            for user, quota in (("alice", 0), ("bob", 0), ("small", 50)):
                store.add_mailbox(f"{user}@example.org", "{PLAIN}x", quota_bytes=quota)
            store.add_mailbox("off@example.org", "{PLAIN}x")
            store.set_enabled("off@example.org", False)
            store.add_alias("team@example.org", ["alice@example.org", "bob@example.org"])
        clock = Clock()
        db = Database(clock, config.database, store=store)
        db.pool = SyncPool()  # type: ignore[assignment]
        service = DeliveryService(clock, config, db, SyncPool(), DeliverMetrics(DaemonMetrics("deliver")),
                                  clock=lambda: 1795313444.590986)
        return service, store

    return build


def maildir(tmp_path: Path, user: str) -> Path:
    return tmp_path / "vmail" / "example.org" / user / "Maildir"


def rcpt(service: DeliveryService, path: str, size: int | None = None, original: str | None = None) -> Any:
    return result_of(service.check_recipient(path, original, size))


def test_mail_root_of_location_templates() -> None:
    assert mail_root("/var/vmail/%d/%n/Maildir") == "/var/vmail/"
    assert mail_root("/srv/mail-%u") == "/srv"


@pytest.mark.parametrize(
    ("path", "code", "enhanced"),
    [("nobody@example.org", 550, "5.1.1"), ("off@example.org", 550, "5.2.1"),
     ("x@elsewhere.example", 550, "5.1.2"), ("not an address", 501, "5.1.3"),
     ("a%b@example.org", 550, "5.1.1")],
)
def test_rejections_at_rcpt(make: Any, path: str, code: int, enhanced: str) -> None:
    service, _store = make()
    reply = rcpt(service, path)
    assert isinstance(reply, Reply)
    assert (reply.code, reply.enhanced) == (code, enhanced)


def test_disabled_can_be_deferred(make: Any) -> None:
    service, _ = make(disabled="defer")
    reply = rcpt(service, "off@example.org")
    assert (reply.code, reply.enhanced) == (450, "4.2.1")


def test_database_down_is_451(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    service, store = make()

    def down(*args: Any) -> None:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(store, "resolve", down)
    reply = rcpt(service, "alice@example.org")
    assert (reply.code, reply.enhanced) == (451, "4.3.0")


def test_alias_and_detail_resolution(make: Any, tmp_path: Path) -> None:
    service, _ = make()
    team = rcpt(service, "team@example.org")
    assert isinstance(team, Recipient)
    expected = [str(maildir(tmp_path, "alice")), str(maildir(tmp_path, "bob"))]
    assert [t.maildir for t in team.targets] == expected
    detail = rcpt(service, "alice+Lists@example.org")
    assert [t.detail for t in detail.targets] == ["Lists"]


def test_declared_size_over_quota_is_refused_at_rcpt(make: Any) -> None:
    service, _ = make()
    assert isinstance(rcpt(service, "small@example.org", size=10), Recipient)
    reply = rcpt(service, "small@example.org", size=100)
    assert (reply.code, reply.enhanced) == (552, "5.2.2")
    service, _ = make(quota_tempfail=True)
    reply = rcpt(service, "small@example.org", size=100)
    assert (reply.code, reply.enhanced) == (452, "4.2.2")


def deliver(
    service: DeliveryService, paths: list[str], data: bytes, sender: str = "s@o.example"
) -> list[Reply]:
    envelope = Envelope("client", sender)
    for path in paths:
        recipient = rcpt(service, path)
        assert isinstance(recipient, Recipient), recipient
        envelope.recipients.append(recipient)
    body = Body(len(data), data.count(b"\n"), data=data)
    replies: list[Reply] = result_of(service.deliver(envelope, body))
    return replies


def test_delivery_replies_per_recipient_in_order(make: Any, tmp_path: Path) -> None:
    service, _ = make()
    data = b"Subject: hi\n\n" + b"z" * 60 + b"\n"
    replies = deliver(service, ["alice@example.org", "small@example.org", "alice+Lists@example.org"], data)
    assert [(r.code, r.enhanced) for r in replies] == [(250, "2.0.0"), (552, "5.2.2"), (250, "2.0.0")]
    files = sorted((maildir(tmp_path, "alice") / "new").iterdir())
    assert len(files) == 2  # no Lists folder and no autocreate: INBOX
    contents = {f.read_bytes() for f in files}
    assert contents == {
        b"Return-Path: <s@o.example>\nDelivered-To: alice@example.org\n" + data,
        b"Return-Path: <s@o.example>\nDelivered-To: alice+Lists@example.org\n" + data,
    }
    assert all(f.name.startswith("1795313444.M590986P") for f in files)
    small_new = maildir(tmp_path, "small") / "new"
    assert not small_new.exists() or not list(small_new.iterdir())


def test_detail_folder_autocreated_and_orcpt_header(make: Any, tmp_path: Path) -> None:
    service, _ = make(autocreate_detail_folders=True)
    envelope = Envelope("client", "")
    recipient = result_of(service.check_recipient("bob+Grüße@example.org", "Bob+Gruss@example.org", None))
    envelope.recipients.append(recipient)
    replies = result_of(service.deliver(envelope, Body(3, 1, data=b"x:\n")))
    assert replies[0].code == 250
    (path,) = (maildir(tmp_path, "bob") / ".Gr&APwA3w-e" / "new").iterdir()
    assert path.read_bytes() == (
        "Return-Path: <>\nDelivered-To: bob+Grüße@example.org\nX-Original-To: Bob+Gruss@example.org\nx:\n"
    ).encode()


def test_identical_content_is_hardlinked(make: Any, tmp_path: Path) -> None:
    service, _ = make(delivered_to="single")
    deliver(service, ["alice@example.org", "bob@example.org", "bob@example.org"], b"m\n")
    (a,) = (maildir(tmp_path, "alice") / "new").iterdir()
    (b,) = (maildir(tmp_path, "bob") / "new").iterdir()  # the duplicate RCPT is stored once
    assert a.stat().st_ino == b.stat().st_ino
    assert a.read_bytes() == b"Return-Path: <s@o.example>\nm\n"


def test_alias_recipient_hardlinks_with_delivered_to(make: Any, tmp_path: Path) -> None:
    service, _ = make()
    replies = deliver(service, ["team@example.org"], b"m\n")
    assert [r.code for r in replies] == [250]
    (a,) = (maildir(tmp_path, "alice") / "new").iterdir()
    (b,) = (maildir(tmp_path, "bob") / "new").iterdir()
    assert a.stat().st_ino == b.stat().st_ino
    assert b"Delivered-To: team@example.org\n" in a.read_bytes()


@pytest.mark.parametrize(("code", "reply"), [(errno.ENOSPC, (452, "4.2.2")), (errno.EDQUOT, (452, "4.2.2")),
                                             (errno.EIO, (451, "4.3.0"))])
def test_io_errors_map_to_replies(make: Any, monkeypatch: pytest.MonkeyPatch, code: int,
                                  reply: tuple[int, str]) -> None:
    service, _ = make()

    def broken(*args: Any) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(service.writer, "write", broken)
    replies = deliver(service, ["alice@example.org", "bob@example.org"], b"m\n")
    assert [(r.code, r.enhanced) for r in replies] == [reply, reply]


def test_quota_usage_is_tracked_after_delivery(make: Any, tmp_path: Path) -> None:
    service, _ = make()
    replies = deliver(service, ["small@example.org"], b"", sender="")
    assert replies[0].code == 250
    size = len(b"Return-Path: <>\nDelivered-To: small@example.org\n")
    text = (maildir(tmp_path, "small") / "maildirsize").read_text()
    assert text == f"50S\n0 0\n{size} 1\n"
    replies = deliver(service, ["small@example.org"], b"", sender="")
    assert (replies[0].code, replies[0].enhanced) == (552, "5.2.2")


def test_metrics_count_results(make: Any) -> None:
    service, _ = make()
    deliver(service, ["alice@example.org"], b"m\n")
    rcpt(service, "nobody@example.org")
    assert service.metrics.recipients["delivered"]._value.get() == 1
    assert service.metrics.recipients["unknown"]._value.get() == 1
    assert service.metrics.bytes_written._value.get() > 0


def test_found_recipients_are_cached_briefly_rejections_not(make: Any) -> None:
    service, store = make(lookup_cache_ttl=10)
    assert isinstance(rcpt(service, "alice@example.org"), Recipient)
    store.set_enabled("alice@example.org", False)
    assert isinstance(rcpt(service, "alice@example.org"), Recipient)
    service.reactor.advance(11)
    assert rcpt(service, "alice@example.org").code == 550
    assert rcpt(service, "carol@example.org").code == 550
    store.add_mailbox("carol@example.org", "{PLAIN}x")
    assert isinstance(rcpt(service, "carol@example.org"), Recipient)


class ManualPool:
    """A disk pool whose jobs run only when the test says so: the disk falling behind."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def run(self, fn: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((fn, args, d))
        return d

    def step(self) -> None:
        fn, args, d = self.jobs.pop(0)
        d.callback(fn(*args))


def test_spool_reads_on_while_the_disk_keeps_up_and_waits_when_it_falls_behind(tmp_path: Path) -> None:
    from deliver.spool import Spool

    pool = ManualPool()
    spool = Spool(str(tmp_path / "spool"), 1000, pool)
    assert spool.add(b"a" * 600) is None  # in memory
    assert spool.add(b"b" * 600) is None  # first batch goes to the disk; reading goes on
    assert len(pool.jobs) == 1
    waiting = spool.add(b"c" * 1000)  # second batch queued behind the first: wait
    assert waiting is not None and not waiting.called
    pool.step()  # the first batch is written
    assert waiting.called
    assert spool.add(b"d" * 1000) is not None  # "c" is not written yet: wait again
    pool.step()
    pool.step()
    assert spool.add(b"e" * 1000) is None  # caught up again
    pool.step()
    body = spool.finish(4200, 0)
    assert body.called
    result = result_of(body)
    assert isinstance(result, Body) and result.spool is not None
    result.spool.seek(0)
    assert result.spool.read() == b"a" * 600 + b"b" * 600 + b"c" * 1000 + b"d" * 1000 + b"e" * 1000
    result.close()


def spooled_delivery(service: DeliveryService, paths: list[str], data: bytes, *, finish: bool = True) -> Any:
    """DATA as the protocol streams it: through service.new_spool, past the memory limit."""
    envelope = Envelope("client", "s@o.example")
    for path in paths:
        recipient = rcpt(service, path)
        assert isinstance(recipient, Recipient), recipient
        envelope.recipients.append(recipient)
    spool = service.new_spool(envelope)
    for start in range(0, len(data), 4096):
        pending = spool.add(data[start : start + 4096])
        assert pending is None or pending.called  # the SyncPool disk never falls behind
    if not finish:
        return spool
    body = result_of(spool.finish(len(data), data.count(b"\n")))
    assert isinstance(body, Body)
    return result_of(service.deliver(envelope, body))


def everything_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_a_large_message_spools_into_maildir_tmp_and_is_linked_without_a_copy(
    make: Any, tmp_path: Path
) -> None:
    service, _ = make(memory_spool_limit=4096)
    data = b"Subject: big\n\n" + (b"y" * 79 + b"\n") * 1000
    spool = spooled_delivery(service, ["alice@example.org"], data, finish=False)
    (tmp_file,) = (maildir(tmp_path, "alice") / "tmp").iterdir()  # the spool is the tmp file
    assert tmp_file.stat().st_mode & 0o777 == 0o600
    body = result_of(spool.finish(len(data), data.count(b"\n")))
    inode = tmp_file.stat().st_ino
    envelope = Envelope("client", "s@o.example", recipients=[rcpt(service, "alice@example.org")])
    assert [r.code for r in result_of(service.deliver(envelope, body))] == [250]
    (new_file,) = (maildir(tmp_path, "alice") / "new").iterdir()
    assert new_file.stat().st_ino == inode  # linked, not copied
    header = b"Return-Path: <s@o.example>\nDelivered-To: alice@example.org\n"
    assert new_file.read_bytes() == header + data
    assert f",S={len(header) + len(data)}," in new_file.name
    assert not list((maildir(tmp_path, "alice") / "tmp").iterdir())
    spool_directory = Path(service.spool_directory)  # nothing spooled aside
    assert not spool_directory.exists() or not everything_under(spool_directory)


def test_spooled_message_for_several_headers_is_copied_after_the_first_header(
    make: Any, tmp_path: Path
) -> None:
    service, _ = make(memory_spool_limit=4096, delivered_to="always")
    data = b"line\n" * 3000
    replies = spooled_delivery(service, ["alice@example.org", "bob@example.org", "alice+x@example.org"], data)
    assert [r.code for r in replies] == [250, 250, 250]
    contents = sorted(f.read_bytes() for f in everything_under(tmp_path / "vmail") if f.parent.name == "new")
    assert contents == sorted(
        b"Return-Path: <s@o.example>\nDelivered-To: " + who + b"\n" + data
        for who in (b"alice@example.org", b"bob@example.org", b"alice+x@example.org")
    )
    for user in ("alice", "bob"):
        assert not list((maildir(tmp_path, user) / "tmp").iterdir())


def test_first_destination_over_quota_leaves_no_tmp_file(make: Any, tmp_path: Path) -> None:
    service, _ = make(memory_spool_limit=4096)
    data = (b"q" * 99 + b"\n") * 100  # 10,000 bytes: over small@'s 50-byte quota
    replies = spooled_delivery(service, ["small@example.org", "alice@example.org"], data)
    assert [(r.code, r.enhanced) for r in replies] == [(552, "5.2.2"), (250, "2.0.0")]
    assert not list((maildir(tmp_path, "small") / "tmp").iterdir())
    assert not list((maildir(tmp_path, "small") / "new").iterdir())
    (copy,) = (maildir(tmp_path, "alice") / "new").iterdir()
    assert copy.read_bytes().endswith(data)


def test_a_discarded_spool_removes_its_tmp_file(make: Any, tmp_path: Path) -> None:
    service, _ = make(memory_spool_limit=4096)
    spool = spooled_delivery(service, ["alice@example.org"], b"d" * 20000, finish=False)
    assert len(list((maildir(tmp_path, "alice") / "tmp").iterdir())) == 1
    spool.discard()  # the client went away mid-DATA
    assert not list((maildir(tmp_path, "alice") / "tmp").iterdir())
    assert not list((maildir(tmp_path, "alice") / "new").iterdir())


def deliver_with_ident(
    service: DeliveryService, paths: list[str], data: bytes, ident: str | None
) -> list[Reply]:
    envelope = Envelope("client", "s@o.example", ident=ident)
    for path in paths:
        envelope.recipients.append(rcpt(service, path))
    replies: list[Reply] = result_of(service.deliver(envelope, Body(len(data), data.count(b"\n"), data=data)))
    return replies


def saved(tmp_path: Path, user: str) -> list[Path]:
    box = maildir(tmp_path, user)
    return sorted(p for sub in ("new", "cur") if (box / sub).exists() for p in (box / sub).iterdir())


def test_a_retry_of_a_saved_queue_id_is_answered_250_and_not_saved_twice(make: Any, tmp_path: Path) -> None:
    service, _ = make()
    assert [r.code for r in deliver_with_ident(service, ["team@example.org"], b"m\n", "4Abc")] == [250]
    assert len(saved(tmp_path, "alice")) == len(saved(tmp_path, "bob")) == 1
    # Postfix lost the 250 (deliver was killed, or its data_done timeout hit) and retries.
    assert [r.code for r in deliver_with_ident(service, ["team@example.org"], b"m\n", "4Abc")] == [250]
    assert len(saved(tmp_path, "alice")) == len(saved(tmp_path, "bob")) == 1
    assert service.metrics.recipients["redelivery"]._value.get() == 2
    # Dovecot moved it to cur/ with flags: still recognised.
    (only,) = saved(tmp_path, "alice")
    only.rename(maildir(tmp_path, "alice") / "cur" / (only.name + ":2,S"))
    deliver_with_ident(service, ["alice@example.org"], b"m\n", "4Abc")
    deliver_with_ident(service, ["team@example.org"], b"m\n", "4Abc")
    assert len(saved(tmp_path, "alice")) == 2  # alice@ directly is another recipient: saved once
    assert len(saved(tmp_path, "bob")) == 1


def test_no_queue_id_or_another_one_is_always_saved(make: Any, tmp_path: Path) -> None:
    service, _ = make()
    for ident in (None, None, "4Abc", "4Abd"):
        deliver_with_ident(service, ["alice@example.org"], b"m\n", ident)
    assert len(saved(tmp_path, "alice")) == 4


def test_a_retry_after_the_user_deleted_the_copy_saves_it_again(make: Any, tmp_path: Path) -> None:
    service, _ = make()
    deliver_with_ident(service, ["alice@example.org"], b"m\n", "4Abc")
    (only,) = saved(tmp_path, "alice")
    only.unlink()
    deliver_with_ident(service, ["alice@example.org"], b"m\n", "4Abc")
    assert len(saved(tmp_path, "alice")) == 1  # never lost: the journal only skips what is there


def test_the_journal_stays_bounded(make: Any, tmp_path: Path) -> None:
    from deliver.maildir import JOURNAL, JOURNAL_LIMIT

    service, _ = make()
    for n in range(1200):
        deliver_with_ident(service, ["alice@example.org"], b"m\n", f"Q{n}")
    journal = maildir(tmp_path, "alice") / JOURNAL
    assert journal.stat().st_mode & 0o777 == 0o600
    assert journal.stat().st_size <= JOURNAL_LIMIT + 200
    assert not list((maildir(tmp_path, "alice") / "tmp").iterdir())  # the trims' files renamed away
    before = len(saved(tmp_path, "alice"))
    deliver_with_ident(service, ["alice@example.org"], b"m\n", "Q1199")  # a recent one: recognised
    assert len(saved(tmp_path, "alice")) == before


class Killed(BaseException):
    """SIGKILL at a chosen instant: nothing after it runs (no except Exception catches it)."""


@pytest.mark.parametrize("after_link", [True, False])
def test_a_kill_around_the_link_into_new_never_gives_a_duplicate_or_a_loss(
    make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_link: bool
) -> None:
    """Issue #14: killed between the link into new/ and the journal line, a retry stored the
    message again. The journal now names the file before the link can make it visible: the
    retry finds either nothing in new/ (stored again: no loss) or the file it names (250)."""
    service, _ = make()
    real_link = os.link

    def link_then_die(source: str, target: str) -> None:
        if after_link:
            real_link(source, target)
        raise Killed

    monkeypatch.setattr("deliver.maildir.os.link", link_then_die)
    with pytest.raises(Killed):
        deliver_with_ident(service, ["alice@example.org"], b"m\n", "4Kill")
    assert len(saved(tmp_path, "alice")) == (1 if after_link else 0)
    monkeypatch.setattr("deliver.maildir.os.link", real_link)
    # Postfix never got a reply: it sends the message again with the same queue ID.
    assert [r.code for r in deliver_with_ident(service, ["alice@example.org"], b"m\n", "4Kill")] == [250]
    assert len(saved(tmp_path, "alice")) == 1


# -- Received: (issue #15 item 9) and <postmaster> (item 5) -------------------------------


def test_received_line_in_dovecots_form_keeps_sizes_exact(make: Any, tmp_path: Path) -> None:
    service, _ = make(received_header=True, delivered_to="single")
    envelope = Envelope("client.example", "s@o.example", client_ip="192.0.2.7", timestamp=1795313444.0)
    envelope.recipients.append(rcpt(service, "alice@example.org"))
    (reply,) = result_of(service.deliver(envelope, Body(6, 3, data=b"x:\n\nm\n")))
    assert reply.text == f"<alice@example.org> {envelope.id} Saved"
    assert len(envelope.id) == 22
    (path,) = (maildir(tmp_path, "alice") / "new").iterdir()
    stored = path.read_bytes()
    assert stored == (
        b"Return-Path: <s@o.example>\nDelivered-To: alice@example.org\n"
        b"Received: from client.example ([192.0.2.7])\n\tby vm with LMTP\n\tid "
        + envelope.id.encode() + b"\n\t(envelope-from <s@o.example>)\n\tfor <alice@example.org>; "
        b"Sun, 22 Nov 2026 02:10:44 +0000\nx:\n\nm\n"
    )
    lines = stored.count(b"\n")
    assert path.name.endswith(f",S={len(stored)},W={len(stored) + lines}")


def test_received_line_without_for_when_several_recipients_share_one_file(
    make: Any, tmp_path: Path
) -> None:
    service, _ = make(received_header=True, delivered_to="single")
    envelope = Envelope("client.example", "s@o.example")  # a UNIX socket: no client IP
    for path in ("alice@example.org", "bob@example.org"):
        envelope.recipients.append(rcpt(service, path))
    result_of(service.deliver(envelope, Body(2, 1, data=b"m\n")))
    (a,) = (maildir(tmp_path, "alice") / "new").iterdir()
    (b,) = (maildir(tmp_path, "bob") / "new").iterdir()
    assert a.stat().st_ino == b.stat().st_ino
    header = a.read_bytes().split(b"\nm\n")[0]
    assert header.startswith(b"Return-Path: <s@o.example>\nReceived: from client.example\n\tby vm with LMTP")
    assert b"(envelope-from <s@o.example>); " in header
    assert b"for <" not in header


def test_received_header_can_be_turned_off(make: Any, tmp_path: Path) -> None:
    service, _ = make(received_header=False)
    deliver(service, ["alice@example.org"], b"m\n")
    (path,) = (maildir(tmp_path, "alice") / "new").iterdir()
    assert b"Received:" not in path.read_bytes()


@pytest.mark.parametrize("path", ["postmaster", "PostMaster", "POSTMASTER"])
def test_postmaster_goes_to_the_configured_address(make: Any, tmp_path: Path, path: str) -> None:
    service, _ = make(postmaster="bob@example.org")
    recipient = rcpt(service, path)
    assert isinstance(recipient, Recipient)
    assert [t.address for t in recipient.targets] == ["bob@example.org"]
    envelope = Envelope("client", "s@o.example")
    envelope.recipients.append(recipient)
    assert [r.code for r in result_of(service.deliver(envelope, Body(2, 1, data=b"m\n")))] == [250]
    (stored,) = (maildir(tmp_path, "bob") / "new").iterdir()
    assert b"Delivered-To: " + path.encode() + b"\n" in stored.read_bytes()


def test_postmaster_defaults_to_postmaster_of_the_first_local_domain(make: Any) -> None:
    service, store = make()
    reply = rcpt(service, "postmaster")
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert "<postmaster> goes to <postmaster@example.org>, which cannot receive mail" in reply.text
    store.add_domain("aaa.example")  # alphabetically first now
    store.add_alias("postmaster@aaa.example", ["alice@example.org"])
    recipient = rcpt(service, "postmaster")
    assert [t.address for t in recipient.targets] == ["alice@example.org"]


def test_postmaster_without_any_local_domain_is_refused_with_the_reason(make: Any) -> None:
    service, store = make()
    for domain in store.list_domains():
        store.remove_domain(domain.name, force=True)
    reply = rcpt(service, "postmaster")
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert "set deliver.postmaster" in reply.text


def test_a_utf8_mailbox_is_found(make: Any) -> None:
    service, store = make()
    store.add_mailbox("jösé@example.org", "{PLAIN}x")
    recipient = rcpt(service, "JÖSÉ@example.org")
    assert isinstance(recipient, Recipient)
    assert [t.address for t in recipient.targets] == ["jösé@example.org"]


def test_a_large_message_with_the_received_line_is_still_linked_without_a_copy(
    make: Any, tmp_path: Path
) -> None:
    """The Received: line is fixed at MAIL (id, date), so the header written at the start of
    the spool file is the one the delivery wants: the spool file itself is linked into new/."""
    service, _ = make(memory_spool_limit=4096, received_header=True)
    envelope = Envelope("client.example", "s@o.example", timestamp=1795313444.0)
    envelope.recipients.append(rcpt(service, "alice@example.org"))
    data = b"Subject: big\n\n" + (b"y" * 79 + b"\n") * 1000
    spool = service.new_spool(envelope)
    for start in range(0, len(data), 4096):
        spool.add(data[start : start + 4096])
    (tmp_file,) = (maildir(tmp_path, "alice") / "tmp").iterdir()
    inode = tmp_file.stat().st_ino
    body = result_of(spool.finish(len(data), data.count(b"\n")))
    assert [r.code for r in result_of(service.deliver(envelope, body))] == [250]
    (new_file,) = (maildir(tmp_path, "alice") / "new").iterdir()
    assert new_file.stat().st_ino == inode
    stored = new_file.read_bytes()
    assert stored.endswith(b"; Sun, 22 Nov 2026 02:10:44 +0000\n" + data)
    lines = stored.count(b"\n")
    assert f",S={len(stored)},W={len(stored) + lines}" in new_file.name


def test_a_delivery_racing_a_reload_uses_the_snapshot_it_started_with(make: Any, tmp_path: Path) -> None:
    """Issue 14: a reload between the start of a delivery and its disk work must not change
    the hostname (file name), Delivered-To mode or folder rules that one delivery uses."""
    service, _ = make(hostname="vm", delivered_to="always", autocreate_detail_folders=False)
    envelope = Envelope("client", "s@o.example")
    recipient = rcpt(service, "alice+Lists@example.org")
    assert isinstance(recipient, Recipient)
    envelope.recipients.append(recipient)
    data = b"Subject: race\n\nbody\n"
    disk = ManualPool()
    service.disk = disk
    started = service.deliver(envelope, Body(len(data), data.count(b"\n"), data=data))
    old_writer, old_quota = service.writer, service.quota

    new_settings = dataclasses.replace(
        service.settings, hostname="vm2", delivered_to="never", autocreate_detail_folders=True
    )
    service.reload(dataclasses.replace(service.config, deliver=new_settings))
    assert service.settings.hostname == "vm2"
    assert service.writer is not old_writer and service.quota is not old_quota

    disk.step()  # the disk work runs only now, after the reload
    replies: list[Reply] = result_of(started)
    assert [(r.code, r.enhanced) for r in replies] == [(250, "2.0.0")]
    files = list((maildir(tmp_path, "alice") / "new").iterdir())
    assert len(files) == 1  # INBOX: the old snapshot does not autocreate the Lists folder
    assert not (maildir(tmp_path, "alice") / ".Lists").exists()
    assert ".vm," in files[0].name  # the old writer's hostname
    assert files[0].read_bytes().startswith(
        b"Return-Path: <s@o.example>\nDelivered-To: alice+Lists@example.org\n"
    )  # the old Delivered-To mode


def test_the_writers_of_two_snapshots_share_one_journal_lock(make: Any) -> None:
    """A delivery finishing on the old writer and one starting on the new must not append
    to the same redelivery journal at once."""
    service, _ = make()
    old = service.current.writer
    service.reload(service.config)
    assert service.current.writer is not old
    assert service.current.writer._journal_lock is old._journal_lock


def test_a_reload_during_data_leaves_the_message_on_the_snapshot_data_started_with(
    make: Any, tmp_path: Path
) -> None:
    """The snapshot is taken when DATA starts: a large message spooled into the old writer's
    Maildir tmp/ is delivered with the old settings, not the ones a reload brought mid-DATA."""
    service, _ = make(hostname="vm", memory_spool_limit=4096, delivered_to="always")
    envelope = Envelope("client", "s@o.example")
    recipient = rcpt(service, "alice@example.org")
    assert isinstance(recipient, Recipient)
    envelope.recipients.append(recipient)
    data = b"Subject: big\n\n" + b"x" * 10000 + b"\n"
    spool = service.new_spool(envelope)
    spool.add(data[:6000])
    new_settings = dataclasses.replace(service.settings, hostname="vm2", delivered_to="never")
    service.reload(dataclasses.replace(service.config, deliver=new_settings))
    spool.add(data[6000:])
    body = result_of(spool.finish(len(data), data.count(b"\n")))
    assert isinstance(body, Body)
    replies: list[Reply] = result_of(service.deliver(envelope, body))
    assert [(r.code, r.enhanced) for r in replies] == [(250, "2.0.0")]
    files = list((maildir(tmp_path, "alice") / "new").iterdir())
    assert len(files) == 1 and ".vm," in files[0].name
    assert files[0].read_bytes() == (
        b"Return-Path: <s@o.example>\nDelivered-To: alice@example.org\n" + data
    )
    assert everything_under(maildir(tmp_path, "alice") / "tmp") == []
