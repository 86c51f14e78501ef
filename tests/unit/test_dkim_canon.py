"""DKIM canonicalization (RFC 6376 §3.4) and the streaming body hash, at every split point."""

from __future__ import annotations

import base64
import hashlib
import re
import tracemalloc

import pytest
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from milterd.dkim.canon import BodyHasher, canonicalize_header
from milterd.dkim.tags import TagError, parse_tags

#: RFC 6376 Appendix A's body; RFC 8463 Appendix A's has two spaces after "game." (relaxed).
RFC_BODY = b"Hi.\r\n\r\nWe lost the game. Are you hungry yet?\r\n\r\nJoe.\r\n"
RFC_8463_BODY = RFC_BODY.replace(b"game. ", b"game.  ")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def body_hash(body: bytes, canon: str, splits: list[int] | tuple[int, ...] = (),
              limit: int | None = None) -> str:
    hasher = BodyHasher(canon, "sha256", limit)
    previous = 0
    for cut in [*splits, len(body)]:
        hasher.feed(body[previous:cut])
        previous = cut
    return b64(hasher.digest())


def reference(body: bytes, canon: str) -> bytes:
    """RFC 6376 §3.4.3/§3.4.4 read literally, on the whole body at once."""
    if canon == "relaxed":
        body = re.sub(rb"[ \t]+", b" ", body).replace(b" \r\n", b"\r\n")
        if body.endswith(b" "):  # WSP ending the last line, terminated or not
            body = body[:-1]
    while body.endswith(b"\r\n"):
        body = body[:-2]
    if body or canon == "simple":
        body += b"\r\n"
    return body


def test_rfc_6376_body_hashes() -> None:
    assert body_hash(RFC_BODY, "simple") == "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
    assert body_hash(RFC_8463_BODY, "relaxed") == "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
    assert body_hash(RFC_8463_BODY, "simple") != "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
    assert body_hash(b"", "simple") == "frcCV1k9oG9oKj3dpUqdJg1PxRT2RSN/XKdLCPjaYaY="
    # Relaxed: the empty body (and one of only empty lines) hashes nothing (RFC 6376 erratum 3192).
    assert body_hash(b"", "relaxed") == b64(hashlib.sha256(b"").digest())
    assert body_hash(b"\r\n\r\n \r\n", "relaxed") == b64(hashlib.sha256(b"").digest())


def test_rfc_6376_section_3_4_5_example() -> None:
    headers = [("A", " X"), ("B ", " Y\t\r\n\tZ  ")]
    assert "".join(canonicalize_header(n, v, "relaxed") for n, v in headers) == (
        "a:X\r\nb:Y Z\r\n")
    assert "".join(canonicalize_header(n, v, "simple") for n, v in headers) == (
        "A: X\r\nB : Y\t\r\n\tZ  \r\n")
    body = b" C \r\nD \t E\r\n\r\n\r\n"
    assert reference(body, "relaxed") == b" C\r\nD E\r\n"
    assert body_hash(body, "relaxed") == b64(hashlib.sha256(b" C\r\nD E\r\n").digest())
    assert body_hash(body, "simple") == b64(hashlib.sha256(b" C \r\nD \t E\r\n").digest())


def test_header_bare_lf_folds_count_as_crlf() -> None:
    """Postfix hands a milter folded headers with bare LF between the lines."""
    assert canonicalize_header("Subject", " a\n\tb", "simple") == "Subject: a\r\n\tb\r\n"
    assert canonicalize_header("Subject", " a\n\tb", "relaxed") == "subject:a b\r\n"


MESSAGE_BODY = (b"Line one  \r\n\tindented\t\t line\r\n \r\n\r\nmiddle \r\r\n"
                b"last   \r\n\r\n  \r\n\r\n")


@pytest.mark.parametrize("canon", ["simple", "relaxed"])
def test_every_split_point_gives_the_same_hash(canon: str) -> None:
    expected = b64(hashlib.sha256(reference(MESSAGE_BODY, canon)).digest())
    for cut in range(len(MESSAGE_BODY) + 1):
        assert body_hash(MESSAGE_BODY, canon, [cut]) == expected, cut
    for first in range(len(MESSAGE_BODY) + 1):
        for second in range(first, len(MESSAGE_BODY) + 1, 3):
            assert body_hash(MESSAGE_BODY, canon, [first, second]) == expected, (first, second)
    # One byte at a time.
    assert body_hash(MESSAGE_BODY, canon, list(range(len(MESSAGE_BODY)))) == expected


PIECES = [b"a", b"b", b" ", b"\t", b"  ", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b" \r\n"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=14), st.lists(st.integers(0, 40), max_size=4),
       st.sampled_from(["simple", "relaxed"]))
def test_streaming_matches_the_whole_body(pieces: list[bytes], cuts: list[int], canon: str) -> None:
    body = b"".join(pieces)
    splits = sorted({min(c, len(body)) for c in cuts})
    assert body_hash(body, canon, splits) == b64(hashlib.sha256(reference(body, canon)).digest())
    if body.endswith(b"\r\n"):  # where dkimpy and the RFC agree (dkimpy keeps a final WSP run)
        oracle = (Relaxed if canon == "relaxed" else Simple).canonicalize_body(body)
        assert body_hash(body, canon, splits) == b64(hashlib.sha256(oracle).digest())


def test_limit_hashes_a_prefix_and_counts_the_rest() -> None:
    hasher = BodyHasher("relaxed", "sha256", limit=5)
    hasher.feed(b"Hello world\r\n\r\n")
    assert hasher.digest() == hashlib.sha256(b"Hello").digest()
    assert hasher.length == len(b"Hello world\r\n")


@pytest.mark.parametrize("filler", [b"\r\n", b" ", b"\r\n \t", b"x"])
def test_memory_bounded_whatever_the_body(filler: bytes) -> None:
    """5 MiB of empty lines, whitespace or text in 64 KiB chunks: memory stays in the order
    of one chunk's worth of work (regex pieces), never the body."""
    chunk = filler * (65535 // len(filler))
    hasher = BodyHasher("relaxed")
    tracemalloc.start()
    try:
        for _ in range(80):
            hasher.feed(chunk)
        hasher.feed(b"end\r\n")
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000
    hasher.digest()


def test_tag_lists() -> None:
    assert parse_tags(" v=1; a = rsa-sha256 ;\r\n\tb=ab\r\n cd;") == {
        "v": "1", "a": "rsa-sha256", "b": "ab\r\n cd"}
    for bad, message in [("v=1; v=1", "duplicate"), ("v=1; =x", "bad tag name"),
                         ("v", "without '='"), ("v=1; 1x=2", "bad tag name"),
                         ("v=a\x00b", "bad characters"), ("v=1;;", "without '='")]:
        with pytest.raises(TagError, match=message):
            parse_tags(bad)
