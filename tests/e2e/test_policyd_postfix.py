"""policyd behind a private stock Postfix (3.7 and 3.10): the SMTP replies a real client sees.

One rig for the module: Postfix with ``check_policy_service`` pointing at ``mailplugins serve
policyd``, and Dovecot as Postfix's SASL server with a static password (any user name, one
password) so that the login names come from our database only.

Port 25 is wired as recommended: the sender checks from ``smtpd_sender_restrictions``
(``policy_context=sender``) and the recipient checks from ``smtpd_recipient_restrictions``
(``policy_context=recipient``), so Postfix words each rejection with the right address. A second
smtpd (``-o`` overrides) stands in for submission with one ``policy_context=submission`` call
in the recipient list and its own rule set.

Postfix's own mynetworks (127.0.0.0/8) is wider than policyd's (127.0.0.2/32), so a relay
refusal for 127.0.0.1 can only come from policyd.
"""

from __future__ import annotations

import contextlib
import shutil
import smtplib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devrig.instances import dovecot_auth_listener, dovecot_static_auth
from devrig.release import Release
from tests.rig import (
    Daemons,
    Dovecot,
    Postfix,
    RigFactory,
    free_port,
    port_open,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e

PASSWORD = "static-secret"


@dataclass
class Rig:
    root: Path
    postfix: Postfix
    dovecot: Dovecot
    daemons: Daemons
    submission_port: int
    metrics_port: int

    def logs(self) -> str:
        return (f"--- maillog\n{self.postfix.log_text()[-4000:]}\n"
                f"--- policyd\n{self.daemons.output()[-4000:]}")


@pytest.fixture(scope="module")
def rig(release: Release) -> Iterator[Rig]:
    factory = RigFactory(release, "mp-pol-")
    root = factory.root
    policy_port = free_port()
    metrics_port = free_port()
    submission_port = free_port()
    policy_socket = root / "postfix" / "queue" / "private" / "mailplugins-policy"
    daemons = factory.daemons(
        {
            "mail": {"location": str(root / "vmail/%d/%n/Maildir"), "uid": 0, "gid": 0},
            "policyd": {
                # TCP for port 25; the production shape (a unix socket in Postfix's private/,
                # named relative to the queue directory) for submission. lockfile=0: Twisted's
                # <socket>.lock, owned by us, makes "postfix start" warn "not owned by postfix".
                "listen": [f"tcp:{policy_port}:interface=127.0.0.1",
                           f"unix:{policy_socket}:mode=666:lockfile=0"],
                "metrics": f"tcp:{metrics_port}:interface=127.0.0.1",
                "mynetworks": ["127.0.0.2/32"],
                "budget": "2s",
                "contexts": {
                    "sender": {"checks": ["sender_login_match", "spoof_protection"]},
                    "recipient": {"checks": ["recipient_validation", "relay_control"]},
                    "submission": {"checks": ["relay_control", "sender_login_match"]},
                },
            },
        },
        ["policyd"],
    )
    store = daemons.store
    store.add_domain("example.org")
    store.add_domain("example.net")
    store.add_mailbox("alice@example.org", "{PLAIN}unused")
    store.add_mailbox("carol@example.net", "{PLAIN}unused")
    store.add_alias("sales@example.org", ["alice@example.org"])
    store.grant_sender("alice@example.org", "boss@example.org")
    def policy(context: str, endpoint: str = f"inet:127.0.0.1:{policy_port}") -> str:
        return (f"check_policy_service {{ {endpoint}, timeout=10s, "
                f"default_action=DUNNO, policy_context={context} }}")

    postfix = factory.postfix(
        main={
            "virtual_mailbox_domains": "example.org, example.net",
            "virtual_transport": "error:no delivery in this test",
            "smtpd_reject_unlisted_recipient": "no",
            "smtpd_relay_restrictions":
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_sender_restrictions": policy("sender"),
            "smtpd_recipient_restrictions": policy("recipient"),
            "submission_recipient_restrictions": policy(
                "submission", "unix:private/mailplugins-policy"
            ),
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": "private/auth",
        },
        services=[
            f"127.0.0.1:{submission_port} inet n - n - - smtpd",
            "  -o smtpd_sender_restrictions=",
            "  -o smtpd_recipient_restrictions=$submission_recipient_restrictions",
        ],
    )
    dovecot = factory.dovecot(
        conf=dovecot_static_auth(release, PASSWORD, uid="nobody", gid="nogroup",
                                 home=f"{root}/home/%u")
        + dovecot_auth_listener(postfix.private_dir / "auth"),
        protocols=("imap",),
    )
    try:
        # Postfix's private/ (owned by postfix, as Postfix wants it) must exist before policyd
        # and Dovecot put their sockets there, and both must be up before Postfix starts: its
        # start-up probe runs an smtpd, which dies without the SASL socket and makes the master
        # throttle smtpd for a minute.
        postfix.private_dir.mkdir(parents=True, mode=0o700)
        shutil.chown(postfix.queue_dir, "root", "root")
        shutil.chown(postfix.private_dir, "postfix")
        factory.start(daemons)
        factory.start(dovecot)
        wait_until(lambda: (postfix.private_dir / "auth").exists(), what="dovecot auth socket")
        factory.start(postfix)
        wait_until(lambda: port_open(submission_port), what="submission smtpd")
        yield Rig(root, postfix, dovecot, daemons, submission_port, metrics_port)
    finally:
        factory.close()


def rcpt(
    rig: Rig,
    recipient: str,
    *,
    sender: str = "someone@elsewhere.example",
    source: str = "127.0.0.1",
    login: str | None = None,
    port: int | None = None,
) -> tuple[int, str]:
    """One SMTP session up to RCPT; the reply the client got for RCPT."""
    try:
        client = smtplib.SMTP("127.0.0.1", port or rig.postfix.smtp_port, timeout=30,
                              source_address=(source, 0))
    except (OSError, smtplib.SMTPException) as exc:
        raise AssertionError(f"no SMTP greeting: {exc!r}\n{rig.logs()}") from None
    try:
        client.ehlo("client.example")
        if login is not None:
            client.login(login, PASSWORD)
        code, message = client.mail(sender)
        assert code == 250, (code, message, rig.logs())
        if recipient.startswith("<"):  # verbatim: smtplib's quoting mangles source routes
            code, message = client.docmd(f"RCPT TO:{recipient}")
        else:
            code, message = client.rcpt(recipient)
        client.rset()
        return code, message.decode()
    except smtplib.SMTPServerDisconnected as exc:
        # Seen rarely on a loaded machine: keep what Postfix and policyd logged with the failure.
        raise AssertionError(f"session for {recipient} broke: {exc}\n{rig.logs()}") from None
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()


def test_unknown_local_user_is_550(rig: Rig) -> None:
    reply = rcpt(rig, "nobody@example.org")
    assert reply == (
        550, "5.1.1 <nobody@example.org>: Recipient address rejected: User unknown"
    ), rig.logs()


def test_known_local_users_are_accepted(rig: Rig) -> None:
    for recipient in ("alice@example.org", "Alice+tag@EXAMPLE.org", "sales@example.org",
                      "carol@example.net"):
        assert rcpt(rig, recipient)[0] == 250, (recipient, rig.logs())


def test_relay_denied_outside_policyd_mynetworks(rig: Rig) -> None:
    # Postfix itself would relay for 127.0.0.1 (its mynetworks is 127.0.0.0/8): policyd decides.
    # Postfix puts "Recipient address rejected:" before every policy reply text at RCPT.
    assert rcpt(rig, "x@other.example") == (
        554, "5.7.1 <x@other.example>: Recipient address rejected: Relay access denied"
    )


def test_relay_allowed_from_policyd_mynetworks(rig: Rig) -> None:
    assert rcpt(rig, "x@other.example", source="127.0.0.2")[0] == 250


def test_open_relay_tricks_are_rejected(rig: Rig) -> None:
    # Routing forms in our domain are unknown users, even from policyd's mynetworks.
    for recipient in ("x%other.example@example.org", "other.example!x@example.org",
                      '"x@other.example"@example.org', '"x%other.example"@example.org'):
        for source in ("127.0.0.1", "127.0.0.2"):
            code, message = rcpt(rig, recipient, source=source)
            assert code == 550, (recipient, source, code, message)
            assert message.endswith("Recipient address rejected: User unknown")
    # A source route or an IP literal is not ours: relay control decides.
    for recipient in ("<@example.org:x@other.example>", "x@[192.0.2.1]"):
        code, message = rcpt(rig, recipient)
        assert (code, message.split(": ", 1)[-1]) == (
            554, "Recipient address rejected: Relay access denied"), (recipient, message)


def test_authenticated_relay_allowed(rig: Rig) -> None:
    for sender in ("alice@example.org", "alice+x@example.org", "sales@example.org",
                   "boss@example.org", ""):
        code, message = rcpt(rig, "x@other.example", sender=sender, login="alice@example.org")
        assert code == 250, (sender, code, message, rig.logs())


def test_authenticated_sender_mismatch_rejected(rig: Rig) -> None:
    assert rcpt(rig, "x@other.example", sender="carol@example.net", login="alice@example.org") == (
        553,
        "5.7.1 <carol@example.net>: Sender address rejected: not owned by user alice@example.org",
    )


def test_spoofing_our_domain_unauthenticated(rig: Rig) -> None:
    assert rcpt(rig, "alice@example.org", sender="carol@example.net") == (
        553, "5.7.1 <carol@example.net>: Sender address rejected: not logged in"
    )


def test_submission_context_has_its_own_rule_set(rig: Rig) -> None:
    port = rig.submission_port
    # Spoof protection and recipient validation are not in the submission rule set...
    assert rcpt(rig, "alice@example.org", sender="carol@example.net", port=port)[0] == 250
    assert rcpt(rig, "nobody@example.org", port=port)[0] == 250
    # ...relay control and the sender/login match are.
    assert rcpt(rig, "x@other.example", port=port) == (
        554, "5.7.1 <x@other.example>: Recipient address rejected: Relay access denied"
    )
    # From the recipient list Postfix names the recipient, not the sender.
    assert rcpt(rig, "x@other.example", sender="carol@example.net", login="alice@example.org",
                port=port) == (
        553, "5.7.1 <x@other.example>: Recipient address rejected: not owned by user alice@example.org"
    )


def test_connections_are_reused(rig: Rig) -> None:
    # Postfix keeps its policy connections open; a server that closed them would cost 1 s each.
    for _ in range(3):
        rcpt(rig, "alice@example.org")
    log = rig.postfix.log_text()
    assert "problem talking to server" not in log, rig.logs()
    assert "fatal:" not in log and "throttling" not in log and "warning: not owned by postfix" not in log, log
    assert "Traceback" not in rig.daemons.output()


def test_metrics(rig: Rig) -> None:
    rcpt(rig, "nobody@example.org")
    rcpt(rig, "alice@example.org", port=rig.submission_port)  # through the unix socket
    with urllib.request.urlopen(f"http://127.0.0.1:{rig.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines() if line.startswith("mailplugins_policyd_")
    }
    assert samples['mailplugins_policyd_requests_total{action="550",protocol_state="RCPT"}'] >= 1
    assert samples['mailplugins_policyd_requests_total{action="DUNNO",protocol_state="RCPT"}'] >= 1
    assert samples["mailplugins_policyd_request_duration_seconds_count"] >= 2
    assert samples['mailplugins_policyd_open_connections{listener="policyd.listen[0]"}'] >= 1
    assert samples['mailplugins_policyd_connections_total{listener="policyd.listen[1]"}'] >= 1
    assert "@" not in "".join(samples)  # never an address in a label


def test_reload_takes_new_rules_and_drops_the_cache(rig: Rig) -> None:
    spoofed = {"sender": "carol@example.net"}
    assert rcpt(rig, "alice@example.org", **spoofed)[0] == 553
    assert rcpt(rig, "later@example.org")[0] == 550  # now cached as unknown
    rig.daemons.store.add_mailbox("later@example.org", "{PLAIN}unused")
    original = rig.daemons.config_data
    changed = {**original, "policyd": {**original["policyd"], "contexts": {
        **original["policyd"]["contexts"], "sender": {"checks": ["sender_login_match"]},
    }}}
    try:
        write_config(rig.daemons.config_path, changed)
        before = rig.daemons.output().count("configuration reloaded")
        rig.daemons.reload()
        wait_until(lambda: rig.daemons.output().count("configuration reloaded") > before,
                   what="policyd to reload")
        assert rcpt(rig, "alice@example.org", **spoofed)[0] == 250
        assert rcpt(rig, "later@example.org")[0] == 250
    finally:
        write_config(rig.daemons.config_path, original)
        before = rig.daemons.output().count("configuration reloaded")
        rig.daemons.reload()
        wait_until(lambda: rig.daemons.output().count("configuration reloaded") > before,
                   what="policyd to reload")
    assert rcpt(rig, "alice@example.org", **spoofed)[0] == 553
