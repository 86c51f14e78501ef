"""authd as the SASL server of a private stock Postfix (3.7 and 3.10; ``smtpd_sasl_type = dovecot``).

swaks is the SMTP client, so what is checked is exactly what a mail client sees: 235 for a good
login (PLAIN with an initial response, LOGIN with prompts), 535 for a bad password, a disabled
account or a wrong service, and 454 (not 535) when authd's database breaks, which authd signals by
closing the auth connection. Postfix's log must name the canonical login as ``sasl_username``.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devrig.release import Release
from mailplugins.config import PasswordConfig
from mailplugins.hashing import hash_password
from tests.rig import Daemons, Postfix, RigFactory, free_port

pytestmark = pytest.mark.e2e


@dataclass
class Rig:
    root: Path
    postfix: Postfix
    daemons: Daemons
    metrics_port: int
    submission_port: int

    def swaks(
        self, user: str, password: str, mech: str = "PLAIN", quit_after: str = "AUTH",
        port: int | None = None,
    ) -> str:
        result = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{port or self.postfix.smtp_port}", "--auth", mech,
             "--auth-user", user, "--auth-password", password, "--quit-after", quit_after,
             "--from", "alice@example.org", "--to", "bob@example.org",
             "--timeout", "30"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        return result.stdout + result.stderr

    def logs(self) -> str:
        return (f"--- maillog\n{self.postfix.log_text()[-3000:]}\n"
                f"--- authd\n{self.daemons.output()[-3000:]}")


@pytest.fixture(scope="module")
def rig(release: Release) -> Iterator[Rig]:
    factory = RigFactory(release, "mp-authpf-")
    root = factory.root
    sasl_port = free_port()
    metrics_port = free_port()
    submission_port = free_port()
    # The production wiring: a unix socket in Postfix's private/ directory.
    private_socket = root / "postfix" / "queue" / "private" / "mailplugins-auth"
    daemons = factory.daemons(
        {
            "mail": {"location": str(root / "vmail/%d/%n/Maildir"), "uid": 0, "gid": 0},
            "authd": {
                "sasl_listen": [f"tcp:{sasl_port}:interface=127.0.0.1", f"unix:{private_socket}:mode=666"],
                "metrics": f"tcp:{metrics_port}:interface=127.0.0.1",
                "failure_delay": "0.3s",
                "penalty_threshold": 100,
            },
        },
        ["authd"],
    )
    store = daemons.store
    passwords = daemons.config.passwords
    assert isinstance(passwords, PasswordConfig)
    store.add_domain("example.org")
    store.add_mailbox("Alice@example.org", hash_password("s3cret pass", passwords))
    store.add_mailbox("carol@example.org", hash_password("carol-pw", passwords))
    store.set_enabled("carol@example.org", False)
    store.add_mailbox("dave@example.org", hash_password("dave-pw", passwords), services=["imap"])
    store.add_mailbox("erin@example.org", hash_password("erin-pw", passwords))
    store.add_mailbox("admin@example.org", hash_password("master-pw", passwords))
    store.set_master("admin@example.org", True)
    store.add_app_password("Alice@example.org", "phone", hash_password("app-secret", passwords), ["smtp"])
    postfix = factory.postfix(
        main={
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": f"inet:127.0.0.1:{sasl_port}",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            "virtual_mailbox_domains": "example.org",
            "virtual_transport": "error:no delivery in this test",
            "smtpd_reject_unlisted_recipient": "no",
        },
        services=[f"127.0.0.1:{submission_port} inet n - n - - smtpd "
                  "-o smtpd_sasl_path=private/mailplugins-auth"],
    )
    # authd must listen before Postfix starts: the rig's port probe already starts an smtpd, and
    # an smtpd that finds no SASL server dies and gets its service throttled by master.
    private_socket.parent.mkdir(parents=True)
    shutil.chown(private_socket.parent, "postfix")
    private_socket.parent.chmod(0o700)
    try:
        factory.start(daemons)
        factory.start(postfix)
        yield Rig(root, postfix, daemons, metrics_port, submission_port)
    finally:
        factory.close()


def test_plain_good_password(rig: Rig) -> None:
    out = rig.swaks("alice@example.org", "s3cret pass", "PLAIN", "RCPT")
    assert "235 2.7.0 Authentication successful" in out, out + rig.logs()
    rig.postfix.wait_for_log(r"sasl_method=PLAIN, sasl_username=Alice@example\.org")


def test_login_good_password(rig: Rig) -> None:
    out = rig.swaks("alice@example.org", "s3cret pass", "LOGIN", "RCPT")
    assert "235 2.7.0 Authentication successful" in out, out + rig.logs()
    rig.postfix.wait_for_log(r"sasl_method=LOGIN, sasl_username=Alice@example\.org")


def test_unix_socket_in_postfix_private_dir(rig: Rig) -> None:
    good = rig.swaks("alice@example.org", "s3cret pass", "LOGIN", port=rig.submission_port)
    assert "235 2.7.0 Authentication successful" in good, good + rig.logs()
    bad = rig.swaks("alice@example.org", "wrong", "PLAIN", port=rig.submission_port)
    assert "535 5.7.8" in bad, bad


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_bad_password(rig: Rig, mech: str) -> None:
    out = rig.swaks("alice@example.org", "wrong", mech)
    assert "535 5.7.8 Error: authentication failed" in out, out + rig.logs()


def test_unknown_user_looks_like_a_bad_password(rig: Rig) -> None:
    out = rig.swaks("nobody@example.org", "whatever")
    assert "535 5.7.8 Error: authentication failed" in out, out
    assert "unknown" not in out.lower()


def test_disabled_user(rig: Rig) -> None:
    out = rig.swaks("carol@example.org", "carol-pw")
    assert "535 5.7.8" in out, out + rig.logs()


def test_service_denied(rig: Rig) -> None:
    out = rig.swaks("dave@example.org", "dave-pw")
    assert "535 5.7.8" in out, out + rig.logs()


def test_app_password(rig: Rig) -> None:
    out = rig.swaks("alice@example.org", "app-secret", "LOGIN")
    assert "235 2.7.0 Authentication successful" in out, out + rig.logs()


def test_metrics_count_requests_without_user_names(rig: Rig) -> None:
    rig.swaks("alice@example.org", "s3cret pass", "LOGIN")
    rig.swaks("alice@example.org", "nope", "PLAIN")
    with urllib.request.urlopen(f"http://127.0.0.1:{rig.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'mailplugins_authd_auth_requests_total{mechanism="login",result="success"}' in text
    assert 'mailplugins_authd_auth_requests_total{mechanism="plain",result="failure"}' in text
    assert "mailplugins_authd_password_verify_duration_seconds_bucket" in text
    assert "alice" not in text.lower()


def test_database_failure_gives_454(rig: Rig) -> None:
    """Last in the module: it breaks the database. erin's record is not cached yet."""
    db_path = rig.daemons.config.database.url.removeprefix("sqlite:///")
    with sqlite3.connect(db_path) as conn:
        conn.execute("ALTER TABLE mailboxes RENAME TO mailboxes_gone")
    try:
        out = rig.swaks("erin@example.org", "erin-pw")
        assert "454 4.7.0 Temporary authentication failure" in out, out + rig.logs()
    finally:
        with sqlite3.connect(db_path) as conn:
            conn.execute("ALTER TABLE mailboxes_gone RENAME TO mailboxes")
    # authd resets the connection, so Postfix's next write fails and it reconnects at once.
    assert "235 2.7.0" in rig.swaks("erin@example.org", "erin-pw"), rig.logs()


def smtp_plain(rig: Rig, authzid: str, login: str, password: str) -> tuple[int, bytes]:
    """AUTH PLAIN with an authorization id (swaks cannot send one): the reply code and text."""
    import smtplib

    with smtplib.SMTP("127.0.0.1", rig.postfix.smtp_port, timeout=30) as client:
        client.ehlo("client.example")
        try:
            return client.auth("PLAIN", lambda challenge=None: f"{authzid}\0{login}\0{password}")
        except smtplib.SMTPAuthenticationError as exc:
            error = exc.smtp_error
            return exc.smtp_code, error.encode() if isinstance(error, str) else error


def test_master_user_is_refused_on_smtp(rig: Rig) -> None:
    """authd.master_user_smtp is off: on submission, sasl_username must be the real sender."""
    code, _ = smtp_plain(rig, "erin@example.org", "admin@example.org", "master-pw")
    assert code == 535, rig.logs()
    # The master user's own login is an ordinary one.
    code, _ = smtp_plain(rig, "", "admin@example.org", "master-pw")
    assert code == 235, rig.logs()


def test_login_with_a_trailing_space_is_refused(rig: Rig) -> None:
    """Dovecot's auth_username_chars refuses it; authd no longer maps it to alice."""
    code, _ = smtp_plain(rig, "", "alice@example.org ", "s3cret pass")
    assert code == 535, rig.logs()
