"""The auth-client differential suite: the same sessions to stock Dovecot and to authd.

Stock Dovecot's auth process (a passwd-file with the same users and the same hashes, a master
passdb with the same master user, ``auth_master_user_separator = *``) and authd (the same users
in its database) each get the same client bytes, with the same split points and the same
pipelining. The replies are compared as a client sees them: per line the command (OK, FAIL,
CONT), the request id, ``user=``, ``code=`` and the CONT data, in order, with their count, and
whether the server closed the connection. Reasons are not compared (Postfix shows them, no client
acts on them); SPID, CUID and COOKIE values differ by nature.

A difference is allowed only for a case listed in the ``## Auth-client (authd)`` table of
docs/dovecot-differences.md (tests/support/differences.py); the suite fails on any other
difference, and on a listed case that no longer differs. Failure delays are 0 on both sides
(Dovecot's anvil penalty is off) so the suite measures replies, not timing.
"""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devrig.release import Release
from mailplugins.hashing import hash_password
from tests.rig import Daemons, Dovecot, RigFactory, wait_until
from tests.support.differences import allowed_differences, unexpected, unused

pytestmark = pytest.mark.e2e

SECTION = "Auth-client (authd)"
QUIET = 1.5  # seconds without a byte after which a session is over (Dovecot flushes failures
#              by a 500 ms timer even with auth_failure_delay = 0)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}".encode())


ALICE = plain("alice@example.org", "alice-pw")
HELLO = b"VERSION\t1\t0\nCPID\t4242\n"
HELLO24 = b"VERSION\t1\t3\nCPID\t4242\n"


def auth(request_id: int, resp: str | None = None, *, mech: str = "PLAIN",
         params: str = "service=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.7") -> bytes:
    line = f"AUTH\t{request_id}\t{mech}\t{params}"
    if resp is not None:
        line += f"\tresp={resp}"
    return (line + "\n").encode()


def cont(request_id: int, data: str) -> bytes:
    return f"CONT\t{request_id}\t{data}\n".encode()


@dataclass(frozen=True)
class Case:
    """One session: ``chunks`` are written in order, ``replies`` is how many lines to expect."""

    id: str
    chunks: tuple[bytes, ...]
    replies: int
    #: Only against these Dovecot releases ("2.3", "2.4"); empty: every release.
    only: tuple[str, ...] = ()


def whole(case_id: str, data: bytes, replies: int, only: tuple[str, ...] = ()) -> Case:
    return Case(case_id, (data,), replies, only)


def bytewise(case_id: str, data: bytes, replies: int) -> Case:
    """The same bytes one at a time: every split point at once."""
    return Case(case_id, tuple(data[i:i + 1] for i in range(len(data))), replies)


def pending(count: int) -> bytes:
    return HELLO + b"".join(auth(i, mech="LOGIN") for i in range(1, count + 1))


CASES: Sequence[Case] = (
    # -- handshake variants
    whole("handshake-postfix", HELLO + auth(1, ALICE), 1),
    bytewise("handshake-postfix-bytewise", HELLO + auth(1, ALICE), 1),
    whole("handshake-crlf", b"VERSION\t1\t0\r\nCPID\t4242\r\n" + auth(1, ALICE), 1),
    whole("handshake-minor-2", b"VERSION\t1\t2\nCPID\t4242\n" + auth(1, ALICE), 1),
    whole("handshake-dovecot24", HELLO24 + auth(1, ALICE, params="protocol=smtp\tfinal-resp-ok"),
          1, only=("2.4",)),
    whole("handshake-dovecot24-on-23",
          HELLO24 + auth(1, ALICE, params="protocol=smtp\tfinal-resp-ok"), 1, only=("2.3",)),
    whole("handshake-24-service", HELLO24 + auth(1, ALICE, params="service=imap\tfinal-resp-ok"), 1),
    whole("handshake-24-secured-tls",
          HELLO24 + auth(1, ALICE, params="service=imap\tsecured=tls\tsession=x1\tlport=143"), 1),
    whole("handshake-major-2", b"VERSION\t2\t0\nCPID\t1\n" + auth(1, ALICE), 0),
    whole("handshake-auth-before-cpid", b"VERSION\t1\t0\n" + auth(1, ALICE), 0),
    whole("handshake-auth-before-version", auth(1, ALICE), 0),
    whole("handshake-cpid-twice", HELLO + b"CPID\t5\n" + auth(1, ALICE), 0),
    whole("handshake-unknown-command", HELLO + b"HELLO\t1\n" + auth(1, ALICE), 0),
    whole("handshake-empty-line", HELLO + b"\n" + auth(1, ALICE), 0),
    # -- mechanisms
    whole("plain-good", HELLO + auth(1, ALICE), 1),
    whole("plain-wrong-password", HELLO + auth(1, plain("alice@example.org", "nope")), 1),
    whole("plain-unknown-user", HELLO + auth(1, plain("nobody@example.org", "x")), 1),
    whole("plain-no-initial-response", HELLO + auth(1) + cont(1, ALICE), 2),
    whole("plain-lowercase-mech", HELLO + auth(1, ALICE, mech="plain"), 1),
    whole("login-good", HELLO + auth(1, mech="LOGIN") + cont(1, b64(b"alice@example.org"))
          + cont(1, b64(b"alice-pw")), 3),
    bytewise("login-good-bytewise", HELLO + auth(1, mech="LOGIN")
             + cont(1, b64(b"alice@example.org")) + cont(1, b64(b"alice-pw")), 3),
    whole("login-initial-response", HELLO + auth(1, b64(b"alice@example.org"), mech="LOGIN")
          + cont(1, b64(b"alice-pw")), 2),
    whole("login-wrong-password", HELLO + auth(1, b64(b"alice@example.org"), mech="LOGIN")
          + cont(1, b64(b"nope")), 2),
    whole("login-abort", HELLO + auth(1, mech="LOGIN") + cont(1, "*"), 2),
    whole("mech-unknown", HELLO + auth(1, ALICE, mech="CRAM-MD5"), 0),
    whole("mech-not-offered", HELLO + auth(1, ALICE, mech="DIGEST-MD5"), 0),
    # -- base64 and NUL placement
    whole("b64-invalid", HELLO + auth(1, "!!!!"), 1),
    whole("b64-bad-padding", HELLO + auth(1, "QUJ"), 1),
    whole("b64-in-cont-invalid", HELLO + auth(1) + cont(1, "%%%"), 2),
    whole("b64-equals-empty", HELLO + auth(1, "="), 1),
    whole("b64-empty-resp-minor-0", HELLO + auth(1, ""), 1),
    whole("b64-empty-resp-minor-2", b"VERSION\t1\t2\nCPID\t1\n" + auth(1, ""), 1),
    whole("nul-none", HELLO + auth(1, b64(b"alice@example.org alice-pw")), 1),
    whole("nul-one", HELLO + auth(1, b64(b"alice@example.org\0alice-pw")), 1),
    whole("nul-three", HELLO + auth(1, b64(b"\0alice@example.org\0alice-pw\0")), 1),
    whole("nul-empty-authcid", HELLO + auth(1, b64(b"\0\0alice-pw")), 1),
    whole("nul-empty-password", HELLO + auth(1, b64(b"\0alice@example.org\0")), 1),
    whole("nul-in-line", HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\0x\tresp=" + ALICE.encode()
          + b"\n", 1),
    whole("nul-cont-empty", HELLO + auth(1) + cont(1, ""), 2),
    # -- authzid and master users
    whole("authzid-same", HELLO + auth(1, plain("alice@example.org", "alice-pw",
                                                "alice@example.org")), 1),
    whole("authzid-master-imap", HELLO + auth(1, plain("admin@example.org", "master-pw",
                                                       "alice@example.org"),
                                              params="service=imap"), 1),
    whole("authzid-master-smtp", HELLO + auth(1, plain("admin@example.org", "master-pw",
                                                       "alice@example.org")), 1),
    whole("authzid-not-master", HELLO + auth(1, plain("alice@example.org", "alice-pw",
                                                      "bob@example.org"),
                                             params="service=imap"), 1),
    whole("authzid-master-wrong-password",
          HELLO + auth(1, plain("admin@example.org", "nope", "alice@example.org"),
                       params="service=imap"), 1),
    whole("authzid-master-unknown-target",
          HELLO + auth(1, plain("admin@example.org", "master-pw", "nobody@example.org"),
                       params="service=imap"), 1),
    whole("separator-master-imap", HELLO + auth(
        1, plain("alice@example.org*admin@example.org", "master-pw"), params="service=imap"), 1),
    whole("separator-not-master", HELLO + auth(
        1, plain("bob@example.org*alice@example.org", "alice-pw"), params="service=imap"), 1),
    # -- usernames
    whole("user-uppercase", HELLO + auth(1, plain("ALICE@Example.ORG", "alice-pw")), 1),
    whole("user-trailing-space", HELLO + auth(1, plain("alice@example.org ", "alice-pw")), 1),
    whole("user-leading-space", HELLO + auth(1, plain(" alice@example.org", "alice-pw")), 1),
    whole("user-plus", HELLO + auth(1, plain("alice+x@example.org", "alice-pw")), 1),
    whole("user-quote", HELLO + auth(1, plain('"alice"@example.org', "alice-pw")), 1),
    whole("user-non-ascii", HELLO + auth(1, plain("älice@example.org", "alice-pw")), 1),
    whole("user-no-domain", HELLO + auth(1, plain("alice", "alice-pw")), 1),
    whole("user-tab-in-login", HELLO + auth(1, plain("alice\t@example.org", "alice-pw")), 1),
    # -- flags and parameters
    whole("param-secured", HELLO + auth(1, ALICE, params="service=smtp\tsecured"), 1),
    whole("param-unknown", HELLO + auth(1, ALICE, params="service=smtp\tx-future=1"), 1),
    whole("param-rip-garbage", HELLO + auth(1, ALICE, params="service=smtp\trip=junk"), 1),
    whole("param-service-imap", HELLO + auth(1, ALICE, params="service=imap"), 1),
    whole("param-service-empty", HELLO + auth(1, ALICE, params="service="), 1),
    whole("param-service-0xff", HELLO + auth(1, ALICE, params="service=sm\xfftp")
          .replace("sm\xfftp".encode(), b"sm\xfftp"), 1),
    whole("param-rip-0xff", HELLO + auth(1, ALICE, params="service=smtp").replace(
        b"service=smtp", b"service=smtp\trip=\xff"), 1),
    whole("param-no-service", HELLO + auth(1, ALICE, params="nologin"), 0),
    whole("param-after-resp", HELLO + auth(1, ALICE)[:-1] + b"\tsecured\n", 0),
    whole("param-id-zero", HELLO + auth(0, ALICE), 0),
    whole("param-id-garbage", HELLO + b"AUTH\tx\tPLAIN\tservice=smtp\n", 0),
    whole("param-duplicate-id", HELLO + auth(1, mech="LOGIN") + auth(1, mech="LOGIN"), 1),
    # -- overlong lines and passwords
    whole("overlong-line", HELLO + auth(1, "A" * 17000), 0),
    whole("overlong-password", HELLO + auth(1, plain("alice@example.org", "p" * 5000)), 1),
    whole("long-password-4096", HELLO + auth(1, plain("alice@example.org", "p" * 4096)), 1),
    # -- pipelining and pending-request limits
    whole("pipelined-two", HELLO + auth(1, ALICE) + auth(2, plain("alice@example.org", "x")), 2),
    bytewise("pipelined-two-bytewise",
             HELLO + auth(1, ALICE) + auth(2, plain("alice@example.org", "x")), 2),
    Case("pipelined-split-in-base64", (HELLO + auth(1, ALICE)[:-20], auth(1, ALICE)[-20:]
                                       + auth(2, plain("bob@example.org", "bob-pw"))), 2),
    whole("pending-32", pending(32), 32),
    whole("pending-33", pending(33), 33),
    whole("cont-while-verifying", HELLO + auth(1, ALICE) + cont(1, "AAAA"), 2),
    whole("cont-unknown-id", HELLO + cont(9, "AAAA"), 1),
    whole("cancel-then-cont", HELLO + auth(1, mech="LOGIN") + b"CANCEL\t1\n"
          + cont(1, b64(b"alice@example.org")), 2),
    # -- the items
    whole("empty-password-stored-empty", HELLO + auth(1, plain("empty@example.org", "")), 1),
)


# -- talking to a server --------------------------------------------------------------------------


@dataclass
class Session:
    lines: list[str] = field(default_factory=list)
    closed: bool = False
    handshake: list[str] = field(default_factory=list)


def run_session(path: Path, case: Case) -> Session:
    """Connect, write the chunks at once (as Postfix does: Dovecot 2.4 sends its handshake after
    the client's VERSION only), then read until the replies are there or the server is quiet."""
    result = Session()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        for i, chunk in enumerate(case.chunks):
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                result.closed = True
                break
            if len(case.chunks) > 1 and i % 64 == 0:
                time.sleep(0.001)
        buffer = b""
        deadline = time.monotonic() + 10
        last = time.monotonic()
        sock.settimeout(0.1)
        while not result.closed and time.monotonic() < deadline:
            replies = buffer.partition(b"DONE\n")[2]
            if replies.count(b"\n") >= case.replies and b"DONE\n" in buffer \
                    and time.monotonic() - last > 0.3:
                break
            if time.monotonic() - last > QUIET:
                break
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                result.closed = True
                break
            if not data:
                result.closed = True
                break
            buffer += data
            last = time.monotonic()
    head, done, rest = buffer.partition(b"DONE\n")
    result.handshake = [*head.decode().splitlines(), "DONE"] if done else []
    result.lines = rest.decode("utf-8", "replace").splitlines()
    return result


def normalise(line: str) -> str:
    """A reply as it matters to a client: command, id, user=, code= and CONT data."""
    fields = line.split("\t")
    if fields[0] == "CONT":
        return "\t".join(fields[:3])
    kept = fields[:2] + sorted(f for f in fields[2:] if f.startswith(("user=", "code=")))
    return "\t".join(kept)


def outcome(session: Session) -> list[str]:
    """The replies in order per request id. The order between ids is not compared: each
    reply names its request, a server may finish pipelined requests in any order (authd
    verifies in a thread pool, so a cheap FAIL can overtake a slow hash), and Postfix sends
    one request at a time."""
    replies = [normalise(line) for line in session.lines]
    by_id = sorted(replies, key=_request_id)
    return by_id + (["<closed>"] if session.closed else [])


def _request_id(reply: str) -> int:
    fields = reply.split("\t")
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else -1


def handshake_shape(lines: Sequence[str]) -> list[str]:
    """The handshake without the per-process values (SPID, CUID, COOKIE)."""
    return [line.split("\t")[0] if line.startswith(("SPID", "CUID", "COOKIE")) else line
            for line in lines]


# -- the two servers --------------------------------------------------------------------------


@dataclass
class Servers:
    dovecot: Dovecot
    daemons: Daemons
    dovecot_socket: Path
    authd_socket: Path
    release: str


def dovecot_auth_conf(root: Path, passdbs: Sequence[tuple[Path, bool]], dovecot24: bool) -> str:
    """Passwd-file passdbs (``(path, master)``), a static userdb, no failure delay nor anvil
    penalty, in the syntax of the release."""
    common = ("auth_failure_delay = 0\nauth_master_user_separator = *\n"
              "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n")
    if dovecot24:
        return common + "".join(
            f"passdb p{i} {{\n  driver = passwd-file\n  passwd_file_path = {path}\n"
            f"  master = {'yes' if master else 'no'}\n}}\n"
            for i, (path, master) in enumerate(passdbs)
        ) + ("userdb static {\n  driver = static\n  fields {\n    uid = nobody\n"
             f"    gid = nogroup\n    home = {root}/h\n  }}\n}}\n")
    return common + "".join(
        f"passdb {{\n  driver = passwd-file\n  args = {path}\n"
        f"  master = {'yes' if master else 'no'}\n}}\n"
        for path, master in passdbs
    ) + f"userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={root}/h\n}}\n"


@pytest.fixture(scope="module")
def servers(release: Release) -> Iterator[Servers]:
    with RigFactory(release, "mp-authdiff-") as factory:
        root = factory.root
        authd_socket = root / "auth.sock"
        daemons = factory.daemons(
            {"authd": {"sasl_listen": f"unix:{authd_socket}:mode=666", "failure_delay": 0,
                       "penalty_threshold": 1000, "penalty_shared": False,
                       "master_user_separator": "*", "max_requests_per_connection": 32}},
            ["authd"],
        )
        passwords = daemons.config.passwords
        store = daemons.store
        store.add_domain("example.org")
        users = {"alice@example.org": "alice-pw", "bob@example.org": "bob-pw",
                 "empty@example.org": "", "admin@example.org": "master-pw"}
        hashes = {user: hash_password(password, passwords) for user, password in users.items()}
        for user, stored in hashes.items():
            store.add_mailbox(user, stored)
        store.set_master("admin@example.org", True)
        passwd = root / "users.passwd"
        passwd.write_text("".join(f"{user}:{stored}::::::\n" for user, stored in hashes.items()
                                  if user != "admin@example.org"))
        masters = root / "masters.passwd"
        masters.write_text(f"admin@example.org:{hashes['admin@example.org']}::::::\n")
        conf = dovecot_auth_conf(root, [(masters, True), (passwd, False)], release.dovecot24)
        dovecot = factory.dovecot(conf=conf, protocols=("imap",))
        factory.start(daemons)
        factory.start(dovecot)
        socket_path = dovecot.base_dir / "auth-client"
        wait_until(socket_path.exists, what="Dovecot's auth-client socket")
        yield Servers(dovecot, daemons, socket_path, authd_socket,
                      "2.4" if release.dovecot24 else "2.3")


def compare(servers: Servers, cases: Sequence[Case]) -> dict[str, tuple[list[str], list[str]]]:
    """Case id -> (Dovecot's outcome, authd's) for every case that differs."""
    differing: dict[str, tuple[list[str], list[str]]] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        pairs = {
            case.id: (pool.submit(run_session, servers.dovecot_socket, case),
                      pool.submit(run_session, servers.authd_socket, case))
            for case in cases
        }
        for case_id, (theirs_f, ours_f) in pairs.items():
            theirs, ours = outcome(theirs_f.result()), outcome(ours_f.result())
            if theirs != ours:
                differing[case_id] = (theirs, ours)
    return differing


def test_every_difference_is_listed(servers: Servers) -> None:
    cases = [c for c in CASES if not c.only or servers.release in c.only]
    assert len({c.id for c in CASES}) == len(CASES)
    differing = compare(servers, cases)
    # The server's handshake (values that differ by nature masked), once per release.
    shape = "handshake-shape-on-24" if servers.release == "2.4" else "handshake-shape"
    checked = {c.id for c in cases} | {shape}
    hello = whole(shape, HELLO, 0)
    theirs = handshake_shape(run_session(servers.dovecot_socket, hello).handshake)
    ours = handshake_shape(run_session(servers.authd_socket, hello).handshake)
    if theirs != ours:
        differing[shape] = (theirs, ours)
    surprises = unexpected(set(differing), SECTION)
    stale = unused(set(differing), SECTION, checked)
    report = "\n".join(
        f"{case_id}:\n  dovecot {differing[case_id][0]}\n  authd   {differing[case_id][1]}"
        for case_id in sorted(surprises)
    )
    assert not surprises, f"differences not in docs/dovecot-differences.md:\n{report}"
    assert not stale, f"listed but no longer different: {sorted(stale)}"


def test_the_table_names_only_known_cases() -> None:
    listed = set(allowed_differences(SECTION))
    known = {c.id for c in CASES} | {"handshake-shape", "handshake-shape-on-24"}
    assert listed <= known, sorted(listed - known)
