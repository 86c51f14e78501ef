"""SPF and greylisting together behind a private stock Postfix (3.7 and 3.10), with DNS from a local stub.

This machine has no DNS, so a small UDP server (dnspython messages) answers the TXT records
and policyd's ``spf.nameservers`` points pyspf at it. What is checked is what only the real
Postfix shows: an SPF ``fail`` is refused at RCPT with ``550 5.7.23``; a passing sender is
greylisted first; and when its retry is accepted, both headers policyd asks Postfix to prepend
(``Received-SPF`` and ``X-Greylist``, one per policy reply: at RCPT and at DATA) are in the
message deliver stores.
"""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from devrig.release import Release
from tests.rig import Daemons, Postfix, RigFactory, free_port, wait_until

pytestmark = pytest.mark.e2e

DELAY = 2
#: The stub's zone: TXT records by name; everything else is NXDOMAIN.
RECORDS = {
    "pass.example.": "v=spf1 ip4:127.0.0.0/8 -all",
    "fail.example.": "v=spf1 ip4:192.0.2.0/24 -all",
}


class StubDNS:
    """A UDP DNS server answering RECORDS, in a thread, on a free loopback port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.queries: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> StubDNS:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text().lower()
            self.queries.append(f"{name} {dns.rdatatype.to_text(question.rdtype)}")
            text = RECORDS.get(name)
            if text is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.TXT:
                response.answer.append(dns.rrset.from_text(name, 60, "IN", "TXT", f'"{text}"'))
            self.sock.sendto(response.to_wire(), peer)


@dataclass
class Rig:
    postfix: Postfix
    daemons: Daemons
    dns: StubDNS
    root: Path

    def logs(self) -> str:
        return (f"--- maillog\n{self.postfix.log_text()[-4000:]}\n"
                f"--- daemons\n{self.daemons.output()[-4000:]}\n--- dns {self.dns.queries[-20:]}")

    def stored(self, user: str) -> list[bytes]:
        new = self.root / "vmail" / "example.org" / user / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


@pytest.fixture(scope="module")
def rig(release: Release) -> Iterator[Rig]:
    factory = RigFactory(release, "mp-spf-")
    root = factory.root
    stub = StubDNS().start()
    factory.stop_later([stub])
    policy_port, lmtp_port = free_port(), free_port()
    daemons = factory.daemons({
        "mail": {"location": str(root / "vmail/%d/%n/Maildir"), "uid": 0, "gid": 0},
        "policyd": {
            "listen": f"tcp:{policy_port}:interface=127.0.0.1",
            "mynetworks": ["127.0.0.2/32"],  # Postfix's client 127.0.0.1 is not trusted
            "greylist": {"delay": f"{DELAY}s", "hostname": "mx.test.example"},
            "spf": {"nameservers": [f"127.0.0.1:{stub.port}"], "receiver": "mx.test.example",
                    "timeout": "3s"},
        },
        "deliver": {"listen": f"tcp:{lmtp_port}:interface=127.0.0.1", "hostname": "mx.test.example"},
    }, ["policyd", "deliver"])
    daemons.store.add_domain("example.org")
    daemons.store.add_mailbox("bob@example.org", "{PLAIN}unused")
    daemons.store.add_mailbox("carol@example.org", "{PLAIN}unused")
    policy = f"check_policy_service {{ inet:127.0.0.1:{policy_port}, timeout=10s, default_action=DUNNO }}"
    postfix = factory.postfix(main={
        "virtual_mailbox_domains": "example.org",
        "virtual_transport": f"lmtp:inet:127.0.0.1:{lmtp_port}",
        "smtpd_reject_unlisted_recipient": "no",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": policy,
        "smtpd_data_restrictions": policy,
    })
    try:
        factory.start(daemons)
        factory.start(postfix)
        yield Rig(postfix, daemons, stub, root)
    finally:
        factory.close()


def session(rig: Rig, sender: str, recipient: str, body: bytes | None = None) -> tuple[int, bytes]:
    """MAIL, RCPT and (with ``body``) DATA: the last reply."""
    with smtplib.SMTP("127.0.0.1", rig.postfix.smtp_port, timeout=30) as smtp:
        smtp.ehlo("client.remote.example")
        assert smtp.mail(sender)[0] == 250, rig.logs()
        code, text = smtp.rcpt(recipient)
        if code != 250 or body is None:
            return code, text
        code, text = smtp.docmd("DATA")
        if code != 354:
            return code, text
        smtp.send(body + b"\r\n.\r\n")
        return smtp.getreply()


def test_spf_fail_is_refused_at_rcpt(rig: Rig) -> None:
    code, text = session(rig, "someone@fail.example", "carol@example.org")
    assert code == 550, (text, rig.logs())
    assert b"5.7.23" in text and b"SPF validation failed" in text, rig.logs()
    assert "fail.example. TXT" in rig.dns.queries


def test_greylisted_pass_arrives_with_both_headers(rig: Rig) -> None:
    code, text = session(rig, "alice@pass.example", "bob@example.org")
    assert code == 450 and b"Greylisted" in text, (text, rig.logs())
    time.sleep(DELAY + 0.5)
    body = b"Subject: spf and greylist\r\nMessage-ID: <spf-1@pass.example>\r\n\r\nhello"
    code, text = session(rig, "alice@pass.example", "bob@example.org", body)
    assert code == 250, (text, rig.logs())
    wait_until(lambda: rig.stored("bob"), timeout=30, what=f"the message in bob's Maildir\n{rig.logs()}")
    (stored,) = rig.stored("bob")
    head = stored.split(b"\n\n", 1)[0]
    spf = b"\nReceived-SPF: Pass (mx.test.example: domain of pass.example designates 127.0.0.1 as permitted"
    assert spf in head, (head, rig.logs())
    assert b"\nX-Greylist: delayed " in head, (head, rig.logs())
    assert head.count(b"Received-SPF:") == 1 and head.count(b"X-Greylist:") == 1
    assert stored.endswith(b"\n\nhello\n")
