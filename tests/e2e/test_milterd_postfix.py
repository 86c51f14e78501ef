"""milterd behind private stock Postfix (each release the rig covers), DNS from a local stub.

One rig per module: Postfix with milterd wired as ``postfix-config`` wires it (the milter
settings are taken from ``postfix_config``: port 25 ``default_action=accept``, a submission
smtpd with SASL and ``tempfail``, ``non_smtpd_milters`` ``tempfail``), deliver behind
``virtual_transport`` for example.org, mail for ``sink.test`` relayed to ``smtp-sink -D`` (what
Postfix finally sends), Dovecot as the SASL server (one static password, logins from our
database only), and a stub authoritative DNS server (UDP and TCP on loopback) that milterd's
``nameservers`` points at.

Oracles: dkimpy (``dkim.DKIM.verify`` with the stub's records) and Debian's OpenDKIM in test
mode (``opendkim -t`` with ``TestDNSData``), both for verifying what milterd signed and for
signing what milterd must verify.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from devrig.instances import dovecot_auth_listener, dovecot_static_auth
from devrig.release import Release
from mailplugins.dkim_keys import DkimKeys
from mailplugins.wiring.postfix import PostfixOptions, postfix_config
from tests.rig import Daemons, Dovecot, Postfix, RigFactory, free_port, port_open, wait_until
from tests.support.stubdns import StubDNS, stub_dns

pytestmark = pytest.mark.e2e

PASSWORD = "static-secret"
AUTHSERV_ID = "mx.test.example"


def _rsa_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


def _ed25519_key() -> tuple[bytes, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed), base64.b64encode(public).decode()


@dataclass
class Outside:
    """Foreign domains that send to us, with keys we sign with as dkimpy or OpenDKIM would."""

    rsa_pem: bytes = b""
    ed_seed: bytes = b""
    records: dict[str, str] = field(default_factory=dict)

    def publish(self, stub: StubDNS) -> None:
        self.rsa_pem, rsa_public = _rsa_key()
        self.ed_seed, ed_public = _ed25519_key()
        for domain in ("sender.example", "bank.example", "quar.example"):
            self.records[f"r1._domainkey.{domain}"] = f"v=DKIM1; k=rsa; p={rsa_public}"
            self.records[f"e1._domainkey.{domain}"] = f"v=DKIM1; k=ed25519; p={ed_public}"
            self.records[domain] = "v=spf1 ip4:192.0.2.0/24 -all"  # 127.0.0.1 fails SPF
        self.records["_dmarc.sender.example"] = "v=DMARC1; p=reject"
        self.records["_dmarc.bank.example"] = "v=DMARC1; p=reject"
        self.records["_dmarc.quar.example"] = "v=DMARC1; p=quarantine"
        for name, text in self.records.items():
            strings = [text[i:i + 255] for i in range(0, len(text), 255)]
            stub.add(name, "TXT", [s.encode() for s in strings])

    def dkimpy_sign(self, message: bytes, domain: str, algorithm: str = "rsa") -> bytes:
        if algorithm == "rsa":
            header = dkim.sign(message, b"r1", domain.encode(), self.rsa_pem,
                               canonicalize=(b"relaxed", b"relaxed"))
        else:
            header = dkim.sign(message, b"e1", domain.encode(), self.ed_seed,
                               canonicalize=(b"relaxed", b"relaxed"),
                               signature_algorithm=b"ed25519-sha256")
        return bytes(header) + message


@dataclass
class Rig:
    root: Path
    postfix: Postfix
    dovecot: Dovecot
    daemons: Daemons
    dns: StubDNS
    outside: Outside
    submission_port: int
    milter_tcp_port: int
    dump: Path
    oracle_dir: Path

    def logs(self) -> str:
        return (f"--- maillog\n{self.postfix.log_text()[-5000:]}\n"
                f"--- milterd\n{self.daemons.output()[-5000:]}")

    def stored(self, user: str, folder: str = "") -> list[bytes]:
        base = self.root / "vmail" / "example.org" / user / "Maildir"
        new = (base / f".{folder}" / "new") if folder else (base / "new")
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def sunk(self) -> list[bytes]:
        """Messages smtp-sink received, in order (its dump: one transaction per block)."""
        if not self.dump.exists():
            return []
        text = self.dump.read_bytes()
        return [b"X-Client-Addr:" + part for part in text.split(b"X-Client-Addr:")[1:]]

    def sunk_with(self, marker: bytes) -> bytes:
        found: list[bytes] = []

        def arrived() -> bool:
            found[:] = [m for m in self.sunk() if marker in m]
            return bool(found)

        wait_until(arrived, timeout=30, what=f"{marker!r} at smtp-sink\n{self.logs()}")
        return found[0]

    def txt(self, name: str) -> bytes | None:
        found = self.dns.records.get((name.rstrip(".").lower(), "TXT"))
        return b"".join(found[0]) if found else None


def message_of(sunk: bytes) -> bytes:
    """The message as smtp-sink got it, without its own X-* and Received: lines, CRLF ends."""
    lines = sunk.replace(b"\r\n", b"\n").split(b"\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(b"Received: from mx.test.example"))
    rest = lines[start + 1:]
    while rest and rest[0][:1] in (b" ", b"\t"):
        rest = rest[1:]  # smtp-sink's own Received: continuation lines
    text = b"\r\n".join(rest).rstrip(b"\r\n") + b"\r\n"
    return text


@pytest.fixture(scope="module")
def rig(release: Release) -> Iterator[Rig]:
    factory = RigFactory(release, "mp-milt-")
    root = factory.root
    with stub_dns() as stub:
        outside = Outside()
        outside.publish(stub)
        submission_port, lmtp_port, sink_port, milter_tcp = free_port(), free_port(), free_port(), free_port()
        private = root / "postfix" / "queue" / "private"
        database = {"url": f"sqlite:///{root}/mail.db"}
        # Two processes on one database: milterd can then be stopped while deliver goes on.
        delivery = factory.daemons({
            "database": database,
            "mail": {"location": str(root / "vmail/%d/%n/Maildir"), "uid": 0, "gid": 0},
            "deliver": {"listen": f"tcp:{lmtp_port}:interface=127.0.0.1", "hostname": "mx.test.example",
                        "authserv_id": AUTHSERV_ID},
        }, ["deliver"], subdir="deliver")
        daemons = factory.daemons({
            "database": database,
            "milterd": {
                "listen": [f"unix:{private}/mailplugins-milter:mode=666:lockfile=0",
                           f"tcp:{milter_tcp}:interface=127.0.0.1"],
                "authserv_id": AUTHSERV_ID,
                "mynetworks": [],
                "nameservers": [stub.nameserver],
                "dns_timeout": "3s",
                "dns_cache_ttl": "0s",
            },
        }, ["milterd"])
        store = daemons.store
        store.add_domain("example.org")
        store.add_mailbox("alice@example.org", "{PLAIN}unused")
        store.add_mailbox("bob@example.org", "{PLAIN}unused")
        keys = DkimKeys(daemons.engine)
        for key_type in ("rsa", "ed25519"):
            record = keys.generate("example.org", key_type=key_type)
            keys.activate("example.org", record.selector)
            text = record.txt_value()
            stub.add(record.dns_name, "TXT", [text[i:i + 255].encode() for i in range(0, len(text), 255)])
        stub.add("_dmarc.example.org", "TXT", [b"v=DMARC1; p=reject"])

        # The milter settings exactly as `mailplugins postfix-config` writes them.
        generated = postfix_config(daemons.config, PostfixOptions(
            queue_directory=str(root / "postfix" / "queue"), chroot=False)).main_dict()
        milters = {name: generated[name] for name in (
            "milter_protocol", "smtpd_milters", "non_smtpd_milters", "mailplugins_submission_milters")}
        assert "default_action=accept" in milters["smtpd_milters"]
        assert "default_action=tempfail" in milters["mailplugins_submission_milters"]

        dump = root / "sink" / "dump"
        dump.parent.mkdir()
        dump.parent.chmod(0o777)
        postfix = factory.postfix(
            main={
                "virtual_mailbox_domains": "example.org",
                "virtual_transport": f"lmtp:inet:127.0.0.1:{lmtp_port}",
                "transport_maps": f"inline:{{ sink.test=smtp:[127.0.0.1]:{sink_port} }}",
                "smtpd_relay_restrictions":
                    "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
                "mynetworks": "127.0.0.0/8",
                **milters,
                "submission_tcp_milters": milters["mailplugins_submission_milters"].replace(
                    "unix:private/mailplugins-milter", f"inet:127.0.0.1:{milter_tcp}"),
                "smtpd_sasl_type": "dovecot",
                "smtpd_sasl_path": "private/auth",
            },
            services=[
                f"127.0.0.1:{submission_port} inet n - n - - smtpd",
                "  -o smtpd_sasl_auth_enable=yes",
                "  -o smtpd_milters=$mailplugins_submission_milters",
                "  -o milter_macro_daemon_name=ORIGINATING",
            ],
        )
        dovecot = factory.dovecot(
            conf=dovecot_static_auth(release, PASSWORD, uid="nobody", gid="nogroup",
                                     home=f"{root}/home/%u")
            + dovecot_auth_listener(postfix.private_dir / "auth"),
            protocols=("imap",),
        )
        sink = subprocess.Popen(["smtp-sink", "-u", "postfix", "-D", str(dump),
                                 f"127.0.0.1:{sink_port}", "100"])
        oracle_dir = Path(tempfile.mkdtemp(prefix="mp-opendkim-", dir=os.path.expanduser("~")))
        try:
            postfix.private_dir.mkdir(parents=True, mode=0o700)
            shutil.chown(postfix.queue_dir, "root", "root")
            shutil.chown(postfix.private_dir, "postfix")
            factory.start(delivery)
            factory.start(daemons)
            factory.start(dovecot)
            wait_until(lambda: (postfix.private_dir / "auth").exists(), what="dovecot auth socket")
            factory.start(postfix)
            wait_until(lambda: port_open(submission_port), what="submission smtpd")
            wait_until(lambda: port_open(sink_port), what="smtp-sink")
            yield Rig(root, postfix, dovecot, daemons, stub, outside, submission_port, milter_tcp,
                      dump, oracle_dir)
        finally:
            sink.terminate()
            sink.wait(10)
            shutil.rmtree(oracle_dir, ignore_errors=True)
            factory.close()


def submit(rig: Rig, message: bytes, *, sender: str = "alice@example.org",
           recipients: tuple[str, ...] = ("x@sink.test",), port: int | None = None,
           login: str | None = "alice@example.org") -> tuple[int, bytes]:
    """One SMTP transaction; the reply to the end of DATA (or the first refusal)."""
    with smtplib.SMTP("127.0.0.1", port or rig.submission_port, timeout=60) as smtp:
        smtp.ehlo("client.example")
        if login is not None:
            smtp.login(login, PASSWORD)
        code, text = smtp.mail(sender)
        assert code == 250, (code, text, rig.logs())
        for recipient in recipients:
            code, text = smtp.rcpt(recipient)
            assert code == 250, (code, text, rig.logs())
        code, text = smtp.docmd("DATA")
        assert code == 354, (code, text)
        smtp.send(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b".\r\n")
        return smtp.getreply()


def incoming(rig: Rig, message: bytes, sender: str, recipient: str = "bob@example.org") -> tuple[int, bytes]:
    return submit(rig, message, sender=sender, recipients=(recipient,), port=rig.postfix.smtp_port,
                  login=None)


def dkimpy_verify(rig: Rig, message: bytes) -> list[bool]:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return rig.txt(name.decode())

    checker = dkim.DKIM(message)
    count = len([h for h in checker.headers if h[0].lower() == b"dkim-signature"])
    return [checker.verify(idx=i, dnsfunc=dnsfunc) for i in range(count)]


def opendkim(rig: Rig, message: bytes, *settings: str) -> str:
    """``opendkim -t`` on ``message`` with ``settings``: what it would add (its INSHEADER lines)."""
    directory = Path(tempfile.mkdtemp(dir=rig.oracle_dir))
    (directory / "dns").write_text("".join(f"{name} {text}\n" for name, text in _all_txt(rig)))
    conf = directory / "opendkim.conf"
    conf.write_text("\n".join(["Syslog no", f"TestDNSData file:{directory / 'dns'}", *settings]) + "\n")
    path = directory / "message.eml"
    path.write_bytes(message)
    result = subprocess.run(["opendkim", "-x", str(conf), "-vvv", "-t", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    return result.stdout + result.stderr


def _all_txt(rig: Rig) -> list[tuple[str, str]]:
    return [(name, b"".join(values[0]).decode()) for (name, kind), values in rig.dns.records.items()
            if kind == "TXT"]


def authentication_results(stored: bytes) -> list[str]:
    head = stored.split(b"\n\n", 1)[0].decode()
    unfolded = re.sub(r"\r?\n[ \t]+", " ", head)
    return [line.split(":", 1)[1].strip() for line in unfolded.splitlines()
            if line.lower().startswith("authentication-results:")]


OUTGOING = (b"From: Alice <alice@example.org>\r\nTo: x@sink.test\r\nSubject: signed\r\n"
            b"Message-ID: <{n}@example.org>\r\n\r\nHello,\r\n\r\nthis leaves signed.\r\n")


# -- outgoing ------------------------------------------------------------------------------------


def test_authenticated_mail_leaves_signed_and_verifies_with_dkimpy_and_opendkim(rig: Rig) -> None:
    code, text = submit(rig, OUTGOING.replace(b"{n}", b"out-1"))
    assert code == 250, (text, rig.logs())
    sent = message_of(rig.sunk_with(b"<out-1@example.org>"))
    assert sent.startswith(b"DKIM-Signature:"), sent
    signatures = [line for line in sent.split(b"\r\n") if line.startswith(b"DKIM-Signature:")]
    assert len(signatures) == 2 and b"a=rsa-sha256" in signatures[0] and b"a=ed25519-sha256" in signatures[1]
    assert dkimpy_verify(rig, sent) == [True, True]
    verdict = opendkim(rig, sent, "Mode v")
    assert re.search(r"dkim=pass[^;]*header\.d=example\.org", verdict), verdict


def test_the_same_over_tcp(rig: Rig) -> None:
    saved = rig.postfix.main["mailplugins_submission_milters"]
    rig.postfix.set_main(mailplugins_submission_milters="$submission_tcp_milters")
    rig.postfix.reload()
    try:
        code, text = submit(rig, OUTGOING.replace(b"{n}", b"out-tcp"))
        assert code == 250, (text, rig.logs())
        assert dkimpy_verify(rig, message_of(rig.sunk_with(b"<out-tcp@example.org>"))) == [True, True]
    finally:
        rig.postfix.set_main(mailplugins_submission_milters=saved)
        rig.postfix.reload()


def test_a_from_the_login_does_not_own_is_refused(rig: Rig) -> None:
    message = OUTGOING.replace(b"Alice <alice@example.org>", b"bob@example.org").replace(b"{n}", b"out-2")
    code, text = submit(rig, message)
    assert code == 550 and b"5.7.1" in text and b"not owned by user alice@example.org" in text, text


def test_sendmail_mail_is_signed(rig: Rig) -> None:
    message = OUTGOING.replace(b"{n}", b"out-3").replace(b"\r\n", b"\n")
    process = subprocess.run(
        rig.postfix.release.command(["sendmail", "-C", str(rig.postfix.etc), "-f", "alice@example.org",
                                     "x@sink.test"], rig.postfix.binds),
        input=message, capture_output=True, timeout=60, check=False)
    assert process.returncode == 0, process.stderr
    sent = message_of(rig.sunk_with(b"<out-3@example.org>"))
    assert dkimpy_verify(rig, sent) == [True, True], sent


# -- incoming ------------------------------------------------------------------------------------


def plain(n: str, sender_domain: str, extra: bytes = b"") -> bytes:
    return (f"From: Someone <someone@{sender_domain}>\r\nTo: bob@example.org\r\nSubject: in {n}\r\n"
            f"Message-ID: <{n}@{sender_domain}>\r\n").encode() + extra + b"\r\nHello Bob.\r\n"


def delivered(rig: Rig, marker: bytes, folder: str = "") -> bytes:
    found: list[bytes] = []

    def arrived() -> bool:
        found[:] = [m for m in rig.stored("bob", folder) if marker in m]
        return bool(found)

    wait_until(arrived, timeout=30, what=f"{marker!r} in bob's {folder or 'INBOX'}\n{rig.logs()}")
    return found[0]


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_mail_signed_by_dkimpy_arrives_with_dkim_and_dmarc_pass(rig: Rig, algorithm: str) -> None:
    n = f"in-dkimpy-{algorithm}"
    signed = rig.outside.dkimpy_sign(plain(n, "sender.example"), "sender.example", algorithm)
    code, text = incoming(rig, signed, "someone@sender.example")
    assert code == 250, (text, rig.logs())
    stored = delivered(rig, n.encode())
    results = authentication_results(stored)
    assert results[0].startswith(f"{AUTHSERV_ID};"), results
    assert "dkim=pass" in results[0] and "header.d=sender.example" in results[0], results
    assert "spf=fail" in results[0], results  # 127.0.0.1 is not in sender.example's SPF
    assert "dmarc=pass" in results[0] and "header.from=sender.example" in results[0], results


def test_mail_signed_by_opendkim_arrives_with_dkim_pass(rig: Rig) -> None:
    key = rig.oracle_dir / "r1.pem"
    key.write_bytes(rig.outside.rsa_pem)
    key.chmod(0o600)
    message = plain("in-opendkim", "sender.example")
    out = opendkim(rig, message, "Mode s", "Domain sender.example", "Selector r1", f"KeyFile {key}",
                   "SignatureAlgorithm rsa-sha256", "Canonicalization relaxed/relaxed")
    match = re.search(r"INSHEADER: idx=0 hname='DKIM-Signature' hvalue='(.*?)'", out, re.DOTALL)
    assert match, out
    signed = b"DKIM-Signature: " + match.group(1).replace("\n", "\r\n").encode() + b"\r\n" + message
    code, text = incoming(rig, signed, "someone@sender.example")
    assert code == 250, (text, rig.logs())
    (result,) = authentication_results(delivered(rig, b"in-opendkim"))[:1]
    assert "dkim=pass" in result and "dmarc=pass" in result, result


def test_forged_results_are_deleted_and_an_altered_body_fails(rig: Rig) -> None:
    forged = (f"Authentication-Results: {AUTHSERV_ID}; dkim=pass header.d=bank.example; "
              f"dmarc=pass header.from=bank.example\r\n").encode()
    signed = rig.outside.dkimpy_sign(plain("in-forged", "quar.example", forged), "quar.example")
    altered = signed.replace(b"Hello Bob.", b"Hello Bob, send money.")
    code, text = incoming(rig, altered, "someone@quar.example")
    assert code == 250, (text, rig.logs())
    stored = delivered(rig, b"in-forged", "Junk")  # dmarc=fail under p=quarantine: Junk
    results = authentication_results(stored)
    assert len(results) == 1 and results[0].startswith(f"{AUTHSERV_ID};"), results
    assert "dkim=fail" in results[0] and "dis=quarantine" in results[0], results
    assert not [m for m in rig.stored("bob") if b"in-forged" in m]


def test_a_missing_key_is_no_pass(rig: Rig) -> None:
    signed = rig.outside.dkimpy_sign(plain("in-nokey", "quar.example"), "quar.example")
    signed = signed.replace(b"s=r1;", b"s=gone;")
    code, _text = incoming(rig, signed, "someone@quar.example")
    assert code == 250
    (result,) = authentication_results(delivered(rig, b"in-nokey", "Junk"))[:1]
    assert re.search(r"dkim=(permerror|fail|neutral)", result) and "dkim=pass" not in result, result


def test_dmarc_reject_failure_is_refused(rig: Rig) -> None:
    code, text = incoming(rig, plain("in-bank", "bank.example"), "ceo@bank.example")
    assert code == 550 and b"5.7.1" in text, (text, rig.logs())


# -- faults: milterd down ------------------------------------------------------------------------


def test_milterd_down_nothing_lost(rig: Rig) -> None:
    rig.daemons.stop()
    try:
        # Port 25: accepted unchecked (no Authentication-Results of ours).
        code, _ = incoming(rig, plain("in-down", "sender.example"), "someone@sender.example")
        assert code == 250, rig.logs()
        assert authentication_results(delivered(rig, b"in-down")) == []
        # Submission: a temporary refusal (Postfix's tempfail shows from AUTH on, since the milter
        # is missing from CONNECT), so the client keeps the mail and retries.
        try:
            code, text = submit(rig, OUTGOING.replace(b"{n}", b"out-down"))
        except smtplib.SMTPResponseException as exc:
            error = exc.smtp_error
            code, text = exc.smtp_code, error.encode() if isinstance(error, str) else error
        assert 400 <= code < 500, (code, text)
        # sendmail: the mail waits in Postfix's queue.
        process = subprocess.run(
            rig.postfix.release.command(["sendmail", "-C", str(rig.postfix.etc), "-f",
                                         "alice@example.org", "x@sink.test"], rig.postfix.binds),
            input=OUTGOING.replace(b"{n}", b"out-queued").replace(b"\r\n", b"\n"),
            capture_output=True, timeout=60, check=False)
        assert process.returncode == 0
        time.sleep(2)
        assert not [m for m in rig.sunk() if b"out-queued" in m]
    finally:
        rig.daemons.start()
    rig.postfix.flush()
    sent = message_of(rig.sunk_with(b"<out-queued@example.org>"))
    assert dkimpy_verify(rig, sent) == [True, True]
