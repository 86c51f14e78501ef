"""Two complete "MX hosts" (daemons, Postfix, Dovecot, Maildir roots) sharing one PostgreSQL."""

from __future__ import annotations

import imaplib
import smtplib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devrig.instances import wait_until
from devrig.localstack import LocalStack
from devrig.release import Release
from tests.conftest import PG_ADMIN_URL, _server_database
from tests.e2e.stacks import insecure_tls, running_stacks

pytestmark = pytest.mark.e2e


tls = insecure_tls


def two_hosts(release: Release, **options: Any) -> Iterator[tuple[LocalStack, LocalStack]]:
    """Two stacks ("MX hosts") on ``release`` on one fresh PostgreSQL database."""
    database = _server_database(PG_ADMIN_URL, "postgresql")
    try:
        with running_stacks(release, 2, database_url=next(database), **options) as (first, second):
            yield first, second
    finally:
        database.close()


@pytest.fixture(scope="module")
def hosts(release: Release) -> Iterator[tuple[LocalStack, LocalStack]]:
    yield from two_hosts(release)


def test_user_added_on_one_host_works_on_the_other(hosts: tuple[LocalStack, LocalStack]) -> None:
    first, second = hosts
    address = f"carol{uuid.uuid4().hex[:6]}@example.test"
    added = first.daemons.cli("user", "add", address, "--password-stdin", input="carol-pw\n")
    assert added.returncode == 0, added.stderr

    # SMTP AUTH through the second host's Postfix and authd.
    with smtplib.SMTP("127.0.0.1", second.ports.submission, timeout=30) as client:
        client.starttls(context=tls())
        client.login(address, "carol-pw")
        client.sendmail(address, [address], b"Subject: via second\r\n\r\nhello from host two\r\n")

    # Delivered by the second host's deliver into its own Maildir root, read over its IMAP.
    def fetched() -> bytes | None:
        with imaplib.IMAP4("127.0.0.1", second.ports.imap, timeout=30) as imap:
            imap.starttls(ssl_context=tls())
            imap.login(address, "carol-pw")
            status, _ = imap.select("INBOX")
            if status != "OK":
                return None
            _, data = imap.search(None, "ALL")
            if not data[0]:
                return None
            _, parts = imap.fetch(data[0].split()[-1], "(BODY.PEEK[TEXT])")
            return bytes(parts[0][1])  # type: ignore[index]

    assert wait_until(fetched, timeout=60, what="carol's mail on host two") == b"hello from host two\r\n"
    local, domain = address.split("@")
    assert list((Path(second.root) / "mail" / domain / local / "Maildir" / "new").iterdir()) or list(
        (Path(second.root) / "mail" / domain / local / "Maildir" / "cur").iterdir())
    assert not (Path(first.root) / "mail" / domain / local).exists()

    # The first host's Dovecot (dict passdb through its authd) knows the user as well.
    with imaplib.IMAP4("127.0.0.1", first.ports.imap, timeout=30) as imap:
        imap.starttls(ssl_context=tls())
        status, _ = imap.login(address, "carol-pw")
        assert status == "OK"


def test_disabling_on_one_host_locks_out_on_both(hosts: tuple[LocalStack, LocalStack]) -> None:
    first, second = hosts
    address = f"dave{uuid.uuid4().hex[:6]}@example.test"
    assert first.daemons.cli("user", "add", address, "--password-stdin", input="dave-pw\n").returncode == 0
    assert second.daemons.cli("user", "disable", address).returncode == 0
    for host in (first, second):
        with smtplib.SMTP("127.0.0.1", host.ports.submission, timeout=30) as client:
            client.starttls(context=tls())
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login(address, "dave-pw")


POLICY = {
    "greylist": {"delay": "3s", "auto_whitelist_passes": 0},
    "ratelimit": {"rules": {"submission": {
        "key": ["sasl_username"], "clients": "authenticated",
        "windows": [{"period": "1h", "messages": 2}],
    }}},
}


@pytest.fixture(scope="module")
def policy_hosts(release: Release) -> Iterator[tuple[LocalStack, LocalStack]]:
    yield from two_hosts(release, policyd=POLICY)


def test_greylisted_on_one_host_passes_on_the_other(
    policy_hosts: tuple[LocalStack, LocalStack]
) -> None:
    first, second = policy_hosts

    def rcpt(host: LocalStack) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", host.ports.smtp, timeout=30) as client:
            client.ehlo("mx.sender.example")
            client.mail("news@sender.example")
            return client.rcpt("alice@example.test")

    code, text = rcpt(first)
    assert code == 450 and b"Greylisted" in text, (code, text)
    assert rcpt(second)[0] == 450  # still inside the delay, whichever host is asked
    import time

    time.sleep(3.5)
    assert rcpt(second)[0] == 250  # the retry reaches the other MX: it passes there


def test_rate_limits_count_across_hosts(policy_hosts: tuple[LocalStack, LocalStack]) -> None:
    first, second = policy_hosts
    bob = "bob@example.test"

    def send(host: LocalStack) -> None:
        with smtplib.SMTP("127.0.0.1", host.ports.submission, timeout=30) as client:
            client.starttls(context=tls())
            client.login(bob, first.passwords[bob])  # the first host created the demo users
            client.sendmail(bob, ["alice@example.test"], b"Subject: count\r\n\r\ncount\r\n")

    send(first)
    send(second)
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(first)  # the third message of the hour, whichever host it reaches
    assert info.value.smtp_code == 450
    assert b"Rate limit exceeded" in info.value.smtp_error
