"""authd behind private stock Dovecots: 2.3's dict passdb/userdb, and the Lua script on 2.3 and 2.4,
master users included (Dovecot's master passdb on both 2.3 routes, imapsync-style logins).

First module rig (2.3 only): two Dovecot 2.3 instances share one authd, one with ``driver =
dict`` for passdb and userdb (Dovecot verifies the hash itself), one with ``driver = lua`` running
authd/lua/mailplugins-auth.lua (authd verifies: app passwords and per-service flags work there).

Second rig, once per release (``release`` = 2.3, or 2.4 in the Debian 13 root): authd and deliver,
and a Dovecot running exactly what ``mailplugins dovecot-config --lua`` prints for that release
(2.4: Lua passdb and Lua userdb, the last_login dict; 2.3: Lua passdb, dict userdb), plus its own
LMTP. A mixed-case login reads the mail deliver stored for another spelling; unknown users are
unknown to IMAP, POP3 and Dovecot's LMTP; with authd down a login is a temporary failure.

imaplib is the client; Dovecot creating the Maildir where mailplugins.maildir_path says it is
proves deliver and Dovecot agree.
"""

from __future__ import annotations

import grp
import imaplib
import os
import poplib
import pwd
import shutil
import smtplib
import stat
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devrig.release import Release
from devrig.release import release as find_release
from mailplugins.hashing import hash_password
from mailplugins.maildir_path import expand_location
from mailplugins.wiring.dict_socket import check_dict_socket
from mailplugins.wiring.dovecot import DovecotOptions, dovecot_conf_text, dovecot_config
from mailplugins.wiring.live import parse_doveconf
from tests.e2e.test_generated_config import make_cert
from tests.rig import REPO, Daemons, Dovecot, free_port, short_tempdir, unix_socket_open, wait_until

pytestmark = pytest.mark.e2e

NOBODY = pwd.getpwnam("nobody")


@dataclass
class Rig:
    root: Path
    daemons: Daemons
    dict_dovecot: Dovecot
    lua_dovecot: Dovecot
    sasl_socket: Path

    def logs(self) -> str:
        return (f"--- dict dovecot\n{self.dict_dovecot.log_text()[-3000:]}\n"
                f"--- lua dovecot\n{self.lua_dovecot.log_text()[-3000:]}\n"
                f"--- authd\n{self.daemons.output()[-3000:]}")


def imap_login(dovecot: Dovecot, user: str, password: str) -> str:
    """``OK`` and the number of messages in INBOX, or the server's refusal."""
    with imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=30) as imap:
        try:
            imap.login(user, password)
        except imaplib.IMAP4.error as exc:
            return f"NO {exc}"
        typ, data = imap.select("INBOX")
        imap.logout()
        return f"{typ} {data[0]!r}"


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    root = short_tempdir("mp-authdc-")
    vmail = root / "vmail"
    vmail.mkdir()
    os.chown(vmail, NOBODY.pw_uid, NOBODY.pw_gid)
    http_port = free_port()
    sasl_socket = root / "auth.sock"
    dict_socket = root / "dict.sock"
    daemons = Daemons(
        root / "mp",
        {
            "mail": {"location": f"{vmail}/%d/%n/Maildir", "uid": NOBODY.pw_uid, "gid": NOBODY.pw_gid},
            "authd": {
                "sasl_listen": f"unix:{sasl_socket}:mode=666",
                "dict_listen": f"unix:{dict_socket}:mode=666",
                "http_listen": f"tcp:{http_port}:interface=127.0.0.1",
                "failure_delay": "0.2s",
                "penalty_threshold": 100,
            },
        },
        ["authd"],
    )
    store = daemons.store
    passwords = daemons.config.passwords
    store.add_domain("example.org")
    store.add_mailbox("alice@example.org", hash_password("alice-pw", passwords), quota_bytes=10**6)
    store.add_mailbox("bob@example.org", hash_password("bob-pw", passwords), services=["smtp"])
    store.add_mailbox("carol@example.org", hash_password("carol-pw", passwords))
    store.set_enabled("carol@example.org", False)
    store.add_app_password("alice@example.org", "laptop", hash_password("app-pw", passwords), ["imap"])
    store.add_mailbox("admin@example.org", hash_password("master-pw", passwords))
    store.set_master("admin@example.org", True)
    # One message in dave's Maildir, so a master user logged in as him visibly sees his mail.
    store.add_mailbox("dave@example.org", hash_password("dave-pw", passwords))
    maildir = Path(expand_location(daemons.config.mail.location, "dave", "example.org"))
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1700000000.M1P1.test").write_bytes(
        b"From: x@example.net\r\nSubject: for dave\r\n\r\nhello dave\r\n")
    for directory, _dirs, files in os.walk(vmail):
        os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
        for name in files:
            os.chown(os.path.join(directory, name), NOBODY.pw_uid, NOBODY.pw_gid)
    dict_conf = root / "dict-auth.conf.ext"
    dict_conf.write_text(
        f"uri = proxy:{dict_socket}:auth\n"
        "iterate_prefix = userdb/\n"
        "key passdb {\n  key = passdb/%s/%u\n  format = json\n}\n"
        "key userdb {\n  key = userdb/%u\n  format = json\n}\n"
        "passdb_objects = passdb\nuserdb_objects = userdb\n"
    )
    # Dovecot's master passdb (master = yes) reads master/<service>/<master user>.
    master_conf = root / "dict-master.conf.ext"
    master_conf.write_text(
        f"uri = proxy:{dict_socket}:auth\n"
        "key passdb {\n  key = master/%s/%u\n  format = json\n}\n"
        "passdb_objects = passdb\n"
    )
    # No anvil penalty nor failure delay of Dovecot's own: the tests fail logins on purpose.
    userdb = ("auth_master_user_separator = *\n"
              f"userdb {{\n  driver = dict\n  args = {dict_conf}\n}}\n"
              "auth_failure_delay = 0\n"
              "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n")
    last_login = (
        "mail_plugins = $mail_plugins last_login\n"
        f"plugin {{\n  last_login_dict = proxy:{dict_socket}:lastlogin\n"
        "  last_login_key = last-login/%u\n}\n"
    )
    debian12 = find_release("debian12")  # the dict driver and 2.3's Lua passdb syntax
    dict_dovecot = Dovecot(
        root / "dc-dict", release=debian12,
        conf=(f"passdb {{\n  driver = dict\n  args = {master_conf}\n  master = yes\n}}\n"
              f"passdb {{\n  driver = dict\n  args = {dict_conf}\n}}\n{userdb}{last_login}"),
    )
    lua_script = root / "mailplugins-auth.lua"
    shipped = (REPO / "authd" / "lua" / "mailplugins-auth.lua").read_text()
    default_url = 'local base = "http://127.0.0.1:9643"'
    assert default_url in shipped
    lua_script.write_text(shipped.replace(default_url, f'local base = "http://127.0.0.1:{http_port}"'))
    lua_dovecot = Dovecot(
        root / "dc-lua", release=debian12,
        conf=(
            "auth_debug = yes\n"
            "passdb {\n  driver = lua\n"
            f"  args = file={lua_script} blocking=yes\n  master = yes\n}}\n"
            "passdb {\n  driver = lua\n"
            f"  args = file={lua_script} blocking=yes\n}}\n"
            f"{userdb}"
        ),
    )
    daemons.start()
    started: list[Dovecot] = []
    try:
        for dovecot in (dict_dovecot, lua_dovecot):
            dovecot.start()
            started.append(dovecot)
        yield Rig(root, daemons, dict_dovecot, lua_dovecot, sasl_socket)
    finally:
        for dovecot in started:
            dovecot.stop()
        daemons.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_imap_login_through_dict_creates_the_maildir_deliver_uses(rig: Rig) -> None:
    assert imap_login(rig.dict_dovecot, "alice@example.org", "alice-pw") == "OK b'0'", rig.logs()
    expected = expand_location(rig.daemons.config.mail.location, "alice", "example.org")
    assert Path(expected, "cur").is_dir(), rig.logs()


def test_last_login_plugin_writes_through_authd(rig: Rig) -> None:
    """With the dict passdb authd never sees the password: the last_login plugin tells it."""
    assert imap_login(rig.dict_dovecot, "alice@example.org", "alice-pw").startswith("OK")
    mailbox = wait_until(
        lambda: (m := rig.daemons.store.get_mailbox("alice@example.org")) and m.last_login_at and m,
        timeout=10, what="last_login_at to be set",
    )
    assert mailbox.last_login_at is not None  # type: ignore[attr-defined]


def test_imap_bad_password_through_dict(rig: Rig) -> None:
    assert imap_login(rig.dict_dovecot, "alice@example.org", "wrong").startswith("NO")


def test_dict_disabled_and_service_denied(rig: Rig) -> None:
    assert imap_login(rig.dict_dovecot, "carol@example.org", "carol-pw").startswith("NO")
    assert imap_login(rig.dict_dovecot, "bob@example.org", "bob-pw").startswith("NO")


def test_doveadm_user_iterates(rig: Rig) -> None:
    result = rig.dict_dovecot.doveadm("user", "*")
    assert result.returncode == 0, result.stderr + rig.logs()
    assert result.stdout.split() == ["admin@example.org", "alice@example.org", "bob@example.org",
                                    "dave@example.org"]


def test_doveadm_user_shows_the_userdb_fields(rig: Rig) -> None:
    result = rig.dict_dovecot.doveadm("user", "alice@example.org")
    assert result.returncode == 0, result.stderr + rig.logs()
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    location = expand_location(rig.daemons.config.mail.location, "alice", "example.org")
    assert fields["mail"] == f"maildir:{location}"
    assert fields["home"] == str(Path(location).parent)
    assert fields["uid"] == str(NOBODY.pw_uid)
    assert fields["quota_rule"] == "*:bytes=1000000"


def test_doveadm_auth_test_against_authd_socket(rig: Rig) -> None:
    ok = rig.dict_dovecot.doveadm("auth", "test", "-a", str(rig.sasl_socket), "-x", "service=smtp",
                                  "alice@example.org", "alice-pw")
    assert ok.returncode == 0, ok.stdout + ok.stderr + rig.logs()
    assert "user=alice@example.org" in ok.stdout
    bad = rig.dict_dovecot.doveadm("auth", "test", "-a", str(rig.sasl_socket), "alice@example.org", "nope")
    assert bad.returncode == 77, bad.stdout + bad.stderr


def test_lua_route_good_bad_app_password(rig: Rig) -> None:
    assert imap_login(rig.lua_dovecot, "alice@example.org", "alice-pw") == "OK b'0'", rig.logs()
    assert imap_login(rig.lua_dovecot, "alice@example.org", "app-pw") == "OK b'0'", rig.logs()
    assert imap_login(rig.lua_dovecot, "alice@example.org", "wrong").startswith("NO")
    assert imap_login(rig.lua_dovecot, "nobody@example.org", "x").startswith("NO")
    assert imap_login(rig.lua_dovecot, "carol@example.org", "carol-pw").startswith("NO")
    assert imap_login(rig.lua_dovecot, "bob@example.org", "bob-pw").startswith("NO")


def test_lua_userdb_on_dovecot_23(rig: Rig) -> None:
    """The script's userdb functions work on 2.3 too (the generator keeps the dict userdb there)."""
    script = next(rig.root.glob("mailplugins-auth.lua"))
    dovecot = Dovecot(
        rig.root / "dc-lua-userdb", release=find_release("debian12"),
        conf=(f"passdb {{\n  driver = lua\n  args = file={script} blocking=yes\n}}\n"
              f"userdb {{\n  driver = lua\n  args = file={script} blocking=yes\n}}\n"),
    )
    dovecot.start()
    try:
        found = dovecot.doveadm("user", "ALICE@example.org")
        listed = dovecot.doveadm("user", "*")
        unknown = dovecot.doveadm("user", "nobody@example.org")
        login = imap_login(dovecot, "Alice@example.org", "alice-pw")
    finally:
        dovecot.stop()
    assert found.returncode == 0, found.stdout + found.stderr + dovecot.log_text()[-3000:]
    fields = dict(line.split(None, 1) for line in found.stdout.splitlines()[1:] if line.strip())
    location = expand_location(rig.daemons.config.mail.location, "alice", "example.org")
    assert fields["user"] == "alice@example.org"
    assert fields["mail"] == f"maildir:{location}"
    assert fields["quota_rule"] == "*:bytes=1000000"
    users = listed.stdout.split()
    assert "alice@example.org" in users and "bob@example.org" in users, listed.stderr
    assert "carol@example.org" not in users  # disabled
    assert unknown.returncode == 67
    assert login == "OK b'0'", dovecot.log_text()[-3000:]


def test_lua_http_client_gets_100_continue(rig: Rig) -> None:
    """Dovecot's HTTP client sends Expect: 100-continue; authd must answer it, not make it wait."""
    imap_login(rig.lua_dovecot, "alice@example.org", "alice-pw")
    log = rig.lua_dovecot.log_text()
    assert "Got expected 100-continue response" in log, log[-3000:]
    assert "Expected 100-continue response timed out" not in log, log[-3000:]


# -- the generated Lua wiring, on Dovecot 2.3 and 2.4 ------------------------------------------------


@dataclass
class Stack:
    release: str
    root: Path
    daemons: Daemons
    dovecot: Dovecot
    lmtp_socket: Path
    metrics_port: int

    def logs(self) -> str:
        return (f"--- dovecot {self.release}\n{self.dovecot.log_text()[-4000:]}\n"
                f"--- daemons\n{self.daemons.output()[-3000:]}")


@pytest.fixture(scope="module")
def stack(release: Release) -> Iterator[Stack]:
    dovecot_release = "2.4" if release.dovecot24 else "2.3"
    root = short_tempdir(f"mp-lua-{release.short}-")
    vmail = root / "vmail"
    vmail.mkdir()
    os.chown(vmail, NOBODY.pw_uid, NOBODY.pw_gid)
    lmtp_socket = root / "deliver.sock"
    metrics_port = free_port()
    daemons = Daemons(
        root / "mp",
        {
            "mail": {"location": f"{vmail}/%d/%n/Maildir", "uid": NOBODY.pw_uid, "gid": NOBODY.pw_gid},
            "authd": {
                "sasl_listen": f"unix:{root}/auth.sock:mode=666",
                # As documented (the systemd socket unit): root:dovecot 0660, which the mail
                # user (nobody here) may not open; last_login goes through Dovecot's dict.
                "dict_listen": f"unix:{root}/dict.sock:mode=660",
                "http_listen": f"tcp:{free_port()}:interface=127.0.0.1",
                "metrics": f"tcp:{metrics_port}:interface=127.0.0.1",
                "failure_delay": "0.2s",
                "penalty_threshold": 100,
                "master_user_separator": "*",
            },
            "deliver": {"listen": f"unix:{lmtp_socket}:mode=666", "hostname": "deliver.test"},
        },
        ["authd", "deliver"],
    )
    store, passwords = daemons.store, daemons.config.passwords
    store.add_domain("example.org")
    # Stored with a capital: every spelling of the login must reach one lower-case Maildir.
    store.add_mailbox("Alice@example.org", hash_password("alice-pw", passwords), quota_bytes=10**6)
    store.add_mailbox("bob@example.org", hash_password("bob-pw", passwords), services=["smtp"])
    store.add_mailbox("carol@example.org", hash_password("carol-pw", passwords))
    store.set_enabled("carol@example.org", False)
    store.add_app_password("alice@example.org", "laptop", hash_password("app-pw", passwords), ["imap"])
    # A master user, and dave with one message for it to find (the generated master passdb).
    store.add_mailbox("admin@example.org", hash_password("master-pw", passwords))
    store.set_master("admin@example.org", True)
    store.add_mailbox("dave@example.org", hash_password("dave-pw", passwords))
    dave = Path(expand_location(daemons.config.mail.location, "dave", "example.org"))
    for sub in ("cur", "new", "tmp"):
        (dave / sub).mkdir(parents=True)
    (dave / "new" / "1700000000.M1P1.test").write_bytes(
        b"From: x@example.net\r\nSubject: for dave\r\n\r\nhello dave\r\n")
    for directory, _dirs, files in os.walk(vmail):
        os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
        for name in files:
            os.chown(os.path.join(directory, name), NOBODY.pw_uid, NOBODY.pw_gid)
    etc = root / "etc"
    etc.mkdir()
    cert, key = make_cert(root)
    script = REPO / "authd" / "lua" / "mailplugins-auth.lua"
    snippet = dovecot_config(daemons.config, DovecotOptions(
        version=dovecot_release, config_directory=str(etc), lua=True, lua_script=str(script),
        lua_script_text=script.read_text(), tls_cert=str(cert), tls_key=str(key),
    ))
    for generated in snippet.files:  # the script with authd's port, under /tmp (seen in the root)
        Path(generated.path).write_text(generated.text)
    # The generated snippet as printed, then what a plaintext test client needs.
    plaintext = ("ssl = no\nauth_allow_cleartext = yes\n" if release.dovecot24
                 else "ssl = no\ndisable_plaintext_auth = no\n")
    quiet = ("auth_failure_delay = 0\n"
             "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n")
    dovecot = Dovecot(root / "dc", conf=dovecot_conf_text(snippet) + plaintext + quiet,
                      lmtp_port=free_port(), protocols=("imap", "pop3", "lmtp"), release=release)
    start_daemons(daemons, root)
    try:
        wait_until(lambda: unix_socket_open(lmtp_socket), what="deliver socket")
        dovecot.start()
        yield Stack(dovecot_release, root, daemons, dovecot, lmtp_socket, metrics_port)
    finally:
        dovecot.stop()
        daemons.stop()
        shutil.rmtree(root, ignore_errors=True)


def start_daemons(daemons: Daemons, root: Path) -> None:
    """Start the daemons; authd's dict socket then gets the documented owner, root:dovecot
    (what mailplugins-authd-dict.socket's SocketGroup does), at mode 0660."""
    daemons.start()
    dict_socket = root / "dict.sock"
    wait_until(dict_socket.exists, what="authd's dict socket")
    os.chown(dict_socket, 0, grp.getgrnam("dovecot").gr_gid)
    assert stat.S_IMODE(dict_socket.stat().st_mode) == 0o660


def pop3_login(dovecot: Dovecot, user: str, password: str) -> str:
    pop = poplib.POP3("127.0.0.1", dovecot.pop3_port, timeout=30)
    try:
        pop.user(user)
        pop.pass_(password)
        count, _ = pop.stat()
        pop.quit()
        return f"OK {count}"
    except poplib.error_proto as exc:
        return f"ERR {exc}"
    finally:
        pop.close()


def test_mixed_case_login_reads_its_own_mail(stack: Stack) -> None:
    """deliver stores for ALICE@, Dovecot shows it to Alice@ and alice@: one Maildir."""
    with smtplib.LMTP(str(stack.lmtp_socket), timeout=30) as lmtp:
        lmtp.sendmail("sender@example.net", ["ALICE@example.org"],
                      b"Subject: hello\r\n\r\nfor every spelling\r\n")
    maildir = Path(expand_location(stack.daemons.config.mail.location, "Alice", "example.org"))
    assert maildir == stack.root / "vmail" / "example.org" / "alice" / "Maildir"
    assert len(list((maildir / "new").iterdir())) == 1, stack.logs()
    for login in ("Alice@example.org", "alice@example.org", "ALICE@EXAMPLE.ORG"):
        assert imap_login(stack.dovecot, login, "alice-pw") == "OK b'1'", stack.logs()
        assert pop3_login(stack.dovecot, login, "alice-pw") == "OK 1", stack.logs()
    assert not (stack.root / "vmail" / "example.org" / "Alice").exists()


def test_lua_passdb_outcomes(stack: Stack) -> None:
    assert imap_login(stack.dovecot, "alice@example.org", "app-pw").startswith("OK"), stack.logs()
    assert imap_login(stack.dovecot, "alice@example.org", "wrong").startswith("NO")
    assert pop3_login(stack.dovecot, "alice@example.org", "wrong-too").startswith("ERR")
    # authd got the service and the client address (2.4: req.protocol/req.remote_ip, 2.3:
    # req.service/req.rip): its failure log names both.
    for service in ("imap", "pop3"):
        needle = f"rip=127.0.0.1 service={service} "
        def logged(needle: str = needle) -> bool:
            return needle in stack.daemons.output()

        wait_until(logged, timeout=10, what=f"authd to log the {service} failure with the client address")
    assert imap_login(stack.dovecot, "carol@example.org", "carol-pw").startswith("NO")
    assert imap_login(stack.dovecot, "bob@example.org", "bob-pw").startswith("NO")  # smtp only
    assert pop3_login(stack.dovecot, "alice@example.org", "app-pw").startswith("ERR")  # imap only


def test_unknown_user_is_unknown_to_imap_pop3_and_lmtp(stack: Stack) -> None:
    assert imap_login(stack.dovecot, "nobody@example.org", "x").startswith("NO")
    assert pop3_login(stack.dovecot, "nobody@example.org", "x").startswith("ERR")
    assert stack.dovecot.lmtp_port is not None
    with smtplib.LMTP("127.0.0.1", stack.dovecot.lmtp_port, timeout=30) as lmtp:
        lmtp.ehlo("test")
        lmtp.mail("sender@example.net")
        code, text = lmtp.rcpt("nobody@example.org")
        assert code == 550, (code, text, stack.logs())
        code, text = lmtp.rcpt("carol@example.org")  # disabled: unknown too
        assert code == 550, (code, text)
        code, _ = lmtp.rcpt("ALICE@example.org")
        assert code == 250, stack.logs()


def test_dovecot_lmtp_writes_where_deliver_does(stack: Stack) -> None:
    assert stack.dovecot.lmtp_port is not None
    maildir = Path(expand_location(stack.daemons.config.mail.location, "alice", "example.org"))
    before = len(list((maildir / "new").iterdir())) if (maildir / "new").exists() else 0
    with smtplib.LMTP("127.0.0.1", stack.dovecot.lmtp_port, timeout=30) as lmtp:
        lmtp.sendmail("sender@example.net", ["Alice@Example.org"], b"Subject: via dovecot\r\n\r\nx\r\n")
    assert len(list((maildir / "new").iterdir())) == before + 1, stack.logs()


def test_doveadm_user_fields_and_iteration(stack: Stack) -> None:
    found = stack.dovecot.doveadm("user", "ALICE@example.org")
    assert found.returncode == 0, found.stdout + found.stderr + stack.logs()
    fields = dict(line.split("\t", 1) for line in found.stdout.splitlines()[1:] if "\t" in line)
    location = expand_location(stack.daemons.config.mail.location, "alice", "example.org")
    assert fields["user"] == "alice@example.org"
    assert fields["home"] == str(Path(location).parent)
    assert fields["uid"] == str(NOBODY.pw_uid)
    if stack.release == "2.4":
        assert fields["mail_path"] == location
        assert fields["quota_storage_size"] == "1000000"
    else:
        assert fields["mail"] == f"maildir:{location}"
    listed = stack.dovecot.doveadm("user", "*")
    assert listed.returncode == 0, listed.stderr + stack.logs()
    assert listed.stdout.split() == ["admin@example.org", "alice@example.org", "bob@example.org",
                                     "dave@example.org"]
    assert stack.dovecot.doveadm("user", "nobody@example.org").returncode == 67  # EX_NOUSER


def test_last_login_recorded_through_authd(stack: Stack) -> None:
    """The generated wiring with authd's dict socket at root:dovecot 0660: the IMAP process (the
    mail user) writes through Dovecot's dict service, which may reach authd's socket."""
    store = stack.daemons.store
    log_start = len(stack.dovecot.log_text())
    assert imap_login(stack.dovecot, "Alice@example.org", "alice-pw").startswith("OK")
    # The Lua passdb's verification also stamps last_login_at (at most once a minute), so wait
    # for the dict write itself: authd counts it.
    wait_until(lambda: _dict_sets(stack) >= 1, timeout=10,
               what="the last_login plugin's write to reach authd\n" + stack.logs())
    mailbox = store.get_mailbox("alice@example.org")
    assert mailbox is not None and mailbox.last_login_at is not None
    log = stack.dovecot.log_text()[log_start:]
    assert "Permission denied" not in log and "last_login" not in log, stack.logs()


def test_doctor_flags_a_dict_socket_dovecot_may_not_open(stack: Stack) -> None:
    """The demo's socket was root:root 0660 (authd made it; nobody gave it to dovecot): every
    last_login write failed with Permission denied. doctor names exactly that case."""
    dict_socket = stack.root / "dict.sock"
    live = parse_doveconf(stack.dovecot.doveconf("-a", check=True).stdout)
    config = stack.daemons.config
    assert check_dict_socket(config, live) == []  # root:dovecot 0660, as documented
    os.chown(dict_socket, 0, 0)
    try:
        [finding] = check_dict_socket(config, live)
        assert "is root:root 0660: Dovecot's processes (group dovecot) may not connect" \
            in finding.problem
        before = _dict_sets(stack)
        assert imap_login(stack.dovecot, "alice@example.org", "alice-pw").startswith("OK")
        wait_until(lambda: "Permission denied" in stack.dovecot.log_text(), timeout=10,
                   what="Dovecot to log the refused last_login write")
        assert _dict_sets(stack) == before
    finally:
        os.chown(dict_socket, 0, grp.getgrnam("dovecot").gr_gid)
    assert imap_login(stack.dovecot, "alice@example.org", "alice-pw").startswith("OK")
    wait_until(lambda: _dict_sets(stack) > before, timeout=10, what="the next write to arrive")


def _dict_sets(stack: Stack) -> float:
    """last_login writes authd's dict listener answered (from its metrics)."""
    url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mailplugins_authd_dict_requests_total{")
               and 'command="commit"' in line and 'result="ok"' in line)


def _generated_dict_dovecot(stack: Stack) -> Dovecot:
    """Dovecot 2.3 with dovecot-config's default (dict) wiring against the stack's authd."""
    etc = stack.root / "etc-dict"
    etc.mkdir()
    cert, key = make_cert(etc)
    snippet = dovecot_config(stack.daemons.config, DovecotOptions(
        version="2.3", config_directory=str(etc), tls_cert=str(cert), tls_key=str(key)))
    for generated in snippet.files:
        Path(generated.path).write_text(generated.text)
    plaintext = "ssl = no\ndisable_plaintext_auth = no\nauth_failure_delay = 0\n"
    return Dovecot(stack.root / "dc-dict", conf=dovecot_conf_text(snippet) + plaintext,
                   release=stack.dovecot.release).start()


def test_generated_master_passdb_logs_a_master_user_in(stack: Stack) -> None:
    """dovecot-config writes the master passdb (and auth_master_user_separator from
    authd.master_user_separator): imapsync-style logins as dave, on 2.4 (Lua) and on 2.3 with
    both generated routes (Lua, and the default dict route)."""
    dovecots = [stack.dovecot]
    if stack.release == "2.3":
        dovecots.append(_generated_dict_dovecot(stack))
    try:
        for dovecot in dovecots:
            logs = f"{dovecot.log_text()[-3000:]}\n{stack.daemons.output()[-2000:]}"
            assert imap_login(dovecot, "dave@example.org*admin@example.org", "master-pw") \
                == "OK b'1'", logs
            assert imap_master_plain(dovecot, "dave@example.org", "admin@example.org",
                                     "master-pw") == "OK b'1' b'1'", logs
            assert imap_login(dovecot, "admin@example.org", "master-pw") == "OK b'0'", logs
            # Not a master user; a wrong master password; a mailbox that does not exist.
            assert imap_login(dovecot, "dave@example.org*alice@example.org", "alice-pw") \
                .startswith("NO")
            assert imap_login(dovecot, "dave@example.org*admin@example.org", "wrong") \
                .startswith("NO")
            assert imap_master_plain(dovecot, "nobody@example.org", "admin@example.org",
                                     "master-pw").startswith("NO")
    finally:
        for dovecot in dovecots[1:]:
            dovecot.stop()


def test_authd_down_is_a_temporary_failure(stack: Stack) -> None:
    """Never "wrong password" when authd cannot answer: Dovecot says try again later."""
    stack.daemons.stop()
    try:
        answer = imap_login(stack.dovecot, "alice@example.org", "alice-pw")
        assert answer.startswith("NO"), answer
        assert "UNAVAILABLE" in answer or "Temporary" in answer, answer + stack.logs()
        assert "AUTHENTICATIONFAILED" not in answer
    finally:
        start_daemons(stack.daemons, stack.root)


# -- master users (issue #15 item 10): imapsync-style logins through real Dovecot ----------------


def imap_master_plain(dovecot: Dovecot, target: str, master: str, password: str) -> str:
    """imapsync --authuser1: AUTHENTICATE PLAIN with the mailbox as authorization id."""
    with imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=30) as imap:
        try:
            imap.authenticate("PLAIN", lambda _: f"{target}\0{master}\0{password}".encode())
        except imaplib.IMAP4.error as exc:
            return f"NO {exc}"
        typ, data = imap.select("INBOX")
        _, found = imap.search(None, "SUBJECT", '"for dave"')
        imap.logout()
        return f"{typ} {data[0]!r} {found[0]!r}"


@pytest.mark.parametrize("route", ["dict", "lua"])
def test_master_user_logs_in_as_dave_and_sees_his_mail(rig: Rig, route: str) -> None:
    dovecot = rig.dict_dovecot if route == "dict" else rig.lua_dovecot
    assert imap_master_plain(dovecot, "dave@example.org", "admin@example.org", "master-pw") \
        == "OK b'1' b'1'", rig.logs()
    # The separator form (auth_master_user_separator = *), as imapsync's user*master.
    assert imap_login(dovecot, "dave@example.org*admin@example.org", "master-pw") == "OK b'1'", \
        rig.logs()
    # The master user's own mailbox is its own (empty) one.
    assert imap_login(dovecot, "admin@example.org", "master-pw") == "OK b'0'", rig.logs()


@pytest.mark.parametrize("route", ["dict", "lua"])
def test_master_user_refusals_through_dovecot(rig: Rig, route: str) -> None:
    dovecot = rig.dict_dovecot if route == "dict" else rig.lua_dovecot
    # alice is no master user; a wrong master password.
    assert imap_login(dovecot, "bob@example.org*alice@example.org", "alice-pw").startswith("NO")
    assert imap_master_plain(dovecot, "bob@example.org", "alice@example.org", "alice-pw") \
        .startswith("NO")
    assert imap_master_plain(dovecot, "alice@example.org", "admin@example.org", "wrong") \
        .startswith("NO")


def test_master_user_login_is_logged_by_authd(rig: Rig) -> None:
    imap_login(rig.lua_dovecot, "dave@example.org*admin@example.org", "master-pw")
    wait_until(lambda: "master user admin@example.org logged in as dave@example.org"
               in rig.daemons.output(), timeout=10, what="authd's master-user log line")


def test_master_user_on_the_auth_client_socket(rig: Rig) -> None:
    """doveadm auth test -M sends PLAIN with an authzid, as a master login through Postfix
    would: refused on SMTP (master_user_smtp is off), allowed on IMAP with user= the mailbox."""
    base = ["auth", "test", "-a", str(rig.sasl_socket), "-M", "admin@example.org"]
    imap = rig.dict_dovecot.doveadm(*base[:4], "-x", "service=imap", *base[4:],
                                    "dave@example.org", "master-pw")
    assert imap.returncode == 0, imap.stdout + imap.stderr + rig.logs()
    assert "user=dave@example.org" in imap.stdout
    smtp = rig.dict_dovecot.doveadm(*base[:4], "-x", "service=smtp", *base[4:],
                                    "dave@example.org", "master-pw")
    assert smtp.returncode == 77, smtp.stdout + smtp.stderr
