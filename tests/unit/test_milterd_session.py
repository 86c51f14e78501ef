"""milterd's per-message logic: direction, signing, checking, failures, with fakes and a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mailplugins.metrics import DaemonMetrics
from milterd import codec
from milterd.checks import DmarcVerdict
from milterd.session import MilterMetrics, MilterSession, from_domains, normalise_value
from tests.support.milter_fakes import AUTHSERV_ID, Dkim, FakeChecks, milterd_config
from tests.support.sync import result_of


class Driver:
    """Feeds commands to a session as Postfix would and collects the replies."""

    def __init__(self, checks: FakeChecks | None = None, **config: Any) -> None:
        self.checks = checks or FakeChecks()
        self.clock = Clock()
        self.metrics = DaemonMetrics("milterd")
        self.session = MilterSession(self.checks, milterd_config(**config), self.clock,
                                     MilterMetrics(self.metrics))

    def send(self, command: codec.Command) -> Any:
        reply = self.session.handle(command)
        if isinstance(reply, Deferred):
            return result_of(reply) if reply.called else reply
        return reply

    def connect(self, address: str = "198.51.100.9", helo: str = "client.example.net") -> None:
        assert self.send(codec.OptNeg(6, 0x1FF, 0x1FFFFF))[4:5] == b"O"
        self.send(codec.Macros("C", {"j": "mx.example.test"}))
        assert self.send(codec.Connect("client", "4", 4000, address)) == codec.CONTINUE
        assert self.send(codec.Helo(helo)) == codec.CONTINUE

    def message(self, headers: list[tuple[str, str]], body: bytes = b"hi\r\n", *,
                sender: str = "<bob@example.net>", login: str = "") -> tuple[Any, Any]:
        if login:
            self.send(codec.Macros("M", {"{auth_authen}": login}))
        assert self.send(codec.Mail(sender)) == codec.CONTINUE
        assert self.send(codec.Data()) == codec.CONTINUE
        for name, value in headers:
            assert self.send(codec.Header(name, value)) == codec.CONTINUE
        at_eoh = self.send(codec.EndOfHeaders())
        if at_eoh != codec.CONTINUE:
            return at_eoh, None
        assert self.send(codec.Body(body)) == codec.CONTINUE
        return at_eoh, self.send(codec.EndOfMessage())

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"mailplugins_milterd_{name}", labels)
        return value or 0.0


def replies(data: bytes) -> list[codec.Reply]:
    decoded, rest = codec.decode_replies(data)
    assert rest == b""
    return decoded


FROM_ALICE = [("From", " Alice <alice@example.org>"), ("Subject", " hi\n\tthere")]


def test_authenticated_mail_is_signed_at_the_top_in_order() -> None:
    d = Driver(FakeChecks(owned={("alice@example.org", "alice@example.org")}, keys={"example.org"}))
    d.connect()
    _, eom = d.message(FROM_ALICE, b"x" * 10, login="alice@example.org")
    decoded = replies(eom)
    assert [r.code for r in decoded] == ["i", "i", "c"]
    # Inserted at 0 each, the ed25519 one first: the rsa one (first returned) ends on top.
    assert decoded[0].payload.startswith(b"\0\0\0\0DKIM-Signature\0 v=1; a=ed25519")
    assert decoded[1].payload.startswith(b"\0\0\0\0DKIM-Signature\0 v=1; a=rsa-sha256")
    signer = d.checks.signers[0]
    assert signer.headers[1] == ("Subject", " hi\r\n\tthere")  # folds back to CRLF
    assert bytes(signer.body) == b"x" * 10
    assert d.checks.spf_calls == []  # authenticated: never checked
    assert d.count("messages_total", direction="outgoing", outcome="signed") == 1
    assert d.count("signatures_total") == 2


def test_a_from_the_login_may_not_use_is_rejected_not_signed() -> None:
    d = Driver(FakeChecks(keys={"example.org"}))
    d.connect()
    at_eoh, _ = d.message(FROM_ALICE, login="mallory@example.org")
    assert at_eoh == codec.reply_code("550", "5.7.1 Sender address in From: is not owned by user "
                                      "mallory@example.org")
    assert d.checks.signers == []


def test_unowned_from_may_be_accepted_unsigned() -> None:
    d = Driver(FakeChecks(keys={"example.org"}), unowned_from="accept-unsigned")
    d.connect()
    at_eoh, _ = d.message(FROM_ALICE, login="mallory@example.org")
    assert at_eoh == codec.ACCEPT
    assert d.checks.signers == []


def test_mynetworks_and_sendmail_mail_is_signed_without_a_login() -> None:
    d = Driver(FakeChecks(keys={"example.org"}))
    d.connect(address="192.0.2.20")  # in mynetworks
    _, eom = d.message(FROM_ALICE)
    assert [r.code for r in replies(eom)] == ["i", "i", "c"]
    d = Driver(FakeChecks(keys={"example.org"}))
    d.connect(address="127.0.0.1", helo="localhost")
    _, eom = d.message(FROM_ALICE, sender="alice@example.org")  # cleanup: no angle brackets
    assert [r.code for r in replies(eom)] == ["i", "i", "c"]


def test_no_key_or_no_single_from_is_accepted_unsigned() -> None:
    d = Driver(FakeChecks(owned={("alice@example.org", "alice@example.org")}))
    d.connect()
    assert d.message(FROM_ALICE, login="alice@example.org")[0] == codec.ACCEPT
    d = Driver(FakeChecks(keys={"example.org"}))
    d.connect(address="192.0.2.20")
    assert d.message([("Subject", " none")])[0] == codec.ACCEPT
    assert d.message([("From", " a@example.org"), ("From", " b@example.org")])[0] == codec.ACCEPT
    assert d.message([("From", " undisclosed")])[0] == codec.ACCEPT
    assert d.count("messages_total", direction="outgoing", outcome="no_from") == 3


@pytest.mark.parametrize("stage", ["keys", "owns", "sign"])
def test_outgoing_failures_tempfail_rather_than_send_unsigned(stage: str) -> None:
    checks = FakeChecks(owned={("alice@example.org", "alice@example.org")}, keys={"example.org"},
                        broken={stage: RuntimeError("database down")})
    d = Driver(checks)
    d.connect()
    at_eoh, eom = d.message(FROM_ALICE, login="alice@example.org")
    tempfail = codec.reply_code("451", "4.7.0 Cannot sign the message now, try again later")
    assert tempfail in (at_eoh, eom)
    assert d.count("failures_total", stage="sign" if stage == "sign" else "headers") == 1


def test_outgoing_past_the_budget_tempfails() -> None:
    checks = FakeChecks(keys={"example.org"}, hold={"keys": Deferred()})
    d = Driver(checks, budget=5)
    d.connect(address="192.0.2.20")
    d.send(codec.Mail("<a@example.org>"))
    d.send(codec.Header("From", " a@example.org"))
    pending = d.session.handle(codec.EndOfHeaders())
    assert isinstance(pending, Deferred) and not pending.called
    d.clock.advance(5)
    assert result_of(pending) == codec.reply_code(
        "451", "4.7.0 Cannot sign the message now, try again later")


def test_incoming_gets_authentication_results_and_forged_ones_deleted() -> None:
    checks = FakeChecks(dkim=[Dkim("pass", "example.net")],
                        dmarc_verdicts={"example.net": DmarcVerdict("pass", "example.net", "reject")})
    d = Driver(checks)
    d.connect()
    headers = [("Authentication-Results", f" {AUTHSERV_ID}; dkim=pass"),
               ("Authentication-Results", " other.example; spf=pass"),
               ("Authentication-Results", f" {AUTHSERV_ID.upper()}; dmarc=pass"),
               ("From", " Bob <bob@example.net>")]
    _, eom = d.message(headers, b"body\r\n")
    decoded = replies(eom)
    assert [r.code for r in decoded] == ["m", "m", "i", "c"]
    assert decoded[0].payload == b"\0\0\0\x03Authentication-Results\0\0"
    assert decoded[1].payload == b"\0\0\0\x01Authentication-Results\0\0"
    assert decoded[2].payload == (b"\0\0\0\0Authentication-Results\0 mx.example.test; dkim=pass "
                                  b"header.d=example.net; spf=pass; dmarc=pass (p=reject dis=none) "
                                  b"header.from=example.net\0")
    assert d.checks.spf_calls == [("198.51.100.9", "client.example.net", "bob@example.net")]
    assert bytes(d.checks.verifiers[0].body) == b"body\r\n"
    assert d.checks.dmarc_calls == [("example.net", "example.net")]
    assert d.count("dkim_results_total", result="pass") == 1
    assert d.count("dmarc_results_total", result="pass", disposition="none") == 1


@pytest.mark.parametrize(("policy", "setting", "expected"), [
    ("reject", "reject", "reject"),
    ("reject", "quarantine", "quarantine"),
    ("reject", "none", "none"),
    ("quarantine", "reject", "quarantine"),
    ("none", "reject", "none"),
])
def test_dmarc_failures_get_the_configured_action(policy: str, setting: str, expected: str) -> None:
    checks = FakeChecks(dmarc_verdicts={"bank.example": DmarcVerdict("fail", "bank.example", policy)})
    d = Driver(checks, dmarc={"reject_action": setting})
    d.connect()
    _, eom = d.message([("From", " <ceo@bank.example>")])
    if expected == "reject":
        assert eom == codec.reply_code("550", "5.7.1 Message rejected by the sender domain's DMARC policy")
        return
    (inserted, _) = replies(eom)
    assert f"dmarc=fail (p={policy} dis={expected})".encode() in inserted.payload


def test_several_from_fields_are_rejected_no_from_is_permerror() -> None:
    d = Driver()
    d.connect()
    _, eom = d.message([("From", " a@one.example"), ("From", " b@two.example")])
    assert eom == codec.reply_code("550", "5.7.1 Message has several From: header fields")
    _, eom = d.message([("Subject", " no from")])
    assert b"dmarc=permerror (p=none dis=none)" in eom
    _, eom = d.message([("From", " undisclosed-recipients:;")])
    assert b"dmarc=permerror" in eom


def test_dmarc_gets_every_from_value_and_the_envelope_domain() -> None:
    d = Driver()
    d.connect()
    d.message([("From", " x@a.example")], sender="<bounce@Lists.Example>")
    d.message([("From", " x@a.example")], sender="<>")
    assert d.checks.dmarc_calls == [("a.example", "lists.example"), ("a.example", "")]


def test_incoming_failures_still_delete_forged_results_and_accept() -> None:
    checks = FakeChecks(broken={"verify": RuntimeError("boom")})
    d = Driver(checks)
    d.connect()
    _, eom = d.message([("Authentication-Results", f" {AUTHSERV_ID}; dmarc=pass (dis=none)"),
                        ("From", " x@a.example")])
    assert eom == codec.change_header(1, "Authentication-Results", "") + codec.CONTINUE


def test_spf_failure_becomes_temperror() -> None:
    d = Driver(FakeChecks(broken={"spf": OSError("dns")}))
    d.connect()
    _, eom = d.message([("From", " x@a.example")])
    assert b"spf=temperror" in eom


def test_abort_forgets_the_message_and_its_login() -> None:
    d = Driver(FakeChecks(keys={"example.org"}))
    d.connect()
    d.send(codec.Macros("M", {"{auth_authen}": "alice@example.org"}))
    d.send(codec.Mail("<alice@example.org>"))
    assert d.session.handle(codec.Abort()) is None
    _, eom = d.message(FROM_ALICE)  # no login this time, not in mynetworks: incoming
    assert b"Authentication-Results" in eom
    assert d.checks.signers == []


def test_too_many_headers() -> None:
    d = Driver(FakeChecks(keys={"example.org"}), max_headers=16)
    d.connect(address="192.0.2.20")
    at_eoh, _ = d.message([("X-N", f" {i}") for i in range(20)] + FROM_ALICE)
    assert at_eoh == codec.reply_code("552", "5.3.4 Message header too large to sign")
    d = Driver(max_headers=16)
    d.connect()
    _, eom = d.message([("X-N", f" {i}") for i in range(20)])
    assert eom == codec.CONTINUE and d.checks.verifiers == []


def test_helpers() -> None:
    assert normalise_value(" a\n\tb") == " a\r\n\tb"
    assert normalise_value(" a\r\n\tb") == " a\r\n\tb"
    assert from_domains([("FROM", ' "A, B" <a@Example.ORG.>')]) == (1, ["a@Example.ORG."], ["example.org"])
    assert from_domains([("Subject", "x")]) == (0, [], [])
    assert from_domains([("From", " root")]) == (1, ["root"], [""])
