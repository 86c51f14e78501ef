"""Address parsing: normalisation, detail splitting, and routing forms kept visible."""

from __future__ import annotations

import pytest

from mailplugins.addresses import Address, AddressError, normalise_domain, parse_address, parse_domain


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("Bob@Example.ORG", "Bob", "example.org"),
        ("<bob@example.org>", "bob", "example.org"),
        ('"john doe"@example.org', "john doe", "example.org"),
        ('"a\\"b"@example.org', 'a"b', "example.org"),
        ("user@bücher.de", "user", "xn--bcher-kva.de"),
        ("user@EXAMPLE.org.", "user", "example.org"),
        ("üser@example.org", "üser", "example.org"),
    ],
)
def test_parse(text: str, local: str, domain: str) -> None:
    address = parse_address(text)
    assert (address.local, address.domain) == (local, domain)
    assert not address.routing


def test_keys_compare_local_parts_case_insensitively() -> None:
    assert parse_address("Bob@Example.org").key == parse_address("bOB@example.ORG").key
    assert str(parse_address("Bob@Example.org")) == "Bob@example.org"


def test_quoted_local_part_is_quoted_on_output() -> None:
    assert str(parse_address('"john doe"@example.org')) == '"john doe"@example.org'


@pytest.mark.parametrize(
    "text",
    [
        "user%other.example@ours.example",
        '"user@other.example"@ours.example',
        "@ours.example:user@other.example",
        "user@other.example@ours.example",
        "other.example!user@ours.example",
        "user@[192.0.2.1]",
    ],
)
def test_routing_forms_are_flagged(text: str) -> None:
    assert parse_address(text).routing


@pytest.mark.parametrize(
    "text",
    ["", "nobody", "@example.org", "a..b@example.org", ".a@example.org", "a b@example.org",
     "a@-bad-.example", "a@exa_mple.org", '"open@example.org', "a\x00b@example.org",
     "x" * 65 + "@example.org", "a@[1.2.3.4"],
)
def test_rejects_malformed(text: str) -> None:
    with pytest.raises(AddressError):
        parse_address(text)


def test_catch_all_form() -> None:
    address = parse_address("@Example.ORG", allow_empty_local=True)
    assert address == Address("", "example.org")


@pytest.mark.parametrize(
    ("text", "delimiters", "base", "detail"),
    [
        ("bob+lists@example.org", "+", "bob", "lists"),
        ("bob+a+b@example.org", "+", "bob", "a+b"),
        ("bob-x@example.org", "+-", "bob", "x"),
        ("+bob@example.org", "+", "+bob", None),
        ("bob@example.org", "+", "bob", None),
        ("bob+x@example.org", "", "bob+x", None),
    ],
)
def test_split_detail(text: str, delimiters: str, base: str, detail: str | None) -> None:
    address, found = parse_address(text).split_detail(delimiters)
    assert (address.local, found) == (base, detail)


def test_domains() -> None:
    assert normalise_domain("Bücher.DE") == "xn--bcher-kva.de"
    assert parse_domain("example.org") == "example.org"
    with pytest.raises(AddressError):
        parse_domain("[192.0.2.1]")
    with pytest.raises(AddressError):
        parse_domain("intranet")
