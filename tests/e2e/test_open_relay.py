"""Open-relay battery through real Postfix + policyd: not one message may leave.

Every classic trick is tried unauthenticated on port 25. Each recipient must be refused at
RCPT, or, where it truly names a local mailbox, be delivered locally; Postfix's outbound smtp
client must never run.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest

from devrig.localstack import LocalStack
from devrig.release import Release
from tests.e2e.stacks import running_stacks

pytestmark = pytest.mark.e2e

TRICKS = [
    "victim%elsewhere.example@example.test",
    "victim%elsewhere.example@EXAMPLE.TEST",
    "alice%elsewhere.example@example.test",
    '"victim@elsewhere.example"@example.test',
    '"victim%elsewhere.example"@example.test',
    "@example.test:victim@elsewhere.example",
    "@mail.example.test,@example.test:victim@elsewhere.example",
    "elsewhere.example!victim@example.test",
    "elsewhere.example!alice@example.test",
    "victim@elsewhere.example@example.test",
    "victim@[192.0.2.1]",
    "victim@[127.0.0.1]",
    "alice@[127.0.0.1]",
    "victim@[IPv6:::1]",
    "victim@ELSEWHERE.example",
    "victim@elsewhere.example.",
    "victim@example.test.elsewhere.example",
    "victim@xn--bcher-kva.example",
    "victim@sub.example.test",
    "victim@localhost",
    "victim",
    "postmaster@elsewhere.example",
]


@pytest.fixture(scope="module")
def stack(release: Release) -> Iterator[LocalStack]:
    with running_stacks(release) as (local,):
        yield local


def test_no_trick_relays(stack: LocalStack) -> None:
    accepted: list[str] = []
    with smtplib.SMTP("127.0.0.1", stack.ports.smtp, timeout=30) as client:
        client.ehlo("attacker.example")
        for recipient in TRICKS:
            code, _ = client.mail("spammer@attacker.example")
            assert code == 250
            code, text = client.rcpt(f"<{recipient}>")
            if code < 400:
                accepted.append(recipient)
                client.data(b"Subject: relay test\r\n\r\nrelay test\r\n")
            else:
                assert code >= 500 or b"4.7.1" in text or code == 450, (recipient, code, text)
                client.rset()
    # Whatever was accepted must have gone to a local mailbox through deliver, never outward.
    for recipient in accepted:
        assert recipient.split("@")[-1].lower().rstrip(".") in ("example.test",), recipient
    stack.postfix.flush()
    log = stack.postfix.log_text()
    assert "postfix/smtp[" not in log, "Postfix's outbound smtp client ran: something was relayed"
    assert "relay=" not in log or all(
        "relay=" not in line or "mailplugins-deliver" in line for line in log.splitlines()
    )
    assert " status=sent" not in log or all(
        "status=sent" not in line or "mailplugins-deliver" in line for line in log.splitlines()
    )


def test_case_and_idna_variants_of_our_domain_stay_local(stack: LocalStack) -> None:
    with smtplib.SMTP("127.0.0.1", stack.ports.smtp, timeout=30) as client:
        client.ehlo("sender.example")
        client.mail("friend@sender.example")
        assert client.rcpt("ALICE@Example.TEST")[0] == 250
        assert client.rcpt("nobody@EXAMPLE.test")[0] == 550
