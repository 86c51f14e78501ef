"""Greylisting and rate limits behind a private stock Postfix (3.7 and 3.10), as an SMTP client sees them.

policyd sits in ``smtpd_recipient_restrictions`` (greylisting at RCPT) and in
``smtpd_data_restrictions`` (rate limits at DATA, where ``recipient_count`` is known), with a
short greylisting delay so the retry can be real.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devrig.release import Release
from tests.rig import Daemons, Postfix, RigFactory, free_port

pytestmark = pytest.mark.e2e

DELAY = 3


@dataclass
class Rig:
    root: Path
    postfix: Postfix
    daemons: Daemons

    def logs(self) -> str:
        return (f"--- maillog\n{self.postfix.log_text()[-4000:]}\n"
                f"--- policyd\n{self.daemons.output()[-4000:]}")


@pytest.fixture(scope="module")
def rig(release: Release) -> Iterator[Rig]:
    factory = RigFactory(release, "mp-pst-")
    root = factory.root
    policy_port = free_port()
    daemons = factory.daemons(
        {
            "mail": {"location": str(root / "vmail/%d/%n/Maildir"), "uid": 0, "gid": 0},
            "policyd": {
                "listen": f"tcp:{policy_port}:interface=127.0.0.1",
                # Postfix's client is 127.0.0.1: not trusted by policyd, so it is greylisted.
                "mynetworks": ["127.0.0.2/32"],
                "greylist": {
                    "delay": f"{DELAY}s",
                    "hostname": "mx.test.example",
                    "whitelist_recipients": ["limited@example.org"],
                },
                "ratelimit": {
                    "rules": {
                        "senders": {"key": ["sender"],
                                    "windows": [{"period": "1h", "messages": 2}]},
                    },
                },
            },
        },
        ["policyd"],
    )
    store = daemons.store
    store.add_domain("example.org")
    store.add_mailbox("bob@example.org", "{PLAIN}unused")
    store.add_mailbox("limited@example.org", "{PLAIN}unused")
    store.add_mailbox("carol@example.org", "{PLAIN}unused")
    policy = (f"check_policy_service {{ inet:127.0.0.1:{policy_port}, timeout=10s, "
              f"default_action=DUNNO }}")
    postfix = factory.postfix(
        main={
            "virtual_mailbox_domains": "example.org",
            "virtual_transport": "error:no delivery in this test",
            "smtpd_reject_unlisted_recipient": "no",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": policy,
            "smtpd_data_restrictions": policy,
        },
    )
    try:
        factory.start(daemons)
        factory.start(postfix)
        yield Rig(root, postfix, daemons)
    finally:
        factory.close()


def rcpt(rig: Rig, sender: str, recipient: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", rig.postfix.smtp_port, timeout=30) as smtp:
        smtp.ehlo("client.remote.example")
        code, _ = smtp.mail(sender)
        assert code == 250, rig.logs()
        return smtp.rcpt(recipient)


def send(rig: Rig, sender: str, recipient: str) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA; the reply to DATA (or to the RCPT that failed)."""
    with smtplib.SMTP("127.0.0.1", rig.postfix.smtp_port, timeout=30) as smtp:
        smtp.ehlo("client.remote.example")
        smtp.mail(sender)
        code, text = smtp.rcpt(recipient)
        if code != 250:
            return code, text
        code, text = smtp.docmd("DATA")
        if code != 354:
            return code, text
        smtp.send(b"Subject: test\r\n\r\nhello\r\n.\r\n")
        return smtp.getreply()


def test_greylisted_then_accepted_after_the_delay(rig: Rig) -> None:
    code, text = rcpt(rig, "alice@remote.example", "bob@example.org")
    assert code == 450, (text, rig.logs())
    assert b"4.7.1" in text and b"Greylisted" in text, rig.logs()
    # Too early: still greylisted.
    code, _ = rcpt(rig, "alice+tag@remote.example", "bob@example.org")
    assert code == 450
    time.sleep(DELAY + 0.5)
    code, text = rcpt(rig, "alice@remote.example", "bob@example.org")
    assert code == 250, (text, rig.logs())
    # Another recipient is another triplet.
    assert rcpt(rig, "alice@remote.example", "carol@example.org")[0] == 450


def test_rate_limit_defers_at_data(rig: Rig) -> None:
    sender = "bulk@remote.example"
    assert send(rig, sender, "limited@example.org")[0] == 250, rig.logs()
    assert send(rig, sender, "limited@example.org")[0] == 250, rig.logs()
    code, text = send(rig, sender, "limited@example.org")
    assert code == 450, (text, rig.logs())
    assert b"4.7.1" in text and b"Rate limit exceeded" in text
    # Another sender has its own count.
    assert send(rig, "other@remote.example", "limited@example.org")[0] == 250
