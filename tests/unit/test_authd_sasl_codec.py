"""authd.sasl_codec: the auth-client protocol as Postfix 3.7 and doveadm speak it."""

from __future__ import annotations

import base64

import pytest

from authd.sasl_codec import (
    Action,
    AuthServerSession,
    Credentials,
    Drop,
    LoginMechanism,
    Outcome,
    PlainMechanism,
    Send,
    Verify,
    handshake,
    tab_escape,
    tab_unescape,
)

HELLO = b"VERSION\t1\t0\nCPID\t21769\n"
ALICE = base64.b64encode(b"\0alice@example.org\0s3cret").decode()
POSTFIX_AUTH = (
    f"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.7\tresp={ALICE}\n"
).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def session(**kwargs: object) -> AuthServerSession:
    return AuthServerSession(**kwargs)


def feed(s: AuthServerSession, data: bytes, now: float = 0.0) -> list[Action]:
    return s.receive(data, now)


def sent(actions: list[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def test_handshake_is_byte_exact_and_in_postfix_order() -> None:
    assert handshake(21679, 1, "6a816a1da977afea0bba55b9a40637a1") == (
        b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t21679\n"
        b"CUID\t1\nCOOKIE\t6a816a1da977afea0bba55b9a40637a1\nDONE\n"
    )


def test_postfix_plain_with_initial_response() -> None:
    actions = feed(session(), HELLO + POSTFIX_AUTH)
    assert actions == [
        Verify(1, "PLAIN", Credentials("alice@example.org", "s3cret", ""), "smtp", "192.0.2.7", False,
               serial=1)
    ]


def test_every_split_point_gives_the_same_actions() -> None:
    data = HELLO + POSTFIX_AUTH + b"AUTH\t2\tLOGIN\tservice=smtp\tsecured\n"
    expected = feed(session(), data)
    assert len(expected) == 2
    for cut in range(1, len(data)):
        s = session()
        assert feed(s, data[:cut]) + feed(s, data[cut:]) == expected, cut
    s = session()
    assert [a for i in range(len(data)) for a in feed(s, data[i : i + 1])] == expected


def test_plain_without_initial_response_then_cont() -> None:
    s = session()
    assert sent(feed(s, HELLO + b"AUTH\t5\tPLAIN\tservice=smtp\tnologin\n")) == b"CONT\t5\t\n"
    actions = feed(s, f"CONT\t5\t{ALICE}\n".encode())
    assert isinstance(actions[0], Verify)
    assert actions[0].credentials.authcid == "alice@example.org"
    assert s.verified(5, Outcome.OK, "alice@example.org") == [Send(b"OK\t5\tuser=alice@example.org\n")]
    assert s.requests == {}


def test_login_mechanism_prompts() -> None:
    s = session()
    out = sent(feed(s, HELLO + b"AUTH\t2\tLOGIN\tservice=smtp\tnologin\n"))
    assert out == b"CONT\t2\tVXNlcm5hbWU6\n"
    out = sent(feed(s, f"CONT\t2\t{b64(b'alice@example.org')}\n".encode()))
    assert out == b"CONT\t2\tUGFzc3dvcmQ6\n"
    (verify,) = feed(s, f"CONT\t2\t{b64(b's3cret')}\n".encode())
    assert isinstance(verify, Verify)
    assert verify.credentials == Credentials("alice@example.org", "s3cret")
    assert verify.mechanism == "LOGIN"


def test_login_with_initial_response_goes_to_password() -> None:
    s = session()
    data = f"AUTH\t3\tLOGIN\tservice=smtp\tresp={b64(b'bob@example.org')}\n".encode()
    assert sent(feed(s, HELLO + data)) == b"CONT\t3\tUGFzc3dvcmQ6\n"


def test_bad_base64_fails_the_request_only() -> None:
    s = session()
    out = sent(feed(s, HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\tresp=!!!!\n"))
    assert out == b"FAIL\t1\tcode=invalid_base64\treason=Invalid base64 data in initial response\n"
    assert not s.closed
    feed(s, b"AUTH\t2\tPLAIN\tservice=smtp\n")
    assert sent(feed(s, b"CONT\t2\t%%%\n")).startswith(b"FAIL\t2\t")


def test_unknown_mechanism_drops() -> None:
    (drop,) = feed(session(), HELLO + b"AUTH\t1\tCRAM-MD5\tservice=smtp\n")
    assert isinstance(drop, Drop)


def test_other_authzid_goes_to_the_verifier() -> None:
    """A master-user login (authzid = the mailbox, authcid = the master): the verifier decides."""
    resp = b64(b"bob@example.org\0alice@example.org\0s3cret")
    (verify,) = feed(session(), HELLO + f"AUTH\t1\tPLAIN\tservice=imap\tresp={resp}\n".encode())
    assert isinstance(verify, Verify)
    assert verify.credentials.authzid == "bob@example.org"
    assert verify.credentials.authcid == "alice@example.org"


def test_same_authzid_is_accepted() -> None:
    resp = b64(b"alice@example.org\0alice@example.org\0s3cret")
    (verify,) = feed(session(), HELLO + f"AUTH\t1\tPLAIN\tservice=smtp\tresp={resp}\n".encode())
    assert isinstance(verify, Verify)


def test_duplicate_id_drops() -> None:
    s = session()
    feed(s, HELLO + b"AUTH\t7\tPLAIN\tservice=smtp\n")
    (drop,) = feed(s, b"AUTH\t7\tPLAIN\tservice=smtp\n")
    assert isinstance(drop, Drop)
    assert "duplicate" in drop.reason
    assert feed(s, b"AUTH\t8\tPLAIN\tservice=smtp\n") == []


def test_reused_id_after_completion_is_fine() -> None:
    s = session()
    feed(s, HELLO + POSTFIX_AUTH)
    s.verified(1, Outcome.FAIL)
    assert isinstance(feed(s, POSTFIX_AUTH)[0], Verify)


@pytest.mark.parametrize(
    "data",
    [
        b"AUTH\t1\tPLAIN\tservice=smtp\n",  # before VERSION
        b"VERSION\t2\t0\n",  # wrong major
        b"VERSION\n",
        b"VERSION\t1\t0\nAUTH\t1\tPLAIN\tservice=smtp\n",  # before CPID
        HELLO + b"HELLO\n",  # unknown command
        HELLO + b"AUTH\tx\tPLAIN\tservice=smtp\n",  # bad id
        HELLO + b"AUTH\t1\tPLAIN\n",  # no service
        HELLO + f"AUTH\t1\tPLAIN\tservice=smtp\tresp={ALICE}\tsecured\n".encode(),  # after resp
        HELLO + b"CPID\t1\n",  # repeated CPID
        HELLO + b"\xff\xfe\n",
    ],
)
def test_malformed_input_drops(data: bytes) -> None:
    s = session()
    actions = feed(s, data)
    assert isinstance(actions[-1], Drop)
    assert s.closed


def test_over_long_line_drops_before_the_newline() -> None:
    s = session(max_line=1024)
    feed(s, HELLO)
    (drop,) = feed(s, b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + b"A" * 2000)
    assert isinstance(drop, Drop)


def test_one_request_over_the_limit_fails_alone() -> None:
    s = session(max_requests=2)
    feed(s, HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\nAUTH\t2\tPLAIN\tservice=smtp\n")
    out = sent(feed(s, b"AUTH\t3\tPLAIN\tservice=smtp\n"))
    assert out == b"FAIL\t3\tcode=temp_fail\treason=Too many pending requests\n"
    assert not s.closed
    assert sorted(s.requests) == [1, 2]
    # The requests in flight go on; once one finishes there is room again.
    assert isinstance(feed(s, b"CONT\t1\t" + ALICE.encode() + b"\n")[0], Verify)
    s.verified(1, Outcome.OK, "alice@example.org")
    assert sent(feed(s, b"AUTH\t3\tPLAIN\tservice=smtp\n")) == b"CONT\t3\t\n"


def test_cont_for_unknown_id_fails_like_dovecot() -> None:
    out = sent(feed(session(), HELLO + b"CONT\t9\tAAAA\n"))
    assert out == b"FAIL\t9\treason=Authentication request timed out\n"


def test_cont_while_verifying_fails_that_request_like_dovecot() -> None:
    s = session()
    feed(s, HELLO + POSTFIX_AUTH)
    out = sent(feed(s, b"CONT\t1\tAAAA\n"))
    assert out == b"FAIL\t1\tuser=alice@example.org\treason=Unexpected continuation\n"
    assert not s.closed
    # The verification's late answer is thrown away, as Dovecot does.
    assert s.verified(1, Outcome.OK, "alice@example.org") == []


@pytest.mark.parametrize("abandon", [b"CONT\t1\tAAAA\n", b"CANCEL\t1\n"])
def test_a_late_answer_never_answers_a_reused_id(abandon: bytes) -> None:
    """Request 1 fails (or is cancelled) while verifying and its id is reused: the first
    verification's OK must not answer the second request."""
    s = session()
    (first,) = feed(s, HELLO + POSTFIX_AUTH)
    feed(s, abandon)
    wrong = b64(b"\0bob@example.org\0wrong")
    (second,) = feed(s, f"AUTH\t1\tPLAIN\tservice=smtp\tresp={wrong}\n".encode())
    assert isinstance(first, Verify) and isinstance(second, Verify)
    assert s.verified(1, Outcome.OK, "alice@example.org", first.serial) == []
    assert sent(s.verified(1, Outcome.FAIL, None, second.serial)) == (
        b"FAIL\t1\tuser=bob@example.org\n"
    )


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"AUTH\t4\tPLAIN\tservice=\n", b"FAIL\t4\treason=Invalid service\n"),
        (b"AUTH\t4\tPLAIN\tservice=sm\xfftp\n", b"FAIL\t4\treason=Invalid service\n"),
        (b"AUTH\t4\tPLAIN\tservice=smtp\x01r\n", b"FAIL\t4\treason=Invalid service\n"),
        (b"AUTH\t4\tPLAIN\tprotocol=\n", b"FAIL\t4\treason=Invalid service\n"),
        # A byte that is not UTF-8 in a parameter nobody reads changes nothing.
        (b"AUTH\t4\tPLAIN\tservice=smtp\tsession=\xff\n", b"CONT\t4\t\n"),
        (b"AUTH\t4\tPLAIN\tservice=smtp\trip=\xff\n", b"CONT\t4\t\n"),
        (b"AUTH\t4\tPLAIN\tservice=smtp\tresp=\xff\n",
         b"FAIL\t4\tcode=invalid_base64\treason=Invalid base64 data in initial response\n"),
    ],
    ids=["empty-service", "0xff-service", "control-service", "empty-protocol", "0xff-session",
         "0xff-rip", "0xff-resp"],
)
def test_malformed_request_fails_alone(line: bytes, reply: bytes) -> None:
    s = session()
    assert sent(feed(s, HELLO + line)) == reply
    assert not s.closed
    assert isinstance(feed(s, POSTFIX_AUTH)[0], Verify)


def test_dovecot_24_client_request() -> None:
    """What ``doveadm auth test`` from Dovecot 2.4 sends: VERSION 1 3, protocol=, final-resp-ok."""
    s = session()
    feed(s, b"VERSION\t1\t3\nCPID\t4242\n")
    line = f"AUTH\t1\tPLAIN\tprotocol=imap\tfinal-resp-ok\tsecured=tls\tsession=abc\t" \
           f"lip=127.0.0.1\trip=192.0.2.7\tlport=143\trport=50000\tresp={ALICE}\n"
    (verify,) = feed(s, line.encode())
    assert isinstance(verify, Verify)
    assert (verify.service, verify.remote_ip, verify.secured) == ("imap", "192.0.2.7", True)
    assert verify.credentials.authcid == "alice@example.org"
    assert s.client_minor == 3


def test_version_13_keeps_an_empty_resp_as_an_empty_response() -> None:
    """From minor 2 on, ``resp=`` is an empty initial response (Dovecot), not an absent one."""
    s = session()
    feed(s, b"VERSION\t1\t3\nCPID\t1\n")
    assert sent(feed(s, b"AUTH\t1\tPLAIN\tprotocol=smtp\tresp=\n")) == (
        b"FAIL\t1\treason=Invalid input\n"
    )


def test_client_abort_star() -> None:
    s = session()
    feed(s, HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\n")
    assert sent(feed(s, b"CONT\t1\t*\n")).startswith(b"FAIL\t1\t")
    assert s.requests == {}


def test_empty_resp_from_old_client_means_no_initial_response() -> None:
    out = sent(feed(session(), HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\tresp=\n"))
    assert out == b"CONT\t1\t\n"


def test_resp_equals_sign_is_an_empty_initial_response() -> None:
    out = sent(feed(session(), HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\tresp==\n"))
    assert out == b"FAIL\t1\treason=Invalid input\n"


def test_plain_needs_exactly_two_nuls() -> None:
    assert PlainMechanism().start(b"a\0b").__class__.__name__ == "MechFailure"
    assert PlainMechanism().start(b"a\0b\0c\0d").__class__.__name__ == "MechFailure"
    assert PlainMechanism().start(b"\0\0pw").__class__.__name__ == "MechFailure"
    assert PlainMechanism().start(b"\0u\0\xff").__class__.__name__ == "MechFailure"


def test_login_refuses_nul_and_empty_user() -> None:
    mech = LoginMechanism()
    mech.start(None)
    assert mech.step(b"").__class__.__name__ == "MechFailure"
    assert mech.step(b"a\0b").__class__.__name__ == "MechFailure"


def test_verified_outcomes() -> None:
    s = session()
    feed(s, HELLO + POSTFIX_AUTH)
    assert sent(s.verified(1, Outcome.FAIL)) == b"FAIL\t1\tuser=alice@example.org\n"
    feed(s, POSTFIX_AUTH)
    assert sent(s.verified(1, Outcome.UNKNOWN)) == b"FAIL\t1\tuser=alice@example.org\n"
    feed(s, POSTFIX_AUTH)
    assert sent(s.verified(1, Outcome.DISABLED)) == (
        b"FAIL\t1\tuser=alice@example.org\tcode=user_disabled\n"
    )
    feed(s, POSTFIX_AUTH)
    (drop,) = s.verified(1, Outcome.TEMPFAIL)
    assert isinstance(drop, Drop)
    assert drop.temporary
    assert s.closed
    assert s.verified(1, Outcome.OK, "x") == []


def test_user_is_tab_escaped_in_replies() -> None:
    s = session()
    feed(s, HELLO + POSTFIX_AUTH)
    assert s.verified(1, Outcome.OK, "a\tb@example.org") == [Send(b"OK\t1\tuser=a\x01tb@example.org\n")]


def test_abandoned_requests_expire() -> None:
    s = session(continue_timeout=150.0)
    feed(s, HELLO + b"AUTH\t1\tLOGIN\tservice=smtp\n", now=0.0)
    feed(s, POSTFIX_AUTH.replace(b"\t1\t", b"\t2\t"), now=0.0)  # being verified: never expires
    assert s.expire(100.0) == 0
    assert s.expire(150.0) == 1
    assert list(s.requests) == [2]


@pytest.mark.parametrize("value", ["plain", "a\tb", "\x01", "x\r\ny\0z\x011"])
def test_tab_escaping_round_trips(value: str) -> None:
    escaped = tab_escape(value)
    assert not any(c in escaped for c in "\t\r\n\0")
    assert tab_unescape(escaped) == value


def test_tab_escape_matches_dovecot() -> None:
    assert tab_escape("\x01\t\r\n\0") == "\x011\x01t\x01r\x01n\x010"
