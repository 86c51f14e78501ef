"""The LMTP differential suite: the same sessions to stock Dovecot's LMTP and to deliver.

Every case is a session (the bytes, cut into the chunks they are sent in: pipelined in one
write, or split inside a command or inside CRLF.CRLF) sent once to Dovecot's own LMTP server
and once to deliver, both over TCP on loopback, both serving the same users and writing Maildir
under their own root. The outcome compared is what a client and a mailbox owner see:

- the replies: code, enhanced code, order and count (the text is free);
- for ``LHLO``, where a case asks, the capability keywords;
- the files the session stored: user, folder, ``new/``, the bytes (each server's transaction
  ID and date in its ``Received:`` line are replaced by placeholders), the mode, the link count,
  and whether the name's ``S=``/``W=`` are exact for the bytes.

A case whose outcomes differ must be listed in the ``## LMTP (deliver)`` table of
``docs/dovecot-differences.md`` with the reason; a listed case that no longer differs fails
too. deliver runs with the settings that mirror Dovecot's where deliver has one:
``delivered_to: single`` (Dovecot writes ``Delivered-To`` only for a single recipient and
hard-links one file for all) and ``+detail`` into an existing folder only
(``lmtp_save_to_detail_mailbox = yes`` without autocreate). Dovecot's userdb is a passwd-file
holding the same users; a disabled mailbox is absent from it (Dovecot's LMTP has no
"disabled" state of its own). The module runs once per Dovecot release the rig covers
(the ``release`` fixture: Debian 12's 2.3 and Debian 13's 2.4), deliver being the same.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devrig.instances import dovecot_mail_location, dovecot_passwd_file
from devrig.release import Release
from tests.rig import Daemons, Dovecot, RigFactory, free_port, port_open, wait_until
from tests.support.differences import allowed_differences, unexpected, unused
from tests.support.exim import Exim

pytestmark = pytest.mark.e2e

SECTION = "LMTP (deliver)"
NOBODY = 65534
DOMAIN = "example.org"
HOSTNAME = "deliver.test"
MAX_SIZE = 100_000
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "jösé"] + [f"u{n:02d}" for n in range(12)]
#: A mailbox deliver knows but refuses (disabled); absent from Dovecot's userdb.
DISABLED = "off"
#: Pause between the chunks of one session, so the server reads them apart (TCP_NODELAY).
CHUNK_PAUSE = 0.05


@dataclass
class Server:
    name: str
    port: int
    mail_root: Path

    def maildir(self, user: str) -> Path:
        return self.mail_root / DOMAIN / user / "Maildir"


@dataclass
class Pair:
    dovecot: Server
    deliver: Server
    dovecot_instance: Dovecot
    daemons: Daemons


def make_folder(maildir: Path, folder: str) -> None:
    """A Maildir++ folder (``.Lists``) in ``maildir``, owned by the mail user, as both
    servers find it when the mailbox exists already."""
    for path in (maildir, maildir / folder):
        for sub in ("", "cur", "new", "tmp"):
            (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(path / sub, NOBODY, NOBODY)
    (maildir / folder / "maildirfolder").touch()
    os.chown(maildir / folder / "maildirfolder", NOBODY, NOBODY)
    for parent in (maildir.parent, maildir.parent.parent):
        os.chown(parent, NOBODY, NOBODY)


@pytest.fixture(scope="module")
def pair(release: Release) -> Iterator[Pair]:
    factory = RigFactory(release, "mpx-")
    root = factory.root
    ours, theirs = root / "ours", root / "theirs"
    for path in (ours, theirs):
        path.mkdir()
        os.chown(path, NOBODY, NOBODY)
    deliver_port, lmtp_port = free_port(), free_port()
    daemons = factory.daemons({
        "mail": {"location": f"{ours}/%d/%n/Maildir", "uid": NOBODY, "gid": NOBODY,
                 "recipient_delimiter": "+"},
        "deliver": {
            "listen": f"tcp:{deliver_port}:interface=127.0.0.1",
            "hostname": HOSTNAME,
            "delivered_to": "single",
            "max_message_size": MAX_SIZE,
            "default_folders": [],
        },
    }, ["deliver"])
    store = daemons.store
    store.add_domain(DOMAIN)
    passwd = []
    for user in USERS:
        store.add_mailbox(f"{user}@{DOMAIN}", "{PLAIN}unused")
        passwd.append(f"{user}@{DOMAIN}::{NOBODY}:{NOBODY}::{theirs}/{DOMAIN}/{user}::")
    store.add_mailbox(f"{DISABLED}@{DOMAIN}", "{PLAIN}unused")
    store.set_enabled(f"{DISABLED}@{DOMAIN}", False)
    store.add_alias(f"postmaster@{DOMAIN}", [f"alice@{DOMAIN}"])
    passwd.append(f"postmaster@{DOMAIN}::{NOBODY}:{NOBODY}::{theirs}/{DOMAIN}/alice::")
    users_file = root / "users"
    users_file.write_text("\n".join(passwd) + "\n", encoding="utf-8")
    for mail_root in (ours, theirs):
        make_folder(mail_root / DOMAIN / "bob" / "Maildir", ".Lists")
    dovecot = factory.dovecot(lmtp_port=lmtp_port, protocols=(), conf=(
        dovecot_mail_location(release, f"maildir:{theirs}/%d/%n/Maildir")
        + f"""mail_uid = {NOBODY}
mail_gid = {NOBODY}
first_valid_uid = 1
hostname = {HOSTNAME}
recipient_delimiter = +
lmtp_save_to_detail_mailbox = yes
"""
        + dovecot_passwd_file(release, users_file)))
    try:
        factory.start(daemons)
        factory.start(dovecot)
        wait_until(lambda: port_open(deliver_port), what="deliver's LMTP port")
        yield Pair(Server("dovecot", lmtp_port, theirs), Server("deliver", deliver_port, ours),
                   dovecot, daemons)
    finally:
        factory.close()


# -- sessions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    #: The session, cut where the client's writes are cut; QUIT is appended as its own write.
    chunks: tuple[bytes, ...]
    #: Compare LHLO's capability keywords too (only where the case is about them).
    capabilities: bool = False


def envelope(*rcpts: str, mail: str = "MAIL FROM:<s@origin.test>", lhlo: str = "LHLO client.test") -> bytes:
    lines = [lhlo, mail, *(f"RCPT TO:<{r}>" for r in rcpts)]
    return "".join(line + "\r\n" for line in lines).encode()


def transaction(*rcpts: str, data: bytes = b"Subject: t\r\n\r\nhello\r\n", **kw: str) -> bytes:
    return envelope(*rcpts, **kw) + b"DATA\r\n" + data + b".\r\n"


def at(user: str) -> str:
    return f"{user}@{DOMAIN}"


LONG = b"L" * 10_000
CASES = [
    Case("lhlo", (b"LHLO client.test\r\n",), capabilities=True),
    Case("lhlo-without-name", (b"LHLO\r\n",)),
    Case("helo", (b"HELO client.test\r\n",)),
    Case("ehlo", (b"EHLO client.test\r\n",)),
    Case("mail-before-lhlo", (b"MAIL FROM:<s@origin.test>\r\n",)),
    Case("rcpt-before-mail", (b"LHLO client.test\r\nRCPT TO:<" + at("alice").encode() + b">\r\n",)),
    Case("nested-mail", (envelope() + b"MAIL FROM:<t@origin.test>\r\n",)),
    Case("data-without-rcpt", (envelope() + b"DATA\r\n",)),
    Case("data-all-rcpts-refused", (envelope(at("nobody")) + b"DATA\r\n",)),
    Case("unknown-command", (b"LHLO client.test\r\nFROB\r\n",)),
    Case("xforward", (b"LHLO client.test\r\nXFORWARD NAME=spike.test ADDR=192.0.2.1 IDENT=4Abc\r\n"
                      + transaction(at("alice"), lhlo="NOOP"),)),
    Case("bdat", (envelope(at("alice")) + b"BDAT 23 LAST\r\nSubject: b\r\n\r\nchunked\r\n",)),
    Case("noop-vrfy-help", (b"LHLO client.test\r\nNOOP\r\nVRFY alice\r\nHELP\r\n",)),
    Case("basic", (transaction(at("alice")),)),
    Case("basic-lockstep", (b"LHLO client.test\r\n", b"MAIL FROM:<s@origin.test>\r\n",
                            f"RCPT TO:<{at('alice')}>\r\n".encode(), b"DATA\r\n",
                            b"Subject: t\r\n\r\nhello\r\n.\r\n")),
    Case("null-sender", (transaction(at("alice"), mail="MAIL FROM:<>"),)),
    Case("mail-size", (transaction(at("alice"), mail="MAIL FROM:<s@origin.test> SIZE=100"),)),
    Case("mail-size-over-limit", (envelope(mail=f"MAIL FROM:<s@origin.test> SIZE={MAX_SIZE * 2}"),)),
    Case("mail-body-8bitmime", (transaction(at("alice"), mail="MAIL FROM:<s@origin.test> BODY=8BITMIME"),)),
    Case("mail-body-binarymime", (envelope(mail="MAIL FROM:<s@origin.test> BODY=BINARYMIME"),)),
    Case("mail-unknown-param", (envelope(mail="MAIL FROM:<s@origin.test> FROB=1"),)),
    Case("mail-ret-envid", (envelope(mail="MAIL FROM:<s@origin.test> RET=HDRS ENVID=x"),)),
    Case("rcpt-notify", (envelope() + f"RCPT TO:<{at('alice')}> NOTIFY=NEVER\r\n".encode(),)),
    Case("rcpt-notify-bogus", (envelope() + f"RCPT TO:<{at('alice')}> NOTIFY=BOGUS\r\n".encode(),)),
    Case("rcpt-orcpt", (envelope() + f"RCPT TO:<{at('alice')}> ORCPT=rfc822;{at('alice')}\r\n".encode(),)),
    Case("rcpt-unknown-param", (envelope() + f"RCPT TO:<{at('alice')}> FROB=1\r\n".encode(),)),
    Case("mail-smtputf8", (transaction(at("alice"), mail="MAIL FROM:<s@origin.test> SMTPUTF8"),)),
    Case("utf8-without-smtputf8", (envelope(at("jösé")),)),
    Case("utf8-with-smtputf8", (transaction(at("jösé"), mail="MAIL FROM:<ső@origin.test> SMTPUTF8"),)),
    Case("rcpt-no-brackets", (envelope() + f"RCPT TO:{at('alice')}\r\n".encode(),)),
    Case("unknown-user", (envelope(at("nobody")),)),
    Case("unknown-domain", (envelope("alice@elsewhere.example"),)),
    Case("disabled-user", (envelope(at(DISABLED)),)),
    Case("postmaster", (transaction("postmaster"),)),
    Case("postmaster-mixed-case", (transaction("PostMaster"),)),
    Case("detail-existing-folder", (transaction(at("bob+Lists")),)),
    Case("detail-missing-folder", (transaction(at("bob+Nope")),)),
    Case("duplicate-rcpt", (transaction(at("carol"), at("carol")),)),
    Case("many-rcpts", (transaction(*(at(f"u{n:02d}") for n in range(12)), at("nobody"), at("u00")),)),
    Case("mixed-rcpts", (transaction(at("dave"), at("nobody"), at("erin")),)),
    Case("rset", (envelope(at("alice")) + b"RSET\r\n" + transaction(at("bob"), lhlo="NOOP"),)),
    Case("two-transactions", (transaction(at("alice")) + transaction(at("bob"), lhlo="NOOP"),)),
    Case("dot-stuffing-crlf", (transaction(at("alice"), data=b"Subject: d\r\n\r\n..one\r\n...two\r\n"),)),
    Case("dot-stuffing-bare-lf",
         (transaction(at("alice"), data=b"Subject: x\n\n..dot line\n...two\nend\r\n"),)),
    Case("lf-dot-lf", (transaction(at("alice"), data=b"Subject: x\r\n\r\nbefore\n.\nafter\r\n"),)),
    Case("lf-dot-crlf", (transaction(at("alice"), data=b"Subject: x\r\n\r\nbefore\n.\r\nafter\r\n"),)),
    Case("bare-cr", (transaction(at("alice"), data=b"Subject: x\r\n\r\nlone\rCR\r\r\n\rstart\r\n"),)),
    Case("dot-bare-cr", (transaction(at("alice"), data=b"Subject: x\r\n\r\n.\rx\r\nnext\r\n"),)),
    Case("bare-lf-only", (transaction(at("alice"), data=b"Subject: x\n\nbody\nmore\n\r\n"),)),
    Case("nul-byte", (transaction(at("alice"), data=b"Subject: x\r\n\r\nnul\x00here\r\n"),)),
    Case("long-line", (transaction(at("alice"), data=b"Subject: x\r\n\r\n" + LONG + b"\r\n"),)),
    Case("long-command-line", (b"LHLO client.test\r\nNOOP " + b"n" * 5000 + b"\r\nNOOP\r\n",)),
    Case("missing-final-crlf", (envelope(at("alice")) + b"DATA\r\nSubject: x\r\n\r\nno end",
                                b"\r\n.\r\n")),
    Case("empty-message", (transaction(at("alice"), data=b""),)),
    Case("8bit-headers",
         (transaction(at("alice"), data="Subject: Grüße\r\nFrom: Jösé <j@x>\r\n\r\nö\r\n".encode()),)),
    Case("split-terminator", (envelope(at("alice")) + b"DATA\r\nSubject: s\r\n\r\nbody\r", b"\n.",
                              b"\r", b"\nNOOP\r\n")),
    Case("split-commands", (b"LH", b"LO client.test\r\nMAIL FR", b"OM:<s@origin.test>\r",
                            f"\nRCPT TO:<{at('alice')}>\r\nDA".encode(),
                            b"TA\r\nSubject: s\r\n\r\nx\r\n.\r\n")),
    Case("too-big", (transaction(at("alice"), data=b"Subject: big\r\n\r\n" + (b"b" * 98 + b"\r\n") * 1500),)),
]


# -- outcomes ------------------------------------------------------------------------------

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")
_ENHANCED = re.compile(rb"^([245]\.\d{1,3}\.\d{1,3})(?: |$)")


@dataclass
class Outcome:
    replies: list[tuple[int, str]] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    files: list[tuple[str, str, bytes, int, int, bool]] = field(default_factory=list)
    transcript: bytes = b""

    def key(self, capabilities: bool) -> tuple[object, ...]:
        return (self.replies, self.capabilities if capabilities else None, sorted(self.files))


def parse_replies(raw: bytes) -> tuple[list[tuple[int, str]], list[str]]:
    """(code, enhanced code) per reply, multi-line replies joined; LHLO's keywords."""
    replies: list[tuple[int, str]] = []
    capabilities: list[str] = []
    lines: list[bytes] = []
    for line in raw.split(b"\r\n"):
        match = _REPLY_LINE.match(line)
        if match is None:
            continue
        lines.append(match.group(3))
        if match.group(2) == b"-":
            continue
        code = int(match.group(1))
        enhanced = _ENHANCED.match(lines[0])
        if len(lines) > 1 and code == 250 and not capabilities:
            capabilities = sorted(text.split(b" ")[0].decode().upper() for text in lines[1:])
        replies.append((code, enhanced.group(1).decode() if enhanced and len(lines) == 1 else ""))
        lines = []
    return replies, capabilities


def run_session(port: int, case: Case) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in (*case.chunks, b"QUIT\r\n"):
            sock.sendall(chunk)
            time.sleep(CHUNK_PAUSE)  # pacing, so the server reads the chunks apart
        received = b""
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            received += data
        return received


def snapshot(server: Server) -> set[Path]:
    return {p for p in server.mail_root.rglob("*") if p.is_file() and p.parent.name in ("new", "cur")}


#: Dovecot's IDs get ":T<n>" for the n-th transaction of a session.
_RECEIVED_ID = re.compile(rb"(\n\tid )[A-Za-z0-9+/]{10,40}(?::T\d+)?(\n)")
_RECEIVED_DATE = re.compile(rb"(\n\t[^\n]*?; )[A-Z][a-z]{2}, [^\n]*(\n)")
_SIZES = re.compile(r",S=(\d+),W=(\d+)")


def normalise(content: bytes) -> bytes:
    """The bytes with each server's own transaction ID and date in Received: as placeholders."""
    head, sep, body = content.partition(b"\n\n")
    head = _RECEIVED_ID.sub(rb"\1<id>\2", head, count=1)
    head = _RECEIVED_DATE.sub(rb"\1<date>\2", head + b"\n", count=1)[:-1]
    return head + sep + body


def stored_file(server: Server, path: Path) -> tuple[str, str, bytes, int, int, bool]:
    relative = path.relative_to(server.mail_root / DOMAIN)
    user = relative.parts[0]
    folder = "/".join(relative.parts[2:-1])  # e.g. ".Lists/new" or "new"
    content = path.read_bytes()
    info = path.stat()
    sizes = _SIZES.search(path.name)
    bare = len(re.findall(rb"(?<!\r)\n", content))
    exact = sizes is not None and (int(sizes[1]), int(sizes[2])) == (len(content), len(content) + bare)
    return user, folder, normalise(content), info.st_mode & 0o7777, info.st_nlink, exact


def outcome(server: Server, case: Case) -> Outcome:
    before = snapshot(server)
    raw = run_session(server.port, case)
    replies, capabilities = parse_replies(raw)
    files = [stored_file(server, path) for path in sorted(snapshot(server) - before)]
    return Outcome(replies, capabilities, files, raw)


def describe(name: str, result: Outcome) -> str:
    files = "\n".join(f"    {user} {folder} mode={mode:o} links={links} S/W exact={exact}\n"
                      f"      {content[:600]!r}"
                      for user, folder, content, mode, links, exact in result.files)
    return (f"  {name}: replies {result.replies}\n  capabilities {result.capabilities}\n"
            f"  transcript {result.transcript[:1500]!r}\n  files:\n{files}")


def listed_as(case: Case, release: Release) -> str:
    """The row that covers ``case`` on ``release``: ``<case>.dovecot<major>.<minor>`` when the
    table has one (a difference with that Dovecot release only), else ``<case>``."""
    major, minor = release.dovecot_version
    specific = f"{case.id}.dovecot{major}.{minor}"
    return specific if specific in allowed_differences(SECTION) else case.id


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_lmtp_session_like_dovecot(pair: Pair, case: Case, release: Release) -> None:
    theirs = outcome(pair.dovecot, case)
    ours = outcome(pair.deliver, case)
    # Our own files are always exact (S=/W=, 0600), whatever Dovecot does.
    assert all(exact and mode == 0o600 for *_, mode, _links, exact in ours.files), describe("deliver", ours)
    row = listed_as(case, release)
    differing = {row} if theirs.key(case.capabilities) != ours.key(case.capabilities) else set()
    detail = f"\n{describe('dovecot', theirs)}\n{describe('deliver', ours)}"
    assert not unexpected(differing, SECTION), (
        f"case {row!r} differs from Dovecot {release.dovecot_version} and is not listed in "
        "docs/dovecot-differences.md" + detail)
    assert not unused(differing, SECTION, {row}), (
        f"case {row!r} is listed in docs/dovecot-differences.md but no longer differs" + detail)


def test_every_listed_case_exists() -> None:
    """A row in the table names a case of this suite (no stale rows for removed cases),
    optionally for one Dovecot release (``.dovecot2.4``)."""
    rows = {re.sub(r"\.dovecot\d+\.\d+$", "", row) for row in allowed_differences(SECTION)}
    assert rows <= {case.id for case in CASES}


# -- Exim as a second LMTP client ----------------------------------------------------------

#: With From:, Date: and Message-ID: given, Exim adds only its Received: line.
EXIM_HEADER = b"From: s@origin.test\nDate: Fri, 04 Dec 2026 12:00:00 +0000\nMessage-ID: <exim@origin.test>\n"
EXIM_MESSAGES = [
    ("plain", [at("frank")], EXIM_HEADER + b"Subject: exim\n\nhello\n.dot\n..two\n.\nend\n"),
    ("mixed", [at("frank"), at("nobody"), at(DISABLED), at("erin")],
     EXIM_HEADER + b"Subject: exim mixed\n\nbody\n"),
    ("detail-8bit", [at("bob+Lists")], EXIM_HEADER + "Subject: Grüße\n\nÖl\n".encode()),
]
#: What Exim itself adds (its Received: line with its queue ID and the date): not compared.
_EXIM_RECEIVED = re.compile(rb"\nReceived: from \S+ by exim\.test with local \(Exim [^)]*\)\n(?:\t[^\n]*\n)*")


@pytest.fixture(scope="module")
def exim(pair: Pair) -> Exim:
    return Exim(pair.dovecot.mail_root.parent / "exim")


@pytest.mark.parametrize(("name", "recipients", "message"), EXIM_MESSAGES,
                         ids=[name for name, _, _ in EXIM_MESSAGES])
def test_exim_as_lmtp_client_gets_the_same_outcome(
    pair: Pair, exim: Exim, name: str, recipients: list[str], message: bytes
) -> None:
    """Exim's lmtp transport (a real client: its own pipelining and dot-stuffing) delivers the
    same message through Dovecot and through deliver: each recipient's result in Exim's log
    (delivered, bounced with which code) and the stored files must agree, apart from the
    deliberate differences (a disabled mailbox gets 5.2.1, see the table)."""
    outcomes = {}
    for server in (pair.dovecot, pair.deliver):
        before = snapshot(server)
        results = exim.send(server.port, "s@origin.test", recipients, message)
        files = sorted(stored_file(server, path) for path in snapshot(server) - before)
        outcomes[server.name] = (
            {rcpt: (r.marker, r.code) for rcpt, r in results.items()},
            [(user, folder, _EXIM_RECEIVED.sub(b"\n", content), mode, links, exact)
             for user, folder, content, mode, links, exact in files],
        )
    theirs, ours = outcomes["dovecot"], outcomes["deliver"]
    assert any(marker == "=>" for marker, _code in theirs[0].values()), theirs
    assert ours == theirs, f"\ndovecot {theirs}\ndeliver {ours}"
    assert all(b"(Exim" not in content for _u, _f, content, *_ in ours[1])  # compared without it
