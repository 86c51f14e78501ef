"""authd's conformance decisions (issue #15): empty and overlong passwords, the characters a
login may hold (Dovecot's ``auth_username_chars``) and master users, on the real Verifier."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from authd.logins import Login, Verdict, VerifyRequest, bad_username, split_login
from authd.sasl_codec import Outcome
from authd.verify import MAX_PASSWORD_BYTES
from mailplugins.config import ConfigError
from mailplugins.config.authd import DOVECOT_USERNAME_CHARS
from tests.unit.test_authd_verify import Rig, make_config


def verify(rig: Rig, request: VerifyRequest) -> Verdict:
    results: list[Verdict] = []
    rig.verifier.verify(request).addCallback(results.append)
    for _ in range(40):
        if results:
            break
        rig.clock.advance(0.25)
    assert results, "no verdict"
    return results[0]


def request(user: str, password: str, service: str = "imap", authzid: str = "") -> VerifyRequest:
    return VerifyRequest(user, password, service, "192.0.2.1", "plain", authzid=authzid)


# -- item 2: empty passwords --------------------------------------------------------------------


def test_empty_password_is_refused_even_when_the_stored_hash_is_of_it() -> None:
    rig = Rig()
    rig.store.set_password("alice@example.org", rig.hash(""))
    verdict, _ = rig.verify(password="")
    assert verdict.outcome is Outcome.FAIL
    assert "empty password" in verdict.reason
    assert rig.cpu_calls == 0


# -- item 4: overlong passwords -----------------------------------------------------------------


def test_overlong_password_fails_unhashed_logged_once_without_the_password() -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        rig = Rig()
        verdict, _ = rig.verify(password="Z" * (MAX_PASSWORD_BYTES + 1))
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if str(e.get("log_namespace", "")).startswith("authd")]
    overlong = [line for line in lines if "password longer than 4096 bytes" in line]
    assert len(overlong) == 1
    assert not any("unusable stored hash" in line for line in lines)
    assert not any("ZZZZ" in line for line in lines)
    assert verdict.outcome is Outcome.FAIL
    assert rig.cpu_calls == 0


def test_password_of_exactly_the_limit_is_checked() -> None:
    rig = Rig()
    password = "é" * (MAX_PASSWORD_BYTES // 2)  # 4096 bytes in UTF-8
    rig.store.set_password("alice@example.org", rig.hash(password))
    assert rig.verify(password=password)[0].outcome is Outcome.OK


# -- item 3: characters of a login --------------------------------------------------------------


@pytest.mark.parametrize(
    "login",
    ["alice@example.org ", " alice@example.org", "al ice@example.org", "alice@example.org\t",
     '"alice"@example.org', "alice+x@example.org", "ålice@example.org", "alice@exämple.org"],
)
def test_logins_dovecot_refuses_are_refused(login: str) -> None:
    rig = Rig()
    verdict, _ = rig.verify(user=login)
    assert verdict.outcome is Outcome.UNKNOWN
    assert "username_chars" in verdict.reason
    assert rig.cpu_calls == 0


def test_username_chars_is_configurable_and_empty_allows_eai() -> None:
    rig = Rig(username_chars="")
    rig.store.add_mailbox("ålice@example.org", rig.hash("pw"))
    assert rig.verify(user="ålice@example.org", password="pw")[0].outcome is Outcome.OK
    rig = Rig(username_chars=DOVECOT_USERNAME_CHARS + "+")
    assert rig.verify(user="alice+x@example.org")[0].reason == "unknown user"


def test_bad_username_names_the_character() -> None:
    assert bad_username("alice@example.org", DOVECOT_USERNAME_CHARS) is None
    assert bad_username("a b", DOVECOT_USERNAME_CHARS) == (
        "login character 0x20 not allowed by username_chars"
    )
    assert bad_username("ä", DOVECOT_USERNAME_CHARS) == (
        "login character U+00E4 not allowed by username_chars"
    )
    assert bad_username("", "") == "empty login"


# -- item 10: master users ----------------------------------------------------------------------


def master_rig(**authd: Any) -> Rig:
    rig = Rig(**authd)
    rig.store.add_mailbox("admin@example.org", rig.hash("master-pw"))
    rig.store.set_master("admin@example.org", True)
    rig.store.add_mailbox("bob@example.org", rig.hash("bob-pw"))
    return rig


def test_split_login() -> None:
    def split(user: str, authzid: str = "", sep: str = "*") -> Login:
        return split_login(request(user, "x", authzid=authzid), sep)

    assert split("alice@x.org") == Login("alice@x.org")
    assert split("admin@x.org", authzid="alice@x.org") == Login("alice@x.org", "admin@x.org")
    assert split("alice@x.org", authzid="alice@x.org") == Login("alice@x.org")
    assert split("Alice@X.org", authzid="alice@x.org") == Login("Alice@X.org")
    assert split("alice@x.org*admin@x.org") == Login("alice@x.org", "admin@x.org")
    assert split("alice@x.org*admin@x.org", sep="") == Login("alice@x.org*admin@x.org")
    assert split("alice@x.org*") == Login("alice@x.org")


def test_master_user_logs_in_as_another_mailbox_and_it_is_logged() -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        rig = master_rig()
        verdict = verify(rig, request("admin@example.org", "master-pw", authzid="Alice@Example.org"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert verdict == Verdict(Outcome.OK, "alice@example.org")
    lines = [formatEvent(e) for e in events]
    assert any("master user admin@example.org logged in as alice@example.org" in line
               and "service=imap" in line for line in lines)
    assert rig.metric("master_logins_total") == 1


def test_master_user_with_the_separator() -> None:
    rig = master_rig(master_user_separator="*")
    verdict = verify(rig, request("alice@example.org*admin@example.org", "master-pw"))
    assert verdict == Verdict(Outcome.OK, "alice@example.org")
    # Without the separator configured the same login is refused (the * is not a login char).
    rig = master_rig()
    verdict = verify(rig, request("alice@example.org*admin@example.org", "master-pw"))
    assert verdict.outcome is Outcome.UNKNOWN


@pytest.mark.parametrize(
    ("user", "password", "authzid", "service", "outcome"),
    [
        ("bob@example.org", "bob-pw", "alice@example.org", "imap", Outcome.FAIL),  # not a master
        ("admin@example.org", "wrong", "alice@example.org", "imap", Outcome.FAIL),
        ("admin@example.org", "master-pw", "nobody@example.org", "imap", Outcome.UNKNOWN),
        ("admin@example.org", "master-pw", "alice@example.org", "smtp", Outcome.FAIL),
        ("admin@example.org", "alice-pw", "alice@example.org", "imap", Outcome.FAIL),
        ("alice@example.org", "s3cret", "admin@example.org", "imap", Outcome.FAIL),
    ],
    ids=["not-master", "wrong-password", "unknown-target", "smtp", "target-password",
         "reverse"],
)
def test_master_user_refusals(
    user: str, password: str, authzid: str, service: str, outcome: Outcome
) -> None:
    rig = master_rig()
    assert verify(rig, request(user, password, service, authzid)).outcome is outcome
    assert rig.metric("master_logins_total") == 0


def test_master_user_on_smtp_only_when_configured() -> None:
    rig = master_rig(master_user_smtp=True)
    verdict = verify(rig, request("admin@example.org", "master-pw", "smtp", "bob@example.org"))
    assert verdict == Verdict(Outcome.OK, "bob@example.org")


def test_master_user_cannot_open_a_disabled_or_closed_mailbox() -> None:
    rig = master_rig()
    rig.store.set_enabled("bob@example.org", False)
    assert verify(rig, request("admin@example.org", "master-pw", authzid="bob@example.org")) \
        .outcome is Outcome.DISABLED
    rig = master_rig()
    rig.store.set_services("bob@example.org", ["smtp"])
    assert verify(rig, request("admin@example.org", "master-pw", authzid="bob@example.org")) \
        .outcome is Outcome.FAIL


def test_master_app_password_does_not_open_other_mailboxes() -> None:
    rig = master_rig()
    rig.store.add_app_password("admin@example.org", "phone", rig.hash("app-pw"), [])
    assert verify(rig, request("admin@example.org", "app-pw", authzid="bob@example.org")) \
        .outcome is Outcome.FAIL
    assert verify(rig, request("admin@example.org", "app-pw")).outcome is Outcome.OK


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"master_user_separator": "**"}, "authd.master_user_separator"),
        ({"master_user_separator": "@"}, "authd.master_user_separator"),
        ({"master_user_separator": "a"}, "authd.master_user_separator"),
    ],
)
def test_master_settings_are_checked(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        make_config(**settings)
    assert key in str(error.value)
