"""mailplugins.maildir_path: the one expansion of mail.location shared by authd and deliver."""

from __future__ import annotations

import pytest

from mailplugins.maildir_path import (
    canonical,
    check_template,
    dovecot24_template,
    expand_location,
    split_home,
)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("/var/vmail/%d/%n/Maildir", "/var/vmail/example.org/alice/Maildir"),
        ("/var/vmail/%u", "/var/vmail/alice@example.org"),
        ("/var/vmail/%Ld/%Ln", "/var/vmail/example.org/alice"),
        ("/var/vmail/%Un", "/var/vmail/ALICE"),
        (
            "/var/vmail/%{domain}/%{username}/%L{user}",
            "/var/vmail/example.org/alice/alice@example.org",
        ),
        ("/v/%1n/%n", "/v/a/alice"),
        ("/v/%0.1Ln/%1.2n/%2.0n", "/v/a/li/ice"),
        ("/v/100%%/%n", "/v/100%/alice"),
    ],
)
def test_expansion(template: str, expected: str) -> None:
    assert expand_location(template, "Alice", "example.org") == expected


@pytest.mark.parametrize("local", ["alice", "Alice", "ALICE", "aLiCe"])
def test_every_spelling_reaches_one_maildir(local: str) -> None:
    assert expand_location("/var/vmail/%d/%n/Maildir", local, "Example.ORG") == \
        "/var/vmail/example.org/alice/Maildir"


def test_canonical_lowers_ascii_only_like_dovecot() -> None:
    # Dovecot's %L and "| lower" change A-Z only; so must we, or the paths would differ.
    assert canonical("ÄLice@Example.org") == "Älice@example.org"
    assert expand_location("/v/%Un", "é", "example.org") == "/v/é"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("/var/vmail/%d/%n/Maildir",
         "/var/vmail/%{user | domain | lower}/%{user | username | lower}/Maildir"),
        ("/v/%u", "/v/%{user | lower}"),
        ("/v/%{domain}/%{username}", "/v/%{user | domain | lower}/%{user | username | lower}"),
        ("/v/%Un", "/v/%{user | username | lower | upper}"),
        ("/v/%1n/%1.2n/%2.0Ln",
         "/v/%{user | username | lower | substr(0, 1)}/%{user | username | lower | substr(1, 2)}"
         "/%{user | username | lower | substr(2) | lower}"),
        ("/srv/mail", "/srv/mail"),
    ],
)
def test_dovecot24_translation(template: str, expected: str) -> None:
    assert dovecot24_template(template) == expected


@pytest.mark.parametrize("template", ["/v/100%%/%n", "/v/%%{user}", "/v/%x", "/v/%{home}/x"])
def test_dovecot24_refuses_what_it_cannot_say_exactly(template: str) -> None:
    with pytest.raises(ValueError, match="%"):
        dovecot24_template(template)


def test_split_home() -> None:
    assert split_home("/var/vmail/%d/%n/Maildir") == ("/var/vmail/%d/%n", "/var/vmail/%d/%n/Maildir")
    assert split_home("/var/vmail/%d/%n") == ("/var/vmail/%d/%n", "/var/vmail/%d/%n")


@pytest.mark.parametrize("local", ["..", ".", "a/b", "../x", "", "a\0b"])
def test_unsafe_local_part_refused(local: str) -> None:
    with pytest.raises(ValueError, match="local part"):
        expand_location("/var/vmail/%d/%n", local, "example.org")


@pytest.mark.parametrize("domain", ["..", "a/b", ""])
def test_unsafe_domain_refused(domain: str) -> None:
    with pytest.raises(ValueError, match="domain"):
        expand_location("/var/vmail/%d/%n", "alice", domain)


def test_truncation_that_makes_dotdot_refused() -> None:
    with pytest.raises(ValueError, match="component"):
        expand_location("/var/vmail/%2n/x", "..x", "example.org")


@pytest.mark.parametrize(
    "template", ["/v/%", "/v/%x", "/v/%{home}", "/v/%{user", "/v/%-1n", "/v/%L"]
)
def test_bad_templates(template: str) -> None:
    with pytest.raises(ValueError, match=r"%|variable|template"):
        check_template(template)
