"""mailplugins.maildir_path: the one expansion of mail.location shared by authd and deliver."""

from __future__ import annotations

import pytest

from mailplugins.maildir_path import check_template, expand_location


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("/var/vmail/%d/%n/Maildir", "/var/vmail/example.org/Alice/Maildir"),
        ("/var/vmail/%u", "/var/vmail/Alice@example.org"),
        ("/var/vmail/%Ld/%Ln", "/var/vmail/example.org/alice"),
        ("/var/vmail/%Un", "/var/vmail/ALICE"),
        (
            "/var/vmail/%{domain}/%{username}/%L{user}",
            "/var/vmail/example.org/Alice/alice@example.org",
        ),
        ("/v/%1n/%n", "/v/A/Alice"),
        ("/v/%0.1Ln/%1.2n/%2.0n", "/v/a/li/ice"),
        ("/v/100%%/%n", "/v/100%/Alice"),
    ],
)
def test_expansion(template: str, expected: str) -> None:
    assert expand_location(template, "Alice", "example.org") == expected


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
