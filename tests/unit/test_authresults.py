"""Authentication-Results: composing ours (RFC 8601) and spotting forged ones."""

from __future__ import annotations

import re

import pytest

from milterd.authresults import SpfAuth, claims_authserv_id, compose, parse_authserv_id
from milterd.dkim import DkimResult
from milterd.dmarc import DmarcResult

PASS = DkimResult("pass", "example.com", "r2023", "rsa-sha256", "2048-bit key", "d3jb7aGt/ZNe")
FAIL = DkimResult("fail", "example.com", "e2023", "ed25519-sha256", "body hash did not verify",
                  "x+y/z=abcdef")


def unfold(value: str) -> str:
    return re.sub(r"\r\n[ \t]+", " ", value)


def test_compose_everything() -> None:
    dmarc = DmarcResult("fail", "example.com", "quarantine", "no aligned pass",
                        disposition="quarantine")
    value = compose("mx.example.org", [PASS, FAIL], SpfAuth("pass", "alice@example.com"), dmarc)
    assert value.startswith(" mx.example.org;\r\n\t")
    assert all(len(line) <= 78 for line in value.split("\r\n"))
    assert all(line[:1] == "\t" for line in value.split("\r\n")[1:])
    assert unfold(value) == (
        " mx.example.org; dkim=pass (2048-bit key) header.d=example.com header.s=r2023"
        ' header.a=rsa-sha256 header.b="d3jb7aGt/ZNe";'
        " dkim=fail (body hash did not verify) header.d=example.com header.s=e2023"
        ' header.a=ed25519-sha256 header.b="x+y/z=abcdef";'
        " spf=pass smtp.mailfrom=alice@example.com;"
        " dmarc=fail (p=quarantine dis=quarantine) header.from=example.com")
    assert claims_authserv_id(value, "mx.example.org")


def test_compose_minimal_and_null_sender() -> None:
    value = compose("mx.example.org", [], SpfAuth("none", "", "helo.example"), None)
    assert unfold(value) == " mx.example.org; dkim=none; spf=none smtp.helo=helo.example"


def test_no_domain_dmarc_has_no_header_from() -> None:
    dmarc = DmarcResult("permerror", "", "none", "several From headers")
    assert unfold(compose("mx", [], None, dmarc)) == " mx; dkim=none; dmarc=permerror (p=none dis=none)"


def test_hostile_text_is_neutralised() -> None:
    evil = DkimResult("permerror", "", "", "", "bad (tag) \\ name\r\n\tX-Injected: 1;", "")
    value = compose("mx.example.org", [evil], SpfAuth("fail", 'a"b;c@example.com'), None)
    flat = unfold(value)
    assert "\r\n" not in flat and "X-Injected: 1;" not in flat.replace("X-Injected: 1", "")
    assert "(bad tag  name" in flat
    assert 'smtp.mailfrom="a\\"b;c@example.com"' in flat


@pytest.mark.parametrize("value", [
    " mx.example.org; dkim=pass header.d=evil.example",
    " MX.Example.ORG; spf=pass",
    " mx.example.org.; dmarc=pass",
    "mx.example.org;dkim=pass",
    "\r\n\tmx.example.org;\r\n\tdkim=pass",
    " mx.example.org 1; dkim=pass",
    " mx.example.org; none",
    " (forged (nested) comment) mx.example.org; dkim=pass",
    " mx.example.org(comment); dkim=pass",
    ' "mx.example.org"; dkim=pass',
    ' "mx.exa\\mple.org" ; dkim=pass',
    " mx.example.org (unterminated; dkim=pass",
    ' "mx.example.org; dkim=pass',                  # unterminated quoted string
    " mx.example.org",
])
def test_forged_headers_claim_our_id(value: str) -> None:
    assert claims_authserv_id(value, "mx.example.org")


@pytest.mark.parametrize("value", [
    " other.example; dkim=pass header.d=mx.example.org",
    " mx.example.org.evil.example; dkim=pass",
    " evil-mx.example.org; dkim=pass",
    ' "mx.example.org x"; dkim=pass',
    " (mx.example.org) other.example; spf=pass",
    " (unterminated mx.example.org; dkim=pass",     # no reader takes mx.example.org as the id
    "",
    " ;",
])
def test_other_headers_do_not(value: str) -> None:
    assert not claims_authserv_id(value, "mx.example.org")


def test_parse_authserv_id() -> None:
    assert parse_authserv_id(" (c) mx.example.org 1; none") == "mx.example.org"
    assert parse_authserv_id(' "quoted id"; none') == "quoted id"
    assert parse_authserv_id(" (open") is None
    assert parse_authserv_id(' "open') is None
