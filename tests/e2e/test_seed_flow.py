"""The classic guides' mail server, end to end, from the local stack (stock Postfix + Dovecot).

bob submits over 587 with STARTTLS + AUTH, deliver stores it in alice's Maildir, alice reads it
over IMAP and POP3 with STARTTLS; relaying, spoofing and unknown users are refused; mail from
outside arrives on port 25.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import urllib.request
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import formatdate

import pytest

from devrig.instances import wait_until
from devrig.localstack import LocalStack
from devrig.release import Release
from tests.e2e.stacks import insecure_tls, running_stacks

pytestmark = pytest.mark.e2e

BOB = "bob@example.test"
ALICE = "alice@example.test"


tls = insecure_tls


@pytest.fixture(scope="module")
def stack(release: Release) -> Iterator[LocalStack]:
    with running_stacks(release) as (local,):
        yield local


def message(sender: str, recipient: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@test>"
    msg["Date"] = formatdate()  # else Postfix's cleanup adds one inside the header block
    msg.set_content("Hello Alice,\n.leading dot line\n\nnon-ASCII: Grüße\n" + "x" * 998 + "\n")
    return msg


def submit(stack: LocalStack, msg: EmailMessage, login: str, sender: str, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", stack.ports.submission, timeout=30) as client:
        client.starttls(context=tls())
        client.login(login, stack.passwords[login])
        client.send_message(msg, sender, [recipient])


def imap_fetch_by_subject(stack: LocalStack, user: str, subject: str) -> bytes | None:
    with imaplib.IMAP4("127.0.0.1", stack.ports.imap, timeout=30) as imap:
        imap.starttls(ssl_context=tls())
        imap.login(user, stack.passwords[user])
        status, _ = imap.select("INBOX")
        if status != "OK":  # no Maildir before the first delivery
            return None
        status, data = imap.search(None, "SUBJECT", f'"{subject}"')
        assert status == "OK"
        numbers = data[0].split()
        if not numbers:
            return None
        status, fetched = imap.fetch(numbers[-1], "(BODY.PEEK[])")
        assert status == "OK"
        part = fetched[0]
        assert isinstance(part, tuple)
        return bytes(part[1])


def test_a_user_without_mail_can_open_the_inbox(stack: LocalStack) -> None:
    with imaplib.IMAP4("127.0.0.1", stack.ports.imap, timeout=30) as imap:
        imap.starttls(ssl_context=tls())
        imap.login(BOB, stack.passwords[BOB])
        status, data = imap.select("INBOX")
        assert status == "OK", data


def _last_login_writes(stack: LocalStack) -> float:
    """last_login commits authd's dict listener answered, from its metrics."""
    url = f"http://127.0.0.1:{stack.ports.authd_metrics}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mailplugins_authd_dict_requests_total{")
               and 'command="commit"' in line and 'result="ok"' in line)


def test_an_imap_login_records_last_login(stack: LocalStack) -> None:
    """Dovecot's last_login plugin (in the IMAP process, as the mail user) reaches authd's dict
    socket, root:dovecot 0660 as the shipped socket unit makes it: no Permission denied."""
    before = _last_login_writes(stack)
    log_start = len(stack.dovecot.log_text()) if stack.dovecot else 0
    with imaplib.IMAP4("127.0.0.1", stack.ports.imap, timeout=30) as imap:
        imap.starttls(ssl_context=tls())
        imap.login(BOB, stack.passwords[BOB])
        imap.logout()
    wait_until(lambda: _last_login_writes(stack) > before, timeout=10,
               what="the last_login write to reach authd")
    assert stack.dovecot is not None
    assert "Permission denied" not in stack.dovecot.log_text()[log_start:]


def test_bob_submits_to_alice_who_reads_over_imap_and_pop3(stack: LocalStack) -> None:
    subject = f"seed {uuid.uuid4().hex}"
    msg = message(BOB, ALICE, subject)
    submit(stack, msg, BOB, BOB, ALICE)
    fetched = wait_until(lambda: imap_fetch_by_subject(stack, ALICE, subject), timeout=60,
                         what="the message in alice's INBOX")
    sent = msg.as_bytes().replace(b"\n", b"\r\n")
    # Byte-correct: the message as submitted, below the trace headers added on the way.
    assert fetched.endswith(sent)
    headers = fetched[: -len(sent)]
    assert b"Return-Path: <bob@example.test>" in headers
    assert b"Delivered-To: alice@example.test" in headers
    stack.postfix.wait_for_log(r"to=<alice@example.test>.*status=sent", timeout=10)

    pop = poplib.POP3("127.0.0.1", stack.ports.pop3, timeout=30)
    try:
        pop.stls(context=tls())
        pop.user(ALICE)
        pop.pass_(stack.passwords[ALICE])
        count, _size = pop.stat()
        bodies = [b"\r\n".join(pop.retr(i + 1)[1]) for i in range(count)]
    finally:
        pop.quit()
    assert any(body.endswith(sent.rstrip(b"\r\n")) for body in bodies)


def test_auth_needs_tls_on_submission(stack: LocalStack) -> None:
    with smtplib.SMTP("127.0.0.1", stack.ports.submission, timeout=30) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        client.starttls(context=tls())
        client.ehlo()
        assert client.has_extn("auth")


def test_wrong_password_is_refused(stack: LocalStack) -> None:
    with smtplib.SMTP("127.0.0.1", stack.ports.submission, timeout=30) as client:
        client.starttls(context=tls())
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login(BOB, "not-the-password")
        assert info.value.smtp_code == 535


def test_unauthenticated_relay_is_refused(stack: LocalStack) -> None:
    with smtplib.SMTP("127.0.0.1", stack.ports.smtp, timeout=30) as client:
        client.ehlo("outside.example")
        client.mail("someone@outside.example")
        code, text = client.rcpt("victim@elsewhere.example")
    assert code == 554
    assert b"Relay access denied" in text


def test_bob_may_not_send_as_alice(stack: LocalStack) -> None:
    with smtplib.SMTP("127.0.0.1", stack.ports.submission, timeout=30) as client:
        client.starttls(context=tls())
        client.login(BOB, stack.passwords[BOB])
        client.mail(ALICE)
        code, text = client.rcpt("friend@elsewhere.example")
    assert code == 553
    assert b"not owned by user bob@example.test" in text


def test_unknown_local_user_is_refused_at_rcpt(stack: LocalStack) -> None:
    with smtplib.SMTP("127.0.0.1", stack.ports.smtp, timeout=30) as client:
        client.ehlo("outside.example")
        client.mail("someone@outside.example")
        code, text = client.rcpt("nobody@example.test")
    assert code == 550
    assert b"5.1.1" in text and b"User unknown" in text


def test_mail_from_outside_arrives_on_port_25(stack: LocalStack) -> None:
    subject = f"inbound {uuid.uuid4().hex}"
    msg = message("carol@outside.example", ALICE, subject)
    with smtplib.SMTP("127.0.0.1", stack.ports.smtp, timeout=30) as client:
        client.ehlo("mx.outside.example")
        client.send_message(msg, "carol@outside.example", [ALICE])
    fetched = wait_until(lambda: imap_fetch_by_subject(stack, ALICE, subject), timeout=60,
                         what="the inbound message")
    assert fetched.endswith(msg.as_bytes().replace(b"\n", b"\r\n"))


def test_no_password_or_auth_payload_in_any_log(stack: LocalStack) -> None:
    """Runs last in this module: every log of the runs above is checked."""
    import base64

    # One more failed and one more good login, so both paths have been logged.
    with smtplib.SMTP("127.0.0.1", stack.ports.submission, timeout=30) as client:
        client.starttls(context=tls())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(ALICE, "wrong-Secret-42")
    logs = {
        "daemons": (stack.root / "daemons.log").read_text(errors="replace"),
        "postfix": stack.postfix.log_text(),
        "dovecot": stack.dovecot.log_text() if stack.dovecot else "",
    }
    secrets = ["wrong-Secret-42", *stack.passwords.values()]
    for user, password in stack.passwords.items():
        plain = f"\0{user}\0{password}".encode()
        secrets.append(base64.b64encode(plain).decode())
        secrets.append(base64.b64encode(password.encode()).decode())
    for name, text in logs.items():
        assert text, f"{name} log is empty"
        for secret in secrets:
            assert secret not in text, f"a password or AUTH payload appears in the {name} log"


def test_sockets_have_the_configured_modes(stack: LocalStack) -> None:
    import os
    import stat

    private = stack.postfix.private_dir
    for name in ("mailplugins-policy", "mailplugins-auth", "mailplugins-deliver"):
        mode = os.stat(private / name).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o666
    dict_mode = os.stat(stack.root / "dict.sock").st_mode
    assert stat.S_IMODE(dict_mode) == 0o660
    assert stat.S_IMODE(os.stat(stack.root / "demo-passwords").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(stack.tls_key).st_mode) == 0o600
