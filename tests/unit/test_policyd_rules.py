"""The decisions at RCPT, each rule with the address forms of the issue, on a real store."""

from __future__ import annotations

import pytest

from policyd.actions import state_label, verb
from policyd.codec import PolicyRequest
from tests.unit.test_policyd_fixtures import Harness, captured

OUTSIDE = "203.0.113.5"


@pytest.fixture
def h() -> Harness:
    return Harness()


# Postfix adds "<address>: Recipient/Sender address rejected: " itself (see policyd.actions).


def unknown(address: str) -> str:
    return "550 5.1.1 User unknown"


def relay(address: str) -> str:
    return "554 5.7.1 Relay access denied"


def not_owned(sender: str, login: str) -> str:
    return f"553 5.7.1 not owned by user {login}"


def not_logged_in(sender: str) -> str:
    return "553 5.7.1 not logged in"


# -- recipient validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipient",
    [
        "alice@example.org",
        "ALICE@EXAMPLE.ORG",
        "Alice@Example.Org.",
        '"alice"@example.org',
        "alice+tag@example.org",
        "sales@example.org",
        "sales+news@example.org",
        "team@example.org",
        "fwd@example.org",
        "anything@example.net",
        "carol+x@example.net",
        "dora@bücher.example",
        "DORA@xn--bcher-kva.example",
    ],
)
def test_known_recipients_are_dunno(h: Harness, recipient: str) -> None:
    assert h.decide(recipient=recipient) == "DUNNO"


@pytest.mark.parametrize(
    "recipient",
    [
        "nobody@example.org",
        "nobody+alice@example.org",
        "+alice@example.org",
        "bob@example.org",  # disabled
        "dora@example.org",
        "a..b@example.org",  # does not parse: never a mailbox, but the domain is ours
    ],
)
def test_unknown_recipients_are_550(h: Harness, recipient: str) -> None:
    assert h.decide(recipient=recipient) == unknown(recipient)
    assert h.decide(recipient=recipient, client_address="127.0.0.1") == unknown(recipient)


@pytest.mark.parametrize(
    "recipient",
    [
        "alice%elsewhere.example@example.org",
        "alice@elsewhere.example@example.org",  # Postfix's internal form of "alice@elsewhere"@ours
        '"alice@elsewhere.example"@example.org',
        "elsewhere.example!alice@example.org",
        "alice%example.org@example.org",
        "carol%elsewhere.example@example.net",  # not even the catch-all takes a routing form
    ],
)
def test_open_relay_tricks_in_our_domains_are_unknown_users(h: Harness, recipient: str) -> None:
    for client, login in ((OUTSIDE, ""), ("127.0.0.1", ""), (OUTSIDE, "alice@example.org")):
        action = h.decide(
            recipient=recipient, client_address=client, sasl_username=login,
            sender="alice@example.org" if login else "x@elsewhere.example",
        )
        assert action == unknown(recipient)


@pytest.mark.parametrize(
    "recipient", ["@example.org:alice@elsewhere.example", "alice@[192.0.2.1]", "alice@[IPv6:2001:db8::1]"]
)
def test_source_routes_and_ip_literals_are_not_ours(h: Harness, recipient: str) -> None:
    assert h.decide(recipient=recipient) == relay(recipient)
    assert h.decide(recipient=recipient, client_address="127.0.0.1") == "DUNNO"


def test_disabled_mailbox_can_be_left_to_postfix() -> None:
    h = Harness(reject_disabled_as_unknown=False)
    assert h.decide(recipient="bob@example.org") == "DUNNO"
    assert h.decide(recipient="nobody@example.org") == unknown("nobody@example.org")


def test_recipient_without_domain_is_left_to_postfix(h: Harness) -> None:
    assert h.decide(recipient="postmaster") == "DUNNO"


# -- relay control -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::ffff:127.0.0.1", True),
        ("2001:db8::5", True),
        ("2001:db8:ffff::1", True),
        ("2001:db9::1", False),
        ("::1", False),
        ("128.0.0.1", False),
        (OUTSIDE, False),
        ("unknown", False),
        ("", False),
    ],
)
def test_relay_by_mynetworks(h: Harness, client: str, allowed: bool) -> None:
    action = h.decide(recipient="x@other.example", client_address=client)
    assert action == ("DUNNO" if allowed else relay("x@other.example"))


def test_relay_for_authenticated_clients(h: Harness) -> None:
    action = h.decide(recipient="x@other.example", sasl_username="alice@example.org",
                      sender="alice@example.org")
    assert action == "DUNNO"


def test_mynetworks_ipv6_only() -> None:
    h = Harness(mynetworks=["::1/128"])
    assert h.decide(recipient="x@other.example", client_address="::1") == "DUNNO"
    assert h.decide(recipient="x@other.example", client_address="127.0.0.1") == relay("x@other.example")


def test_relay_denied_even_for_odd_domains(h: Harness) -> None:
    assert h.decide(recipient="x@-bad-.example") == relay("x@-bad-.example")


# -- sender/login match --------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender",
    [
        "",
        "alice@example.org",
        "ALICE@example.ORG",
        "alice+lists@example.org",
        "sales@example.org",
        "sales+x@example.org",
        "team@example.org",
        "boss@example.org",
        "Boss+x@example.org",
        "anyone@granted.example",
    ],
)
def test_sender_owned_by_login(h: Harness, sender: str) -> None:
    action = h.decide(sasl_username="alice@example.org", sender=sender, recipient="x@other.example")
    assert action == "DUNNO"


@pytest.mark.parametrize(
    "sender",
    [
        "carol@example.net",
        "random@example.net",  # the catch-all goes to carol, not alice
        "bob@example.org",
        "fwd@example.org",
        "nobody@example.org",
        "alice@other.example",
        "alice%other.example@example.org",
        "alice@[192.0.2.1]",
        "not an address",
    ],
)
def test_sender_not_owned_by_login(h: Harness, sender: str) -> None:
    action = h.decide(sasl_username="alice@example.org", sender=sender, recipient="x@other.example")
    assert action == not_owned(sender, "alice@example.org")


def test_catch_all_does_not_own_senders(h: Harness) -> None:
    assert h.decide(sasl_username="carol@example.net", sender="carol@example.net") == "DUNNO"
    assert h.decide(sasl_username="carol@example.net", sender="random@example.net") == not_owned(
        "random@example.net", "carol@example.net"
    )
    # ...but a list alias naming carol does.
    assert h.decide(sasl_username="carol@example.net", sender="team@example.org") == "DUNNO"


def test_login_without_a_mailbox_owns_nothing(h: Harness) -> None:
    for login in ("ghost@example.org", "alice", "@example.org"):
        assert h.decide(sasl_username=login, sender="alice@example.org") == not_owned(
            "alice@example.org", login
        )


def test_login_case_does_not_matter(h: Harness) -> None:
    assert h.decide(sasl_username="Alice@EXAMPLE.org", sender="alice@example.org") == "DUNNO"


# -- spoofing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender", ["alice@example.org", "nobody@EXAMPLE.NET", "x@bücher.example", "a..b@example.org"]
)
def test_unauthenticated_outsiders_cannot_use_our_domains(h: Harness, sender: str) -> None:
    assert h.decide(sender=sender) == not_logged_in(sender)
    assert h.decide(sender=sender, client_address="127.0.0.1") == "DUNNO"


@pytest.mark.parametrize("sender", ["", "x@elsewhere.example", "alice@[192.0.2.1]", "junk"])
def test_foreign_and_null_senders_are_fine(h: Harness, sender: str) -> None:
    assert h.decide(sender=sender) == "DUNNO"


def test_spoof_protection_can_be_switched_off() -> None:
    h = Harness(spoof_protection=False)
    assert h.decide(sender="alice@example.org") == "DUNNO"


# -- order, switches and contexts ----------------------------------------------------------


def test_rules_run_in_order(h: Harness) -> None:
    # Unknown recipient first, then relay, then the sender checks.
    assert h.decide(recipient="nobody@example.org", sender="alice@example.org") == unknown(
        "nobody@example.org"
    )
    assert h.decide(recipient="x@other.example", sender="alice@example.org") == relay("x@other.example")
    assert h.decide(recipient="x@other.example", sender="carol@example.net",
                    sasl_username="alice@example.org") == not_owned("carol@example.net", "alice@example.org")


def test_every_check_switched_off() -> None:
    h = Harness(recipient_validation=False, relay_control=False, sender_login_match=False,
                spoof_protection=False)
    assert h.decide(recipient="nobody@example.org", sender="alice@example.org") == "DUNNO"
    assert h.decide(recipient="x@other.example") == "DUNNO"
    assert h.lookups.queries == 0


def test_per_context_rule_sets() -> None:
    h = Harness(
        contexts={
            "submission": {"checks": ["relay_control", "sender_login_match"]},
            "nothing": {"checks": []},
        }
    )
    spoofed = {"sender": "alice@example.org", "recipient": "alice@example.org"}
    assert h.decide(**spoofed) == not_logged_in("alice@example.org")
    assert h.decide(**spoofed, policy_context="unlisted") == not_logged_in("alice@example.org")
    assert h.decide(**spoofed, policy_context="submission") == "DUNNO"
    assert h.decide(recipient="nobody@example.org", policy_context="submission") == "DUNNO"
    assert h.decide(recipient="x@other.example", policy_context="submission") == relay("x@other.example")
    assert h.decide(recipient="x@other.example", policy_context="nothing") == "DUNNO"


def test_only_rcpt_is_checked(h: Harness) -> None:
    for attrs in captured():
        request = PolicyRequest(dict(attrs, client_address=OUTSIDE))
        results: list[str] = []
        h.service.decide(request).addCallback(results.append)
        state = request.get("protocol_state")
        assert results == ([relay("bob@test.example")] if state == "RCPT" else ["DUNNO"]), state


def test_captured_rcpt_for_our_domain() -> None:
    h = Harness()
    h.store.add_domain("test.example")
    h.store.add_mailbox("bob@test.example", "{PLAIN}x")
    (attrs,) = [a for a in captured() if dict(a)["protocol_state"] == "RCPT"]
    results: list[str] = []
    h.service.decide(PolicyRequest(dict(attrs))).addCallback(results.append)
    assert results == ["DUNNO"]


def test_metric_labels_are_bounded() -> None:
    assert verb("550 5.1.1 <x>: text") == "550"
    assert verb("defer_if_permit Greylisted") == "DEFER_IF_PERMIT"
    assert verb("DUNNO") == "DUNNO"
    assert verb("alice@example.org rejected") == "OTHER"
    assert verb("") == "OTHER"
    assert state_label("RCPT") == "RCPT"
    assert state_label("alice@example.org") == "OTHER"
