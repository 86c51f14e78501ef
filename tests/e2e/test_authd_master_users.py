"""Master users through real Dovecot IMAP on both releases, as imapsync logs in.

Dovecot 2.3 and 2.4 (the rig's ``release`` fixture) run the shipped Lua script twice: as a
master passdb (``master = yes``) and as the ordinary passdb, plus its userdb. The master user
``admin`` logs in as ``dave`` (AUTHENTICATE PLAIN with dave as authorization id, which is
imapsync's ``--authuser1``, and ``dave*admin`` with ``auth_master_user_separator = *``) and sees
dave's mail; authd logs the use. (tests/e2e/test_authd_dovecot.py covers 2.3's dict route.)
"""

from __future__ import annotations

import imaplib
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devrig.release import Release
from mailplugins.hashing import hash_password
from mailplugins.maildir_path import expand_location
from tests.rig import REPO, Daemons, Dovecot, RigFactory, free_port, wait_until

pytestmark = pytest.mark.e2e

NOBODY = pwd.getpwnam("nobody")


@dataclass
class Rig:
    daemons: Daemons
    dovecot: Dovecot

    def logs(self) -> str:
        return (f"--- dovecot\n{self.dovecot.log_text()[-3000:]}\n"
                f"--- authd\n{self.daemons.output()[-3000:]}")


def dovecot_conf(script: Path, dovecot24: bool) -> str:
    common = ("auth_master_user_separator = *\nauth_failure_delay = 0\n"
              "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n")
    if dovecot24:
        return common + (
            f"passdb master {{\n  driver = lua\n  lua_file = {script}\n  master = yes\n}}\n"
            f"passdb lua {{\n  lua_file = {script}\n}}\n"
            f"userdb lua {{\n  lua_file = {script}\n}}\n"
        )
    args = f"file={script} blocking=yes"
    return common + (
        f"passdb {{\n  driver = lua\n  args = {args}\n  master = yes\n}}\n"
        f"passdb {{\n  driver = lua\n  args = {args}\n}}\n"
        f"userdb {{\n  driver = lua\n  args = {args}\n}}\n"
    )


@pytest.fixture(scope="module")
def rig(release: Release) -> Iterator[Rig]:
    with RigFactory(release, "mp-master-") as factory:
        vmail = factory.root / "vmail"
        vmail.mkdir()
        http_port = free_port()
        daemons = factory.daemons(
            {
                "mail": {"location": f"{vmail}/%d/%n/Maildir", "uid": NOBODY.pw_uid,
                         "gid": NOBODY.pw_gid},
                "authd": {"http_listen": f"tcp:{http_port}:interface=127.0.0.1",
                          "penalty_threshold": 100},
            },
            ["authd"],
        )
        store, passwords = daemons.store, daemons.config.passwords
        store.add_domain("example.org")
        store.add_mailbox("dave@example.org", hash_password("dave-pw", passwords))
        store.add_mailbox("alice@example.org", hash_password("alice-pw", passwords))
        store.add_mailbox("admin@example.org", hash_password("master-pw", passwords))
        store.set_master("admin@example.org", True)
        # One message in dave's Maildir, where deliver would have put it.
        maildir = Path(expand_location(daemons.config.mail.location, "dave", "example.org"))
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        (maildir / "new" / "1700000000.M1P1.test").write_bytes(
            b"From: x@example.net\r\nSubject: for dave\r\n\r\nhello dave\r\n")
        for directory, _dirs, files in os.walk(vmail):
            os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
            for name in files:
                os.chown(os.path.join(directory, name), NOBODY.pw_uid, NOBODY.pw_gid)
        script = factory.root / "mailplugins-auth.lua"
        shipped = (REPO / "authd" / "lua" / "mailplugins-auth.lua").read_text()
        default = 'local base = "http://127.0.0.1:9643"'
        assert default in shipped
        script.write_text(shipped.replace(default, f'local base = "http://127.0.0.1:{http_port}"'))
        dovecot = factory.dovecot(conf=dovecot_conf(script, release.dovecot24))
        factory.start(daemons)
        factory.start(dovecot)
        yield Rig(daemons, dovecot)


def imap(rig: Rig, login: str, password: str, authzid: str | None = None) -> str:
    """Log in (LOGIN, or AUTHENTICATE PLAIN with ``authzid``), then count INBOX and dave's mail."""
    with imaplib.IMAP4("127.0.0.1", rig.dovecot.imap_port, timeout=30) as client:
        try:
            if authzid is None:
                client.login(login, password)
            else:
                client.authenticate("PLAIN", lambda _: f"{authzid}\0{login}\0{password}".encode())
        except imaplib.IMAP4.error as exc:
            return f"NO {exc}"
        typ, data = client.select("INBOX")
        _, found = client.search(None, "SUBJECT", '"for dave"')
        client.logout()
        return f"{typ} {data[0]!r} {found[0]!r}"


def test_master_user_sees_daves_mail_by_authzid(rig: Rig) -> None:
    assert imap(rig, "admin@example.org", "master-pw", authzid="dave@example.org") \
        == "OK b'1' b'1'", rig.logs()


def test_master_user_sees_daves_mail_with_the_separator(rig: Rig) -> None:
    assert imap(rig, "dave@example.org*admin@example.org", "master-pw") == "OK b'1' b'1'", \
        rig.logs()
    wait_until(lambda: "master user admin@example.org logged in as dave@example.org"
               in rig.daemons.output(), timeout=10, what="authd's master-user log line")


def test_master_user_own_mailbox_and_refusals(rig: Rig) -> None:
    assert imap(rig, "admin@example.org", "master-pw") == "OK b'0' b''", rig.logs()
    assert imap(rig, "dave@example.org", "dave-pw") == "OK b'1' b'1'", rig.logs()
    # alice is no master user; a wrong master password; a mailbox that does not exist.
    assert imap(rig, "dave@example.org*alice@example.org", "alice-pw").startswith("NO")
    assert imap(rig, "alice@example.org", "alice-pw", authzid="dave@example.org").startswith("NO")
    assert imap(rig, "admin@example.org", "wrong", authzid="dave@example.org").startswith("NO")
    assert imap(rig, "admin@example.org", "master-pw", authzid="nobody@example.org") \
        .startswith("NO")
