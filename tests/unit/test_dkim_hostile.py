"""Hostile input to the DKIM, DMARC and Authentication-Results code: a result, never a traceback."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailplugins.dns import DnsTempError
from milterd.authresults import claims_authserv_id, parse_authserv_id
from milterd.dkim import MessageVerifier
from milterd.dkim.keyrecord import KeyRecordError, parse_key_record
from milterd.dmarc import evaluate, parse_record

# Text made of the characters that matter to the parsers, plus anything.
PIECES = st.sampled_from(["v=1", "a=rsa-sha256", "a=ed25519-sha256", "d=example.com", "s=sel",
                          "h=from:to", "h=from", "bh=", "b=", "AAAA", "=", ";", " ", "\r\n\t",
                          "\n", "(", ")", '"', "\\", "l=5", "l=99999999999999999999999999",
                          "i=@example.com", "x=1", "t=2", "c=relaxed/simple", "é", "\x00"])
HOSTILE = st.one_of(st.lists(PIECES, max_size=30).map("".join), st.text(max_size=200))


@settings(max_examples=300, deadline=None)
@given(st.lists(HOSTILE, min_size=1, max_size=3), st.binary(max_size=200),
       st.lists(st.binary(max_size=120), max_size=3))
def test_verifier_takes_any_signature(values: list[str], body: bytes, records: list[bytes]) -> None:
    headers = [("DKIM-Signature", value) for value in values] + [("From", " a@example.com")]
    verifier = MessageVerifier(headers, now=10)
    verifier.feed(body)
    names = verifier.key_names()
    answers: dict[str, list[bytes] | DnsTempError | None] = {name: records or None for name in names}
    found = verifier.finish(answers)
    assert len(found) == len(values)
    assert {r.result for r in found} <= {"pass", "fail", "policy", "permerror", "temperror"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_key_records_parse_or_refuse(record: bytes) -> None:
    reason = ""
    try:
        found = parse_key_record(record)
    except KeyRecordError as exc:
        reason = str(exc)  # a reason for the A-R comment
        assert reason
    else:
        assert found.key_type in ("rsa", "ed25519")


@settings(max_examples=300, deadline=None)
@given(st.lists(HOSTILE, max_size=3), st.lists(st.text(max_size=80), max_size=3))
def test_dmarc_takes_any_from_and_record(from_values: list[str], records: list[str]) -> None:
    def lookup(name: str) -> list[bytes] | None:
        return [r.encode("utf-8", "replace") for r in records] or None

    found = evaluate(from_values, [], "pass", "example.com", lookup, lambda name: True)
    assert found.result in ("pass", "fail", "none", "temperror", "permerror")
    for record in records:
        parse_record(record)


@settings(max_examples=500, deadline=None)
@given(HOSTILE)
def test_authserv_id_reader_takes_anything(value: str) -> None:
    parse_authserv_id(value)
    claims_authserv_id(value, "mx.example.org")
